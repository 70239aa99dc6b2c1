"""The serving process's end of the relay: starts and supervises the relay process, publishes
steps onto the shared ring, and reads alerts (stdout) and counters (the ring header) back.

A relay that dies is restarted with backoff on a fresh ring; the steps it held are counted
as dropped (`relay_exited`), never lost silently. The model's thread only ever touches the
ring: no system call, no gRPC, no other thread to wake on the hot path.
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import structlog

from monitor.capture.channel.frames import FrameWriter
from monitor.capture.channel.protocol import RelayConfig, SenderSettings, read_event
from monitor.capture.channel.ring import LOST_REASONS, SLOT_HURRY, SharedRing, Slot
from monitor.capture.steps import CapturedStep
from monitor.wire import pb

log = structlog.get_logger("safety_monitor.capture")

# Stores reach other cores in program order only on x86-64; elsewhere each frame also gets a
# doorbell byte (see channel/ring.py).
ORDERED_STORES = platform.machine().lower() in ("x86_64", "amd64")
_SETTLED = (Slot.ACKED, Slot.REJECTED, *LOST_REASONS)
_REPORTED = (
    Slot.SENT,
    Slot.ACKED,
    Slot.REJECTED,
    Slot.ROWS_ACKED,
    Slot.RECONNECTS,
    Slot.MESSAGES,
)
# Read on every step (the model's thread): a plain int, not an IntEnum member to look up.
_UNREACHABLE = int(Slot.UNREACHABLE)


class _Channel:
    """One ring (and doorbell pipe) for one relay process's lifetime."""

    def __init__(self, capacity: int, doorbell: bool) -> None:
        self.ring = SharedRing.create(capacity)
        self.doorbell_read: int | None = None
        self.doorbell_write: int | None = None
        self.wakeup: int | None = None
        if doorbell:
            self.doorbell_read, self.doorbell_write = os.pipe()
            os.set_blocking(self.doorbell_read, False)
            os.set_blocking(self.doorbell_write, False)
        else:
            # Written after a publish only while the relay waits (channel/ring.py).
            self.wakeup = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.writer = FrameWriter(
            self.ring, self._ring_doorbell if doorbell else None, wakeup_fd=self.wakeup
        )
        self.alerts_delivered = 0

    def _ring_doorbell(self) -> None:
        # The pipe only fills if the relay is 64k frames behind; the queue bound forbids that.
        with contextlib.suppress(BlockingIOError):
            os.write(self.doorbell_write, b"\0")  # type: ignore[arg-type]

    def unsettled(self) -> int:
        slots = self.ring.slots
        return slots[Slot.PUBLISHED] - sum(slots[slot] for slot in _SETTLED)

    def set_hurry(self, waiters: int, wake: bool) -> None:
        """Publish HURRY; `wake`: also wake a relay asleep in its linger (which sleeps with
        WAITING clear, so the eventfd is written whatever WAITING says), so it sends at once.
        With a doorbell (which counts frames) there is no wake-up to give: the linger ends."""
        self.ring.slots[SLOT_HURRY] = waiters
        if wake and self.wakeup is not None:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_write(self.wakeup, 1)

    def close(self) -> None:
        self.ring.close()
        for fd in (self.doorbell_read, self.doorbell_write, self.wakeup):
            if fd is not None:
                os.close(fd)


