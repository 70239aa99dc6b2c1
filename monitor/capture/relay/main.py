"""The capture relay: a small process the capture client starts next to the serving process.

Python's gRPC runs several threads per message (the request iterator, the channel's event
loop, the response reader). Inside the serving process every one of them takes the GIL away
from the model, which cost 2-4.5% of generation throughput on a 2-core machine. So the
serving process only copies each step into a shared-memory ring (`channel/ring.py`), and
this process owns everything else: reading the ring, the gRPC stream, acks, reconnects.
Alerts come back to the serving process on this process's stdout; counters through the
ring's header.

Started as `python -m monitor.capture.relay` with the ring's memfd inherited; its settings
(secrets included, hence not argv) arrive as one JSON line on stdin. It exits when stdin
closes: the client closed, or the serving process died.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import BinaryIO

import structlog

from monitor.capture.channel.protocol import EventWriter, RelayConfig
from monitor.capture.channel.ring import SharedRing, Slot
from monitor.capture.relay.sender import FrameSource, Sender
from monitor.heap import settle_heap

log = structlog.get_logger("safety_monitor.capture")


def _stop_when_parent_goes(stdin: BinaryIO, stopping: threading.Event, source: FrameSource) -> None:
    while stdin.read(4096):
        pass
    stopping.set()
    source.interrupt()  # the sender may be asleep waiting for a frame


RELAY_CPUS_ENV = "SAFETY_MONITOR_RELAY_CPUS"
# "0": the relay blocks until woken for every frame instead of following the steps' pace
# (see relay/sender.py): one eventfd write per step on the model's thread, less relay CPU.
RELAY_PACE_ENV = "SAFETY_MONITOR_RELAY_PACE"


MAX_CPU_ID = 8192


def parse_cpu_list(text: str) -> set[int]:
    """CPU ids from a list such as "3", "2,3" or "2-5,8" (ValueError if malformed)."""
    cpus: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        first, _, last = part.partition("-")
        low, high = int(first), int(last or first)
        # The kernel's CPU sets stop at a few thousand ids; a huge range would spin here.
        if not 0 <= low <= high < MAX_CPU_ID:
            raise ValueError(f"bad CPU range {part!r} (ids 0..{MAX_CPU_ID - 1})")
        cpus.update(range(low, high + 1))
    if not cpus:
        raise ValueError("no CPU ids")
    return cpus


def _pin_to_cpus() -> None:
    """`SAFETY_MONITOR_RELAY_CPUS=2,3` keeps this process (and the threads it starts) off the
    serving process's cores; done before any thread starts, so all of them inherit it. A bad
    value is logged and ignored: pinning must never stop capture. Call it once logging is
    configured: this process's stdout carries events to the serving process."""

    text = os.environ.get(RELAY_CPUS_ENV)
    if not text or not hasattr(os, "sched_setaffinity"):
        return
    try:
        os.sched_setaffinity(0, parse_cpu_list(text))
    except (ValueError, OSError) as exc:
        log.warning("capture relay: not pinned", variable=RELAY_CPUS_ENV, error=str(exc))


def main() -> int:
    """The relay process: read the settings from stdin, attach the ring, send until stdin closes."""
    from monitor.logs import configure_logging

    line = sys.stdin.buffer.readline()
    if not line:
        return 0
    config = RelayConfig.from_json(line)
    configure_logging("auto", config.log_level)
    _pin_to_cpus()  # after logging goes to stderr (stdout carries events), before any thread
    ring = SharedRing.attach(config.ring_fd, config.ring_capacity)
    stopping = threading.Event()
    pace = os.environ.get(RELAY_PACE_ENV, "1") != "0"
    source = FrameSource(ring, config.doorbell_fd, config.wakeup_fd, pace=pace)
    watcher = threading.Thread(
        target=_stop_when_parent_goes, args=(sys.stdin.buffer, stopping, source), daemon=True
    )
    watcher.start()
    events = EventWriter(sys.stdout.buffer, lambda: sender.count(Slot.ALERTS))
    sender = Sender(config.settings, ring, source, events)
    settle_heap()  # before the first frame: nothing of a step is frozen
    ring.slots[Slot.RELAY_READY] = 1
    try:
        sender.run(stopping)
    except Exception:
        log.exception("capture relay failed")
        return 1
    return 0
