"""The capture relay: a small process the capture client starts next to the serving process.

Python's gRPC runs several threads per message (the request iterator, the channel's event
loop, the response reader). Inside the serving process every one of them takes the GIL away
from the model, which cost 2-4.5% of generation throughput on a 2-core machine. So the
serving process only copies each step into a shared-memory ring (`ring.py`), and this process
owns everything else: reading the ring, the gRPC stream, acks, reconnects. Alerts come back
to the serving process on this process's stdout; counters through the ring's header.

Started as `python -m monitor.capture.relay` with the ring's memfd inherited; its settings
(secrets included, hence not argv) arrive as one JSON line on stdin. It exits when stdin
closes: the client closed, or the serving process died.
"""

from __future__ import annotations

import base64
import json
import struct
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

import structlog

from monitor.capture.ring import SharedRing, Slot
from monitor.capture.sender import FrameSource, Sender, SenderSettings, TransportSecurity
from monitor.wire import pb

log = structlog.get_logger("safety_monitor.capture")

EVENT_LENGTH = struct.Struct("<I")


@dataclass(frozen=True)
class RelayConfig:
    """Everything the relay needs, as the client sends it."""

    settings: SenderSettings
    ring_fd: int
    ring_capacity: int
    doorbell_fd: int | None = None
    log_level: str = "warning"

    def to_json(self) -> bytes:
        s, tls = self.settings, self.settings.security
        document = {
            "target": s.target,
            "model_name": s.model_name,
            "max_message_bytes": s.max_message_bytes,
            "reconnect_backoff": list(s.reconnect_backoff),
            "connect_timeout": s.connect_timeout,
            "fail_closed": s.fail_closed,
            "tls": {name: _b64(getattr(tls, name)) for name in ("ca", "cert", "key")},
            "token": tls.token,
            "ring_fd": self.ring_fd,
            "ring_capacity": self.ring_capacity,
            "doorbell_fd": self.doorbell_fd,
            "log_level": self.log_level,
        }
        return json.dumps(document).encode() + b"\n"

    @classmethod
    def from_json(cls, line: bytes) -> RelayConfig:
        d = json.loads(line)
        tls = {name: _unb64(value) for name, value in d["tls"].items()}
        settings = SenderSettings(
            target=d["target"],
            model_name=d["model_name"],
            max_message_bytes=d["max_message_bytes"],
            reconnect_backoff=tuple(d["reconnect_backoff"]),
            connect_timeout=d["connect_timeout"],
            fail_closed=d["fail_closed"],
            security=TransportSecurity(token=d["token"], **tls),
        )
        return cls(settings, d["ring_fd"], d["ring_capacity"], d["doorbell_fd"], d["log_level"])


def _b64(value: bytes | None) -> str | None:
    return None if value is None else base64.b64encode(value).decode()


def _unb64(value: str | None) -> bytes | None:
    return None if value is None else base64.b64decode(value)


class EventWriter:
    """Alerts to the serving process: length-prefixed MonitorEvent bytes on stdout."""

    def __init__(self, stream: BinaryIO, written: Callable[[], None]) -> None:
        self.stream = stream
        self.written = written  # counts the alert; the client's flush waits for its delivery
        self._lock = threading.Lock()

    def __call__(self, event: pb.MonitorEvent) -> None:
        if event.WhichOneof("event") != "alert":
            return  # acks and errors are counted in the ring header; errors are logged here
        payload = event.SerializeToString()
        with self._lock:
            try:
                self.stream.write(EVENT_LENGTH.pack(len(payload)) + payload)
                self.stream.flush()
            except (BrokenPipeError, ValueError):
                return  # the serving process is gone; stdin's EOF stops us next
            self.written()


def read_event(stream: BinaryIO) -> pb.MonitorEvent | None:
    """The client's side of EventWriter; None at end of stream."""
    header = stream.read(EVENT_LENGTH.size)
    if len(header) < EVENT_LENGTH.size:
        return None
    (length,) = EVENT_LENGTH.unpack(header)
    payload = stream.read(length)
    if len(payload) < length:
        return None
    return pb.MonitorEvent.FromString(payload)


def _stop_when_parent_goes(stdin: BinaryIO, stopping: threading.Event) -> None:
    while stdin.read(4096):
        pass
    stopping.set()


def main() -> int:
    from monitor.outputs.logging import configure_logging

    line = sys.stdin.buffer.readline()
    if not line:
        return 0
    config = RelayConfig.from_json(line)
    configure_logging("auto", config.log_level)
    ring = SharedRing.attach(config.ring_fd, config.ring_capacity)
    stopping = threading.Event()
    watcher = threading.Thread(
        target=_stop_when_parent_goes, args=(sys.stdin.buffer, stopping), daemon=True
    )
    watcher.start()
    source = FrameSource(ring, config.doorbell_fd)
    events = EventWriter(sys.stdout.buffer, lambda: sender.count(Slot.ALERTS))
    sender = Sender(config.settings, ring, source, events)
    ring.slots[Slot.RELAY_READY] = 1
    try:
        sender.run(stopping)
    except Exception:
        log.exception("capture relay failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