class RelayLink:
    """The serving process's end of the relay: owns the ring and the relay process, restarts a
    relay that dies (on a fresh ring, counting what it held as dropped), publishes steps and
    reads alerts and counters back. The CaptureClient holds one.
    """

    def __init__(
        self,
        settings: SenderSettings,
        capacity: int,
        queue_size: int,
        on_event: Callable[[pb.MonitorEvent], None],
        doorbell: bool = not ORDERED_STORES,
    ) -> None:
        self.settings = settings
        self.capacity = capacity
        self.queue_size = queue_size
        self.on_event = on_event
        self.doorbell = doorbell
        # Where the relay imports `monitor` from: this code. The relay bench points it at
        # another checkout to compare two relays side by side.
        self.package_root = _PACKAGE_ROOT
        self.relay_env: dict[str, str] = {}  # added to the relay's environment (benches)
        self._lock = threading.Lock()
        self._channel: _Channel | None = _Channel(capacity, doorbell)
        self._retired: Counter[str] = Counter()  # counters of relays that have exited
        self._process: subprocess.Popen[bytes] | None = None
        self._closing = threading.Event()
        self._hurrying = 0  # callers inside `hurry`
        self._thread = threading.Thread(
            target=self._supervise, name="safety-monitor-relay", daemon=True
        )

    def start(self) -> None:
        """Start the supervising thread, which starts the relay process."""
        self._thread.start()

    # ---- the hot path ----------------------------------------------------------------------

    def publish(self, step: CapturedStep, texts: list[list[str]] | None) -> bool:
        """Put the step on the ring; False when there is no room (or the link is closed).
        Raises FrameTooLarge for a step bigger than the whole ring."""
        with self._lock:
            channel = self._channel
            if channel is None or channel.ring.frames_waiting() >= self.queue_size:
                return False
            return channel.writer.write(step, texts)

    def publish_again(self, step: CapturedStep, positions: list[int]) -> bool:
        """`publish` of `step` at `positions` through `FrameWriter.write_again`: False, with
        nothing written, when there is no room or the ring's last frame was not laid out for
        `step` (the caller then takes `publish`'s path)."""
        with self._lock:
            channel = self._channel
            if channel is None or channel.ring.frames_waiting() >= self.queue_size:
                return False
            return channel.writer.write_again(step, positions)

    @contextlib.contextmanager
    def hurry(self) -> Iterator[None]:
        """While inside, the relay does not linger (`SenderSettings.linger_ms`): for callers
        that wait for verdicts (`CaptureClient.flush`, `wait_settled`)."""
        with self._lock:
            self._hurrying += 1
            if self._channel is not None:
                self._channel.set_hurry(self._hurrying, wake=self._hurrying == 1)
        try:
            yield
        finally:
            with self._lock:
                self._hurrying -= 1
                if self._channel is not None:
                    self._channel.set_hurry(self._hurrying, wake=False)

    @property
    def unreachable(self) -> bool:
        """The relay's last attempt to reach the sidecar failed (and none has succeeded since)."""
        channel = self._channel
        return channel is not None and channel.ring.slots[_UNREACHABLE] == 1

    # ---- what the client reads ----------------------------------------------------------------

    def counters(self) -> Counter[str]:
        """Relay counters by name (`sent`, `acked`, ..., drop reasons), retired relays included."""
        counts = Counter(self._retired)
        with self._lock:
            channel = self._channel
            if channel is not None:
                slots = channel.ring.slots
                for slot in _REPORTED:
                    counts[slot.name.lower()] += slots[slot]
                for slot, reason in LOST_REASONS.items():
                    counts[reason] += slots[slot]
        return counts

    def unsettled(self) -> int:
        """Steps on the ring or in flight: neither acked, rejected nor counted as dropped."""
        with self._lock:
            return 0 if self._channel is None else self._channel.unsettled()

    @property
    def encoder_state(self) -> int:
        """The relay's `Slot.ENCODER` (0 when there is no relay)."""
        channel = self._channel
        return 0 if channel is None else channel.ring.slots[Slot.ENCODER]

    @property
    def connected(self) -> bool:
        """The relay has a live stream to the sidecar."""
        channel = self._channel
        return channel is not None and channel.ring.slots[Slot.CONNECTED] == 1

    @property
    def queue_depth(self) -> int:
        """Steps on the ring that the relay has not taken yet."""
        channel = self._channel
        return 0 if channel is None else channel.ring.frames_waiting()

    # ---- the relay process ---------------------------------------------------------------

    def _supervise(self) -> None:
        low, high = self.settings.reconnect_backoff
        delay = low
        while not self._closing.is_set():
            started = time.monotonic()
            channel = self._channel
            process = self._spawn()
            if process is not None:
                assert process.stdout is not None
                while (event := read_event(process.stdout)) is not None:
                    self._deliver(event, channel)
                process.wait()
                if self._closing.is_set():
                    return
                log.error("capture relay exited; restarting it", code=process.returncode)
            self._retire_channel()
            delay = low if time.monotonic() - started > 10 else min(high, delay * 2)
            self._closing.wait(delay)

    def _spawn(self) -> subprocess.Popen[bytes] | None:
        with self._lock:
            channel = self._channel
        if channel is None:
            return None
        config = RelayConfig(
            self.settings,
            channel.ring.fd,
            channel.ring.capacity,
            channel.doorbell_read,
            wakeup_fd=channel.wakeup,
        )
        extra = (channel.doorbell_read, channel.wakeup)
        fds = [channel.ring.fd] + [fd for fd in extra if fd is not None]
        env = {**os.environ, **self.relay_env}
        root = self.package_root
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "monitor.capture.relay"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                pass_fds=fds,
                env=env,
                cwd=root,  # `-m` puts the working directory first on sys.path
            )
        except OSError as exc:
            log.error("could not start the capture relay", error=str(exc))
            return None
        with self._lock:
            closing = self._closing.is_set()
            if not closing:
                self._process = process
        try:
            if closing:  # close() ran while we were starting it: it exits at stdin's EOF
                process.stdin.close()  # type: ignore[union-attr]
                process.wait()
                return None
            process.stdin.write(config.to_json())  # type: ignore[union-attr]
            process.stdin.flush()  # type: ignore[union-attr]
        except (OSError, ValueError) as exc:  # it died at once, or close() closed its stdin
            log.error("the capture relay did not take its settings", error=str(exc))
            process.kill()
            process.wait()
            return None
        return process

    def _deliver(self, event: pb.MonitorEvent, channel: _Channel | None) -> None:
        try:
            self.on_event(event)
        except Exception:
            log.exception("handling a relay event failed")
        if channel is not None:
            channel.alerts_delivered += 1

    def alerts_pending(self) -> int:
        """Alerts the relay has written that this process has not handled yet: an ack is
        counted only after its batch's alerts were written, so a flush waits for these too."""
        with self._lock:
            channel = self._channel
            if channel is None:
                return 0
            return channel.ring.slots[Slot.ALERTS] - channel.alerts_delivered

    def _retire_channel(self) -> None:
        """The relay is gone: count what it held as dropped and start over on a fresh ring."""
        with self._lock:
            old = self._channel
            if old is None:
                return
            self._fold(old, "relay_exited")
            self._channel = _Channel(self.capacity, self.doorbell)
            self._channel.set_hurry(self._hurrying, wake=False)
        old.close()

    def close(self, timeout: float) -> None:
        """Stop the relay (it exits when its stdin closes) and release the ring."""
        with self._lock:
            self._closing.set()
            process = self._process
        if process is not None:
            with contextlib.suppress(OSError):
                process.stdin.close()  # type: ignore[union-attr]
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._thread.join(timeout)
        with self._lock:
            channel, self._channel = self._channel, None
        if channel is not None:
            self._fold(channel, "client_closed")
            channel.close()

    def _fold(self, channel: _Channel, unsettled_reason: str) -> None:
        """Keep a finished channel's counters; what it never settled is dropped."""
        slots = channel.ring.slots
        for slot in _REPORTED:
            self._retired[slot.name.lower()] += slots[slot]
        for slot, reason in LOST_REASONS.items():
            self._retired[reason] += slots[slot]
        self._retired[unsettled_reason] += channel.unsettled()


# The directory holding the `monitor` package, so the relay imports this same code.
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
