"""The relay's gRPC side: takes frames off the shared ring, sends them as StepBatches on one
long-lived Monitor stream, reads acks, alerts and batch errors, and reconnects with
exponential backoff and jitter. Runs in the relay process (`monitor.capture.relay`), so none
of this costs the serving process's GIL. Imports no torch.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import random
import select
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import structlog

from monitor.capture.channel.frames import read_step
from monitor.capture.channel.protocol import SenderSettings
from monitor.capture.channel.ring import Frame, SharedRing, Slot, full_fence
from monitor.wire import pb, pb_grpc
from monitor.wire.columns import ColumnarEncoder, offers_columns

log = structlog.get_logger("safety_monitor.capture")

# How long the relay's first sleep after it sets WAITING may last: the fallback for a wake-up
# lost despite the fences (see `FrameSource._wait`), so such a frame waits at most this long.
# Longer than a decode step, so at light load the relay wakes once per step, not twice. With
# no wake-up fd at all (never from RelayLink) the relay polls the ring at this interval.
LOST_WAKEUP_BOUND = 0.025
REQUEST_WAIT = 1.0


class FrameSource:
    """Steps off the ring, in order, waking only when there is one. With a doorbell (CPUs that
    reorder stores), only frames whose doorbell byte has arrived are read, and the relay
    blocks on the doorbell pipe; otherwise it blocks on the wake-up eventfd (ring.py).
    `interrupt` wakes a waiting `next` from another relay thread."""

    def __init__(
        self, ring: SharedRing, doorbell_fd: int | None = None, wakeup_fd: int | None = None
    ) -> None:
        self.ring = ring
        self.doorbell_fd = doorbell_fd
        self.wakeup_fd = None if doorbell_fd is not None else wakeup_fd
        self._announced = 0
        self._fence = threading.Lock()
        self._interrupt = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._poller = select.poll()
        self._poller.register(self._interrupt, select.POLLIN)
        waker = doorbell_fd if doorbell_fd is not None else self.wakeup_fd
        if waker is not None:
            self._poller.register(waker, select.POLLIN)
        # Whether WAITING was set a whole bounded sleep ago (see `_wait`); with a doorbell
        # every frame rings it, so no sleep needs a bound.
        self._waiting_visible = doorbell_fd is not None
        self.waits = 0  # times `next` blocked (each ends in one wake-up of this thread)
        self.timeouts = 0  # waits that ended by their timeout, not by a wake-up

    def next(self, timeout: float, on_bad_frame: Callable[[], None]) -> pb.StepBatch | None:
        """The next step on the ring as a StepBatch, None after `timeout` seconds without one
        (or sooner, after `interrupt`); `on_bad_frame` is called for a frame that cannot be
        read (it is skipped).
        """
        deadline = time.monotonic() + timeout
        slots = self.ring.slots
        while True:
            frame = self._peek()
            if frame is not None:
                if slots[Slot.WAITING]:
                    slots[Slot.WAITING] = 0  # busy again: the producer need not write
                try:
                    batch = read_step(self.ring, frame)
                except Exception:
                    log.exception("unreadable frame on the capture ring")
                    batch = None
                self.ring.release(frame.size)
                if batch is None:
                    on_bad_frame()
                    continue
                return batch
            now = time.monotonic()
            if now >= deadline or self._wait(deadline - now):  # timed out, or interrupted
                # Not waiting any more: the producer must not keep writing the eventfd while
                # this relay is elsewhere (reconnecting, say).
                slots[Slot.WAITING] = 0
                return None

    def interrupt(self) -> None:
        """Wake a `next` that is waiting (from another thread): it returns None."""
        os.eventfd_write(self._interrupt, 1)

    def _wait(self, remaining: float) -> bool:
        """Block until a frame may be there, `remaining` seconds at most; True if interrupted."""
        slots = self.ring.slots
        if self.wakeup_fd is not None and not slots[Slot.WAITING]:
            slots[Slot.WAITING] = 1
            # Once WAITING is set, look again: a frame published before the producer could
            # see it gets no wake-up from it. x86 lets a load pass an earlier store, so our
            # store of WAITING and load of HEAD could cross the producer's store of HEAD and
            # load of WAITING, and both sides miss; a full fence on each side between the two
            # forbids that (`full_fence`). Should a wake-up be lost all the same, this first
            # sleep is bounded: that frame waits LOST_WAKEUP_BOUND at most. Sleeps after one
            # that timed out (WAITING set long before, so visible) need no bound.
            full_fence(self._fence)
            if self._peek() is not None:
                return False
            self._waiting_visible = False
        if not self._waiting_visible:  # also: no wake-up fd at all, the relay then polls
            remaining = min(remaining, LOST_WAKEUP_BOUND)
        self.waits += 1
        ready = self._poller.poll(max(1, math.ceil(remaining * 1000)))
        if not ready:
            self.timeouts += 1
            # A whole bounded sleep since WAITING was set: the producer sees it by now.
            self._waiting_visible = self.wakeup_fd is not None or self.doorbell_fd is not None
            return False
        interrupted = False
        for fd, _ in ready:
            if fd == self._interrupt:
                interrupted = True
                _drain_eventfd(fd)
            elif fd == self.wakeup_fd:
                _drain_eventfd(fd)
            # The doorbell pipe is drained by `_peek`, which counts its bytes.
        return interrupted

    def discard_waiting(self) -> int:
        """Take every waiting frame off the ring unread; returns how many."""
        discarded = 0
        while (frame := self._peek()) is not None:
            self.ring.release(frame.size)
            discarded += 1
        return discarded

    def close(self) -> None:
        """Release the interrupt eventfd."""
        os.close(self._interrupt)

    def _peek(self) -> Frame | None:
        if self.doorbell_fd is not None:
            with contextlib.suppress(BlockingIOError):
                self._announced += len(os.read(self.doorbell_fd, 65536))
            if self.ring.slots[Slot.CONSUMED] >= self._announced:
                return None
        return self.ring.peek()


def _drain_eventfd(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        os.eventfd_read(fd)


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
                for event in stub.Monitor(requests, metadata=self.settings.metadata):
                    self._handle(event)
            except grpc.RpcError as exc:
                log.warning(
                    "monitor stream broke", code=str(exc.code()), target=self.settings.target
                )
            finally:
                self.ring.slots[Slot.CONNECTED] = 0
                with self._lock:
                    alive.clear()
                self.source.interrupt()  # gRPC's request thread may be waiting for a frame
                self._lose_inflight()
            return True

    def _negotiate(self, stub: pb_grpc.SafetyMonitorStub) -> ColumnarEncoder | None:
        """The sequence format of the stream about to open: columnar (with a fresh
        conversation table, as the sidecar's is per stream) when the sidecar's GetStatus
        offers it, else `Sequence` messages, which every sidecar reads. A failed GetStatus
        also means `Sequence` messages: the stream itself then decides whether we are up."""
        try:
            status = stub.GetStatus(
                pb.StatusRequest(),
                metadata=self.settings.metadata,
                timeout=self.settings.connect_timeout,
            )
        except grpc.RpcError as exc:
            log.warning("GetStatus failed; sending Sequence messages", code=str(exc.code()))
            return None
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
            # Stopping and a broken stream interrupt the wait, so it can be long: an idle
            # relay wakes once per REQUEST_WAIT.
            batch = self.source.next(REQUEST_WAIT, bad_frame)
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
