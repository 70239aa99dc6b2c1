"""The relay's gRPC side: takes frames off the shared ring, sends them as StepBatches on one
long-lived Monitor stream, reads acks, alerts and batch errors, and reconnects with
exponential backoff and jitter. Runs in the relay process (`monitor.capture.relay`), so none
of this costs the serving process's GIL. Imports no torch.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator

import grpc
import structlog

from monitor.capture.channel.frames import read_step
from monitor.capture.channel.protocol import SenderSettings
from monitor.capture.channel.ring import Frame, SharedRing, Slot
from monitor.wire import pb, pb_grpc
from monitor.wire.acks import ask_for_acks, offers_acks
from monitor.wire.columns import ColumnarEncoder, offers_columns

log = structlog.get_logger("safety_monitor.capture")

# How long the relay sleeps between looks at an empty ring: short while steps are flowing
# (a decode step every few ms), longer once the model has gone quiet.
_POLL_ACTIVE, _POLL_IDLE, _ACTIVE_FOR = 0.0005, 0.005, 0.25


class FrameSource:
    """Steps off the ring, in order. With a doorbell (CPUs that reorder stores), only frames
    whose doorbell byte has arrived are read."""

    def __init__(self, ring: SharedRing, doorbell_fd: int | None = None) -> None:
        self.ring = ring
        self.doorbell_fd = doorbell_fd
        self._announced = 0
        self._last_frame = 0.0

    def next(self, timeout: float, on_bad_frame: Callable[[], None]) -> pb.StepBatch | None:
        """The next step on the ring as a StepBatch, None after `timeout` seconds without one;
        `on_bad_frame` is called for a frame that cannot be read (it is skipped).
        """
        deadline = time.monotonic() + timeout
        while True:
            frame = self._peek()
            if frame is not None:
                try:
                    batch = read_step(self.ring, frame)
                except Exception:
                    log.exception("unreadable frame on the capture ring")
                    batch = None
                self.ring.release(frame.size)
                self._last_frame = time.monotonic()
                if batch is None:
                    on_bad_frame()
                    continue
                return batch
            now = time.monotonic()
            if now >= deadline:
                return None
            idle = now - self._last_frame > _ACTIVE_FOR
            time.sleep(min(_POLL_IDLE if idle else _POLL_ACTIVE, deadline - now))

    def discard_waiting(self) -> int:
        """Take every waiting frame off the ring unread; returns how many."""
        discarded = 0
        while (frame := self._peek()) is not None:
            self.ring.release(frame.size)
            discarded += 1
        return discarded

    def _peek(self) -> Frame | None:
        if self.doorbell_fd is not None:
            with contextlib.suppress(BlockingIOError):
                self._announced += len(os.read(self.doorbell_fd, 65536))
            if self.ring.slots[Slot.CONSUMED] >= self._announced:
                return None
        return self.ring.peek()


class Sender:
    """Owns the gRPC stream; its counters live in the ring's header for the serving process."""

    def __init__(
        self,
        settings: SenderSettings,
        ring: SharedRing,
        source: FrameSource,
        on_event: Callable[[pb.MonitorEvent], None],
    ) -> None:
        self.settings = settings
        self.ring = ring
        self.source = source
        self.on_event = on_event
        self.inflight: dict[int, int] = {}  # seq_no -> rows
        self._lock = threading.Lock()
        self._seq_no = itertools.count(1)
        # The Monitor call's metadata: the settings', plus the request for `Acks` events
        # when the sidecar offers them (set by `_negotiate` before each stream).
        self.stream_metadata: tuple[tuple[str, str], ...] = tuple(settings.metadata)

    # ---- counters (any relay thread) ---------------------------------------------------------

    def count(self, slot: Slot, amount: int = 1) -> None:
        """Add `amount` to a counter in the ring's header."""
        with self._lock:
            self.ring.slots[slot] += amount

    def settle(self, seq_no: int, rejected: bool) -> None:
        """A batch was acked or rejected: count it (and its rows, when acked) and forget it."""
        with self._lock:
            rows = self.inflight.pop(seq_no, None)
            if rows is None:
                return
            if rejected:
                self.ring.slots[Slot.REJECTED] += 1
            else:
                self.ring.slots[Slot.ROWS_ACKED] += rows
                self.ring.slots[Slot.ACKED] += 1

    def settle_acked(self, seq_nos: Iterable[int]) -> None:
        """`settle` for several acked batches at once (an `Acks` event): one lock."""
        with self._lock:
            inflight, slots = self.inflight, self.ring.slots
            acked = rows = 0
            for seq_no in seq_nos:
                batch_rows = inflight.pop(seq_no, None)
                if batch_rows is not None:
                    acked += 1
                    rows += batch_rows
            if acked:
                slots[Slot.ROWS_ACKED] += rows
                slots[Slot.ACKED] += acked

    # ---- the loop --------------------------------------------------------------------------

    def run(self, stopping: threading.Event) -> None:
        """Stream until `stopping` is set, reconnecting with exponential backoff and jitter."""
        low, high = self.settings.reconnect_backoff
        backoff = low
        while not stopping.is_set():
            was_connected = self._stream_once(stopping)
            if stopping.is_set():
                break
            backoff = low if was_connected else min(high, backoff * 2)
            self.count(Slot.RECONNECTS)
            # Jitter so a fleet of serving processes does not reconnect in lockstep.
            stopping.wait(backoff * random.uniform(0.5, 1.5))

    def _stream_once(self, stopping: threading.Event) -> bool:
        """Run one gRPC stream until it ends; True if it got connected."""
        with self.settings.channel() as channel:
            try:
                ready = grpc.channel_ready_future(channel)
                ready.result(timeout=self.settings.connect_timeout)
            except grpc.FutureTimeoutError:
                self.ring.slots[Slot.UNREACHABLE] = 1
                self._drop_waiting_while_down()
                return False
            self.ring.slots[Slot.UNREACHABLE] = 0
            self.ring.slots[Slot.CONNECTED] = 1
            stub = pb_grpc.SafetyMonitorStub(channel)
            encoder = self._negotiate(stub)
            # gRPC pulls requests on its own thread and may still be inside the generator
            # when the call dies; `alive` (checked under the lock) keeps such a step from
            # being counted in flight on a stream that is already gone.
            alive = threading.Event()
            alive.set()
            try:
                requests = self._requests(alive, stopping, encoder)
                for event in stub.Monitor(requests, metadata=self.stream_metadata):
                    self._handle(event)
            except grpc.RpcError as exc:
                log.warning(
                    "monitor stream broke", code=str(exc.code()), target=self.settings.target
                )
            finally:
                self.ring.slots[Slot.CONNECTED] = 0
                with self._lock:
                    alive.clear()
                self._lose_inflight()
            return True

    def _negotiate(self, stub: pb_grpc.SafetyMonitorStub) -> ColumnarEncoder | None:
        """The sequence format of the stream about to open: columnar (with a fresh
        conversation table, as the sidecar's is per stream) when the sidecar's GetStatus
        offers it, else `Sequence` messages, which every sidecar reads. A failed GetStatus
        also means `Sequence` messages: the stream itself then decides whether we are up.
        Sets `stream_metadata`: it asks for `Acks` events (a group's acks in one message)
        when the sidecar offers them; an older sidecar gets, and sends, one Ack per batch."""
        self.stream_metadata = tuple(self.settings.metadata)
        try:
            status = stub.GetStatus(
                pb.StatusRequest(),
                metadata=self.settings.metadata,
                timeout=self.settings.connect_timeout,
            )
        except grpc.RpcError as exc:
            log.warning("GetStatus failed; sending Sequence messages", code=str(exc.code()))
            return None
        if offers_acks(status):
            self.stream_metadata = ask_for_acks(self.settings.metadata)
        if not offers_columns(status):
            return None
        return ColumnarEncoder(status.conversation_slots)

    def _requests(
        self,
        alive: threading.Event,
        stopping: threading.Event,
        encoder: ColumnarEncoder | None = None,
    ) -> Iterator[pb.StepBatch]:
        bad_frame = lambda: self.count(Slot.LOST_BAD_FRAME)  # noqa: E731
        while alive.is_set() and not (stopping.is_set() and self.ring.frames_waiting() == 0):
            batch = self.source.next(0.05, bad_frame)
            if batch is None:
                continue
            seq_no = next(self._seq_no)
            batch.seq_no = seq_no
            batch.model = self.settings.model_name
            batch.sent_at.GetCurrentTime()
            rows = sum(sequence.rows for sequence in batch.sequences)
            if encoder is not None:
                encoder.encode(batch)
            with self._lock:
                if not alive.is_set():
                    self.ring.slots[Slot.LOST_DISCONNECTED] += 1
                    return
                self.inflight[seq_no] = rows
                self.ring.slots[Slot.SENT] += 1
            yield batch

    def _handle(self, event: pb.MonitorEvent) -> None:
        kind = event.WhichOneof("event")
        if kind == "ack":
            self.settle(event.ack.seq_no, rejected=False)
        elif kind == "acks":  # a group's acks in one event (asked for in `_negotiate`)
            self.settle_acked(event.acks.seq_no)
        elif kind == "error":
            log.warning(
                "batch rejected by sidecar",
                seq_no=event.error.seq_no,
                reason=event.error.reason,
                error=event.error.message,
            )
            self.settle(event.error.seq_no, rejected=True)
        self.on_event(event)

    def _lose_inflight(self) -> None:
        with self._lock:
            lost = len(self.inflight)
            self.inflight.clear()
            self.ring.slots[Slot.LOST_DISCONNECTED] += lost

    def _drop_waiting_while_down(self) -> None:
        """Fail-open must not keep stale steps waiting while the sidecar is unreachable; a
        fail-closed client keeps them (its model waits for room on the ring anyway)."""
        if self.settings.fail_closed:
            return
        self.count(Slot.LOST_UNAVAILABLE, self.source.discard_waiting())
