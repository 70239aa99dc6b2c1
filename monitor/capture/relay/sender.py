"""The relay's gRPC side: takes frames off the shared ring, sends them as StepBatches on one
long-lived Monitor stream, reads acks, alerts and batch errors, and reconnects with
exponential backoff and jitter. Runs in the relay process (`monitor.capture.relay`), so none
of this costs the serving process's GIL. Imports no torch.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import math
import os
import random
import select
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc
import structlog

from monitor.capture.channel.frames import read_step
from monitor.capture.channel.protocol import SenderSettings
from monitor.capture.channel.ring import (
    SLOT_HURRY,
    SLOT_WAITING,
    Frame,
    SharedRing,
    Slot,
    full_fence,
)
from monitor.capture.relay.coalesce import MAX_ROWS, MAX_SEQUENCES, Coalescer
from monitor.capture.relay.encode import RelayFeatureEncoder
from monitor.capture.relay.reader import Reader, StepReader
from monitor.wire import pb, pb_grpc
from monitor.wire.acks import ask_for_acks, offers_acks
from monitor.wire.columns import ColumnarEncoder, offers_columns

log = structlog.get_logger("safety_monitor.capture")
_CONSUMED = int(Slot.CONSUMED)  # an int: see ring.SLOT_WAITING
_MESSAGES = int(Slot.MESSAGES)

# How the relay waits for frames (the producer's half is `FrameWriter._announce`):
#
# - Idle, or when a frame is overdue: it sets WAITING in the ring's header and blocks on the
#   wake-up eventfd, which the producer writes after a publish only while WAITING is set. No
#   CPU while idle; a frame is picked up as soon as it is published.
# - While steps come at a steady pace (a decode loop), waking the relay costs the model's
#   thread a system call per step, and more: a write that wakes a thread on another CPU took
#   ~30 us of the writer's CPU time on this project's 2-vCPU VM (scripts/eventfd_wake_cost.py).
#   So the relay predicts the next frame from the pace so far, blocks (WAITING set: an early
#   frame still wakes it at once) until a little before it is due, then clears WAITING and
#   polls every POLL_INTERVAL until it comes: the producer then finds WAITING clear and makes
#   no system call. A frame later than twice the usual gap ends the polling (blocking again).
POLL_INTERVAL = 0.0005
# Polling starts this long before the predicted frame: a fraction of the gap plus a constant,
# to absorb the steps' jitter (a frame that comes earlier still gets its wake-up).
POLL_AHEAD_FRACTION, POLL_AHEAD = 0.1, 0.0005
ACTIVE_FOR = 0.25  # a gap longer than this is a pause, not a pace
# How long the relay's first sleep after it sets WAITING may last: the fallback for a wake-up
# lost despite the fences (see `FrameSource._wait`), so such a frame waits at most this long.
# With no wake-up fd at all (never from RelayLink) the relay polls the ring at POLL_INTERVAL.
LOST_WAKEUP_BOUND = 0.025
REQUEST_WAIT = 1.0
# A lingering relay looks at the ring at least this often while it knows no step rate yet
# (reading the header: no system call asked of the producer), so a linger cannot let the
# ring fill up before it wakes.
LINGER_POLL = 0.001


class FrameSource:
    """Steps off the ring, in order, waking only when there is one (see the comment above).
    With a doorbell (CPUs that reorder stores), only frames whose doorbell byte has arrived
    are read, and the relay blocks on the doorbell pipe (every frame rings it) instead of the
    wake-up eventfd. `interrupt` wakes a waiting `next` from another relay thread."""

    def __init__(
        self,
        ring: SharedRing,
        doorbell_fd: int | None = None,
        wakeup_fd: int | None = None,
        pace: bool = True,
    ) -> None:
        self.ring = ring
        self.pace = pace  # False: always block until woken (each frame then costs a write)
        # The fds come from the serving process with their numbers (`pass_fds`), which may be
        # over select()'s FD_SETSIZE there: copies under it are taken where the relay has
        # one free (it has few fds open), and `_Readable` waits with poll() otherwise.
        self._owned: list[int] = []
        self.doorbell_fd = self._low(doorbell_fd)
        self.wakeup_fd = None if doorbell_fd is not None else self._low(wakeup_fd)
        self._announced = 0
        self._fence = threading.Lock()
        self._interrupt = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._interrupts = _Readable([self._interrupt])
        waker = self.doorbell_fd if doorbell_fd is not None else self.wakeup_fd
        self._wakers = _Readable([self._interrupt] + ([] if waker is None else [waker]))
        wakeup = [] if self.wakeup_fd is None else [self.wakeup_fd]
        self._lingers = _Readable([self._interrupt, *wakeup])  # see `linger`
        # Whether WAITING was set a whole bounded sleep ago (see `_wait`); with a doorbell
        # every frame rings it, so no sleep needs a bound.
        self._waiting_visible = doorbell_fd is not None
        self._last_frame = -math.inf  # when the last frame was taken (time.monotonic)
        self.gap: float | None = None  # the average gap between frames while they flow
        self.waits = 0  # blocking waits (each ends in one wake-up of this thread)
        self.timeouts = 0  # blocking waits that ended by their timeout, not by a wake-up
        self.polls = 0  # short sleeps while a frame is due

    def next(
        self,
        timeout: float,
        on_bad_frame: Callable[[], None],
        read: Reader | None = read_step,
        pace: bool = True,
    ) -> pb.StepBatch | None:
        """The next step on the ring as a StepBatch (made by `read`), None after `timeout`
        seconds without one (or sooner, after `interrupt`); `on_bad_frame` is called for a
        frame that cannot be read (it is skipped). `pace=False`: the frame does not count
        towards the pace (a lingering relay's later frames, taken in a burst).
        """
        deadline = time.monotonic() + timeout
        slots = self.ring.slots
        while True:
            frame = self._peek()
            if frame is not None:
                if slots[SLOT_WAITING]:
                    slots[SLOT_WAITING] = 0  # busy again: the producer need not write
                if pace:
                    self._taken(time.monotonic())
                if read is None:
                    return frame  # type: ignore[return-value]  # see `wait_for_frame`
                batch = self.take(frame, read, on_bad_frame)
                if batch is None:
                    continue
                return batch
            now = time.monotonic()
            if now >= deadline or self._wait(now, deadline - now):  # timed out, or interrupted
                # Not waiting any more: the producer must not keep writing the eventfd while
                # this relay is elsewhere (reconnecting, say).
                slots[SLOT_WAITING] = 0
                return None

    def wait_for_frame(self, timeout: float) -> Frame | None:
        """`next`, but the frame is left on the ring unread: the caller reads it and releases
        it (`take`). A lingering relay keeps its first frame there until it knows whether
        others join it."""
        return self.next(timeout, lambda: None, None)  # type: ignore[return-value]

    def take(self, frame: Frame, read: Reader, on_bad_frame: Callable[[], None]) -> Any:
        """Read a frame `wait_for_frame` left on the ring, and release it; None (counted by
        `on_bad_frame`) if it cannot be read."""
        try:
            batch = read(self.ring, frame)
        except Exception:
            log.exception("unreadable frame on the capture ring")
            batch = None
        self.ring.release(frame.size)
        if batch is None:
            on_bad_frame()
        return batch

    def linger(self, seconds: float) -> bool:
        """Sleep up to `seconds` with WAITING clear, so the producer makes no system call for
        the frames published meanwhile (they are taken after, in one burst); True if cut
        short by `interrupt` or by the serving process's HURRY (`RelayLink.hurry` writes the
        wake-up eventfd whatever WAITING says). A stray wake-up (a write from before WAITING
        was cleared) sleeps on. With a doorbell there is no such wake-up: it sleeps on."""
        slots = self.ring.slots
        if slots[SLOT_WAITING]:
            slots[SLOT_WAITING] = 0
        deadline = time.monotonic() + seconds
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            ready = self._lingers.wait(remaining)
            if not ready:
                return False
            for fd in ready:
                _drain_eventfd(fd)
            if self._interrupt in ready or slots[SLOT_HURRY]:
                return True

    def interrupt(self) -> None:
        """Wake a `next` that is waiting (from another thread): it returns None."""
        os.eventfd_write(self._interrupt, 1)

    def schedule(self, now: float) -> float | None:
        """How to wait at `now` with the ring empty: None to poll (a frame is due), else block
        for at most that many seconds (math.inf: until woken) before looking again."""
        gap = self.gap
        if (
            not self.pace
            or self.wakeup_fd is None
            or gap is None
            or now - self._last_frame > ACTIVE_FOR
        ):
            return math.inf
        due = self._last_frame + gap
        poll_from = due - POLL_AHEAD_FRACTION * gap - POLL_AHEAD
        if now < poll_from:
            return poll_from - now
        if now < due + gap:
            return None
        return math.inf  # overdue: the pace is broken, wait to be woken

    def _taken(self, now: float) -> None:
        """A frame was taken at `now`: update the pace (an average over the last few gaps)."""
        gap = now - self._last_frame
        if gap <= ACTIVE_FOR:
            # Half the last gap, half the history: a new pace is learnt in two or three steps
            # (each step of a change costs at most one wake-up write), and jitter is damped.
            self.gap = gap if self.gap is None else 0.5 * (gap + self.gap)
        self._last_frame = now

    def _wait(self, now: float, remaining: float) -> bool:
        """Wait until a frame may be there, `remaining` seconds at most; True if interrupted."""
        slots = self.ring.slots
        block = self.schedule(now)
        if block is None or (self.wakeup_fd is None and self.doorbell_fd is None):
            if slots[SLOT_WAITING]:
                slots[SLOT_WAITING] = 0  # due: the producer need not wake us
            self.polls += 1
            if self._interrupts.wait(min(POLL_INTERVAL, remaining)):
                _drain_eventfd(self._interrupt)
                return True
            return False
        remaining = min(remaining, block)
        if self.wakeup_fd is not None and not slots[SLOT_WAITING]:
            slots[SLOT_WAITING] = 1
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
        if not self._waiting_visible:
            remaining = min(remaining, LOST_WAKEUP_BOUND)
        self.waits += 1
        ready = self._wakers.wait(remaining)
        if not ready:
            self.timeouts += 1
            # A whole bounded sleep since WAITING was set: the producer sees it by now.
            self._waiting_visible = self.wakeup_fd is not None or self.doorbell_fd is not None
            return False
        interrupted = False
        for fd in ready:
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
        """Release the interrupt eventfd (and the low copies of the passed fds)."""
        os.close(self._interrupt)
        for fd in self._owned:
            os.close(fd)
        self._owned.clear()

    def _low(self, fd: int | None) -> int | None:
        """`fd`, or a copy of it numbered under FD_SETSIZE if it is not and one is free."""
        if fd is None or fd < FD_SETSIZE:
            return fd
        copy = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 0)  # the lowest free number
        if copy >= FD_SETSIZE:
            os.close(copy)
            return fd
        self._owned.append(copy)
        return copy

    def _peek(self) -> Frame | None:
        if self.doorbell_fd is not None:
            with contextlib.suppress(BlockingIOError):
                self._announced += len(os.read(self.doorbell_fd, 65536))
            if self.ring.slots[_CONSUMED] >= self._announced:
                return None
        return self.ring.peek()


# select() takes fd numbers below this only (glibc's fd_set); poll() has no such limit.
FD_SETSIZE = 1024


class _Readable:
    """Waits until one of `fds` is readable. select() where every fd number allows it: its
    timeout has microseconds (the pace's short sleeps), poll()'s whole milliseconds. poll()
    otherwise, its timeout rounded up to whole milliseconds; a wait under 1 ms (POLL_INTERVAL)
    is a plain sleep and a look, so polling keeps its interval (a wake-up or interrupt during
    that sleep is seen when it ends, less than 1 ms later)."""

    def __init__(self, fds: list[int]) -> None:
        self.fds = fds
        self._poll: select.poll | None = None
        if max(fds) >= FD_SETSIZE:
            self._poll = select.poll()
            for fd in fds:
                self._poll.register(fd, select.POLLIN)

    def wait(self, timeout: float) -> list[int]:
        """The fds readable within `timeout` seconds (at EOF or in error count as readable,
        as for select()); empty after the timeout."""
        if self._poll is None:
            return select.select(self.fds, (), (), timeout)[0]
        if timeout < 0.001:
            time.sleep(timeout)
            timeout = 0.0
        return [fd for fd, _ in self._poll.poll(math.ceil(timeout * 1000))]


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
        # seq_no -> (steps, rows): a message holds several steps with a linger, and every
        # counter the serving process reads (sent, acked, lost...) counts steps, as it
        # publishes them (`RelayLink.unsettled`).
        self.inflight: dict[int, tuple[int, int]] = {}
        self._lock = threading.Lock()
        self._seq_no = itertools.count(1)
        # The Monitor call's metadata: the settings', plus the request for `Acks` events
        # when the sidecar offers them (set by `_negotiate` before each stream).
        self.stream_metadata: tuple[tuple[str, str], ...] = tuple(settings.metadata)
        # The limits the sidecar advertised in GetStatus (None: unknown), which bound a merged
        # message (set by `_negotiate` before each stream).
        self.sidecar_limits: pb.Limits | None = None
        # Local encoding in the relay (relay/encode.py): kept across streams, so the pack is
        # loaded once per relay process, on a thread of its own from now on.
        self.features: RelayFeatureEncoder | None = None
        if settings.encode_pack:
            self.features = RelayFeatureEncoder(
                settings.encode_pack,
                settings.encode_pack_sha256,
                settings.encode_hook_points,
                on_state=self._encoder_state,
            )
            self.features.start()

    def _encoder_state(self, state: int) -> None:
        self.ring.slots[Slot.ENCODER] = state

    # ---- counters (any relay thread) ---------------------------------------------------------

    def count(self, slot: Slot, amount: int = 1) -> None:
        """Add `amount` to a counter in the ring's header."""
        with self._lock:
            self.ring.slots[slot] += amount

    def settle(self, seq_no: int, rejected: bool) -> None:
        """A batch was acked or rejected: count it (the steps it holds, and their rows when
        acked) and forget it."""
        with self._lock:
            entry = self.inflight.pop(seq_no, None)
            if entry is None:
                return
            steps, rows = entry
            if rejected:
                self.ring.slots[Slot.REJECTED] += steps
            else:
                self.ring.slots[Slot.ROWS_ACKED] += rows
                self.ring.slots[Slot.ACKED] += steps

    def settle_acked(self, seq_nos: Iterable[int]) -> None:
        """`settle` for several acked batches at once (an `Acks` event): one lock."""
        with self._lock:
            inflight, slots = self.inflight, self.ring.slots
            acked = rows = 0
            for seq_no in seq_nos:
                entry = inflight.pop(seq_no, None)
                if entry is not None:
                    acked += entry[0]
                    rows += entry[1]
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
                self.source.interrupt()  # gRPC's request thread may be waiting for a frame
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
        self.sidecar_limits = None
        try:
            status = stub.GetStatus(
                pb.StatusRequest(),
                metadata=self.settings.metadata,
                timeout=self.settings.connect_timeout,
            )
        except grpc.RpcError as exc:
            log.warning("GetStatus failed; sending Sequence messages", code=str(exc.code()))
            return None
        if status.HasField("limits"):
            self.sidecar_limits = status.limits
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
        if self.settings.linger_ms > 0:
            yield from self._lingering_requests(alive, stopping, encoder)
            return
        bad_frame = lambda: self.count(Slot.LOST_BAD_FRAME)  # noqa: E731
        # The model name is set and the encoder applied as each frame is read; the reader
        # keeps a decode loop's encoded message to reuse (relay/reader.py).
        reader = StepReader(self.settings.model_name, encoder, self.features)
        while alive.is_set() and not (stopping.is_set() and self.ring.frames_waiting() == 0):
            # Stopping and a broken stream interrupt the wait, so it can be long: an idle
            # relay wakes once per REQUEST_WAIT.
            batch = self.source.next(REQUEST_WAIT, bad_frame, reader.read)
            if batch is None:
                continue
            if not self._stamp(batch, 1, reader.rows, alive):
                return
            yield batch

    def _stamp(self, batch: pb.StepBatch, steps: int, rows: int, alive: threading.Event) -> bool:
        """Number the batch, time it and count it in flight; False (its steps counted as
        lost) when the stream is already gone."""
        seq_no = next(self._seq_no)
        batch.seq_no = seq_no
        # Not Timestamp.GetCurrentTime: that goes through datetime, 4 us against 0.6.
        stamp = batch.sent_at
        stamp.seconds, stamp.nanos = divmod(time.time_ns(), 1_000_000_000)
        with self._lock:
            if not alive.is_set():
                self.ring.slots[Slot.LOST_DISCONNECTED] += steps
                return False
            self.inflight[seq_no] = (steps, rows)
            self.ring.slots[Slot.SENT] += steps
            self.ring.slots[_MESSAGES] += 1
        return True

    def _lingering_requests(
        self,
        alive: threading.Event,
        stopping: threading.Event,
        encoder: ColumnarEncoder | None,
    ) -> Iterator[pb.StepBatch]:
        """`_requests` with a linger: after the first step, the steps published within
        `linger_ms` go into the same message (relay/coalesce.py) until one cannot join or a
        bound is reached. The relay sleeps through the linger (`FrameSource.linger`: no
        wake-up per step, none asked of the producer) and then takes the steps that came in
        one burst; while the serving process waits for verdicts (Slot.HURRY) it does not
        sleep, and only steps already on the ring join. The first step stays on the ring
        through the linger: left alone, it is read as without a linger (`StepReader`, which
        reuses a decode loop's encoded message); merged steps are read in full (`read_step`)
        and the merged message is encoded once. The linger ends early once about half of the
        client's `queue_size` (or of MAX_FRAMES) or of the ring's bytes wait: a linger must not
        drop (fail-open) or hold back (fail-closed) a step that no linger would."""
        bad_frame = lambda: self.count(Slot.LOST_BAD_FRAME)  # noqa: E731
        reader = StepReader(
            self.settings.model_name, encoder, self.features
        )  # for a step left alone
        # Steps that may be merged are encoded one by one as they are read, before merging:
        # encoding a merged message would put several steps' rows in one GEMM, whose
        # rounding depends on the row count, so the values would not be the hook's. Encoded,
        # they carry feature blocks and go one per message, as the hook's steps do.
        read_one = read_step if self.features is None else self._read_and_encode
        linger = self.settings.linger_ms / 1000
        merged = self._coalescer()
        # Wake before about half the ring (steps or bytes) is taken, whatever the linger.
        frames_bound = max(1, min(self.settings.queue_size, merged.max_frames) // 2)
        bytes_bound = self.ring.capacity // 2
        step_bytes = 0  # bytes per step on the ring in the last linger
        slots = self.ring.slots
        source = self.source
        left_over: pb.StepBatch | None = None  # a step that could not join the last message
        step_gap: float | None = None  # seconds between steps in the last linger
        try:
            while alive.is_set() and not (
                stopping.is_set() and left_over is None and self.ring.frames_waiting() == 0
            ):
                peeked = None
                if left_over is not None:
                    first, left_over = left_over, None
                else:
                    # Left on the ring until the linger is over: alone, it is read as without
                    # a linger (the reader reuses a decode loop's encoded message).
                    peeked = source.wait_for_frame(REQUEST_WAIT)
                    if peeked is None:
                        continue
                # Sleep through the linger, waking only to keep the ring from filling up:
                # when about half the frames or bytes it may hold wait, looking at the step
                # rate and size of the last linger (every LINGER_POLL before one is known),
                # then take what came.
                started = time.monotonic()
                deadline = started + linger
                # Steps the relay encodes carry feature blocks, which never merge: lingering
                # would only hold each one back, so they go as they come.
                encoding = self.features is not None and self.features.ready
                while not encoding and not slots[SLOT_HURRY] and not stopping.is_set():
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or self._ring_half_full(frames_bound, bytes_bound):
                        break
                    if step_gap is None:
                        remaining = min(remaining, LINGER_POLL)
                    else:
                        room = frames_bound
                        if step_bytes:
                            room = min(room, max(1, bytes_bound // step_bytes))
                        remaining = min(remaining, max(LINGER_POLL, step_gap * room / 2))
                    if source.linger(remaining):
                        break
                waiting = self.ring.frames_waiting() - (peeked is not None)
                if waiting:
                    step_gap = (time.monotonic() - started) / waiting
                    step_bytes = max(1, self._ring_bytes() // (waiting + (peeked is not None)))
                if peeked is not None:
                    if not waiting:  # alone: as without a linger
                        batch = source.take(peeked, reader.read, bad_frame)
                        if batch is None:
                            continue
                        if not self._stamp(batch, 1, reader.rows, alive):
                            return
                        yield batch
                        continue
                    first = source.take(peeked, read_one, bad_frame)
                    if first is None:
                        continue
                merged.add(first)
                while not merged.full and self.ring.frames_waiting():
                    step = source.next(0.0, bad_frame, read_one, pace=False)
                    if step is None:
                        break
                    if not merged.add(step):
                        left_over = step
                        break
                batch, steps = merged.take()
                batch.model = self.settings.model_name
                rows = sum(sequence.rows for sequence in batch.sequences)
                if encoder is not None:
                    encoder.encode(batch)
                if not self._stamp(batch, steps, rows, alive):
                    return
                yield batch
        finally:
            # A step taken off the ring and never sent must still be settled, or the serving
            # process would count it unsettled for ever (its flush would wait in vain).
            if left_over is not None or merged.frames:
                self.count(Slot.LOST_DISCONNECTED, merged.frames + (left_over is not None))

    def _read_and_encode(self, ring: SharedRing, frame: Frame) -> pb.StepBatch:
        """`read_step`, then the relay's local encoding (`features`)."""
        batch = read_step(ring, frame)
        self.features.apply(batch)  # type: ignore[union-attr]
        return batch

    def _coalescer(self) -> Coalescer:
        """A Coalescer whose merged messages the sidecar accepts wherever it accepts their
        steps one by one: its own bounds, lowered to the limits the sidecar advertised (rows and
        sequences per batch, conversations tracked at once, message bytes). Bytes count
        tensor data only, so a merged message stays at half the smaller message limit, leaving
        room for token text and the rest (a step alone may exceed that)."""
        rows, sequences = MAX_ROWS, MAX_SEQUENCES
        message_bytes = self.settings.max_message_bytes
        limits = self.sidecar_limits
        if limits is not None:  # 0: not advertised
            rows = min(rows, limits.max_rows_per_batch or rows)
            for limit in (limits.max_sequences_per_batch, limits.max_conversations):
                sequences = min(sequences, limit or sequences)
            message_bytes = min(message_bytes, limits.max_message_bytes or message_bytes)
        return Coalescer(max_rows=rows, max_bytes=message_bytes // 2, max_sequences=sequences)

    def _ring_bytes(self) -> int:
        """Bytes of the ring taken by frames not yet released (padding included)."""
        slots = self.ring.slots
        return slots[Slot.HEAD] - slots[Slot.TAIL]

    def _ring_half_full(self, frames: int, nbytes: int) -> bool:
        return self.ring.frames_waiting() >= frames or self._ring_bytes() >= nbytes

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
            lost = sum(steps for steps, _ in self.inflight.values())
            self.inflight.clear()
            self.ring.slots[Slot.LOST_DISCONNECTED] += lost

    def _drop_waiting_while_down(self) -> None:
        """Fail-open must not keep stale steps waiting while the sidecar is unreachable; a
        fail-closed client keeps them (its model waits for room on the ring anyway)."""
        if self.settings.fail_closed:
            return
        self.count(Slot.LOST_UNAVAILABLE, self.source.discard_waiting())
