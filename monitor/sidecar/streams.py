"""What one Monitor stream may hold, and for how long: the admission, byte and idle limits of
the gRPC server, kept apart from the servicer so they read (and test) on their own.

- `StreamGate`: at most `max_streams` streams open at once; the next one is refused with
  RESOURCE_EXHAUSTED before anything of it is read.
- `StreamBudget`: the batches one stream holds (read ahead and being processed) are bounded
  in count (`grouping.READ_AHEAD`) and in bytes (`max_stream_bytes`, one batch always admitted). A
  client faster than the sidecar, or one that never reads its acks, is then held back by
  gRPC flow control rather than by the sidecar's memory.
- Idle streams: a stream that sends no batch, or takes no event, for
  `stream_idle_timeout_seconds` is closed by the servicer (DEADLINE_EXCEEDED).
- `give_memory_back`: after a stream that held large messages ends, the C allocator is asked
  to return free memory to the system (glibc keeps freed arenas otherwise).
- Decoding: a message that is not a valid protobuf becomes `UNDECODABLE`, which the
  servicer answers with INVALID_ARGUMENT (not gRPC's UNKNOWN with a Python class name).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from typing import Any, Final, TypeVar

import structlog
from google.protobuf.message import DecodeError, Message

log = structlog.get_logger("safety_monitor.streams")
T = TypeVar("T")

# Streams that held less than this never trigger a trim: nothing worth giving back.
TRIM_AFTER_BYTES = 8 * 1024 * 1024


class _Undecodable:
    """Stands in for a message that did not parse; never a protobuf."""

    def __repr__(self) -> str:
        return "UNDECODABLE"


UNDECODABLE: Final = _Undecodable()

# Stream messages larger than this are parsed off the event loop (see server._read_into).
PARSE_INLINE_BYTES = 1024 * 1024

# Batches of one stream that arrived together, with at most `INLINE_ROWS` rows (the most its
# layers or feature blocks hold, or without layers what its sequences claim) and `INLINE_SEQUENCES`
# sequences in all, are processed on the event loop itself when the
# stream keeps up and the pipeline thread has nothing to do. The hand-off to that thread and
# back (two context switches, a wake-up of the loop, the GIL passed between two threads that
# both run Python) costs as much CPU as a decode step's work. The bound is on rows and
# sequences, not bytes: a 64-conversation decode step of a d_model 2304 model is ~295 KB of
# BF16, and its work (a small matrix multiply, the rules on 64 rows) is a light step's; with
# a 64 KiB bound no decode step of such a model ever ran inline, and at a few hundred steps a
# second every one paid the hand-off (the send-to-ack tail of `bench sidecar`).
# `INLINE_BYTES` still caps what an inline run may hold (messages and decoded activations:
# wide or many-layer models), the work is bounded by timing each run (`InlineBudget`), and a
# pipeline that may block (an audit store's commit) never runs inline (`Pipeline.may_block`).
INLINE_ROWS = 128
INLINE_SEQUENCES = 128
INLINE_BYTES = 4 * 1024 * 1024
# Batches of client-encoded features (`StepBatch.features`, encode_locally) have no layers to
# decode: their bytes are the feature values themselves, a few per row, so the old 64 KiB
# bound still fits a 128-row step of a hundred features (float32) and keeps 4 MiB of values
# (170,000 rows of six features) off the event loop even if the rows a batch claims are
# wrong (validation rejects it later, on whichever thread it runs).
INLINE_FEATURE_BYTES = 64 * 1024
# A stream whose next batch was already waiting this many times in a row when the loop came
# back for it is behind: its batches go to the pipeline thread, where the loop reads ahead
# meanwhile and waiting steps group. Once is not enough: after an inline step the next step
# of a stream that keeps up has often arrived while the ack was written (a step every
# 2.6 ms at 390 steps/s, about 1 ms of work each); sent to the pipeline thread for that, it
# pays the hand-off and the loop reads ahead behind it, so the next one is waiting too. In
# a traced run on a busy machine, with "once", only 917 of 3,124 decode steps ran inline,
# 555 of the others alone on the pipeline thread; with 8, 351 of the first second's 392.
# Without the count (small steps inline even when behind) decode steps back to back cost
# less (1.38 against 1.66 ms of CPU a step, one side-by-side run), but a stream that is
# behind then has no read-ahead and one ack write per step, and paced runs on a busy
# machine fell further behind than main's; grouped on the pipeline thread, they catch up
# as before.
INLINE_BEHIND = 8


def small_batches(held: Sequence[tuple[Any, int, tuple[Any, ...]]]) -> bool:
    """Whether the batches in `held` (each with the bytes it holds and its decoded layers,
    if any) are small enough, together, to process inline: few rows, few sequences, bounded
    bytes (tighter for batches of client-encoded features, `INLINE_FEATURE_BYTES`)."""
    total_bytes = feature_bytes = total_sequences = total_rows = 0
    for batch, held_bytes, decoded in held:
        total_bytes += held_bytes
        if batch.features:
            feature_bytes += held_bytes
        columns = batch.columns
        total_sequences += len(batch.sequences) + len(columns.slot) + len(columns.define)
        if total_sequences > INLINE_SEQUENCES:
            return False  # before the rows are summed: that walks every sequence
        total_rows += _rows(batch, decoded)
    return (
        total_bytes <= INLINE_BYTES
        and feature_bytes <= INLINE_FEATURE_BYTES
        and total_rows <= INLINE_ROWS
    )


# A group of waiting batches (service.py) takes no more once it holds this many rows. The
# rules engine's cost is mostly per call, so grouping pays for small steps, but past a few
# hundred rows per call it saves next to nothing, while merging batches copies all their
# activations (`grouping.merge_steps`) and every member's ack waits for the whole group.
# Prefill-sized batches (512 rows each) went through mostly in groups, each merged before
# its encode; alone, each needs no merge and its ack goes out as it is done (README, "Not
# there yet", issue 15: the worker's CPU per 512-row message fell by about a fifth, with
# the BF16 to float32 copy also moved to the parse thread, `validate.decode_layers`).
# 512 is eight 64-row decode steps: `grouping.MAX_GROUP` of them, as before.
GROUP_ROWS = 512


def batch_rows(batch: Any, decoded: tuple[Any, ...]) -> int:
    """The most rows a batch's data claims (its first layer's, decoded or as the message
    says, and its feature blocks'; without layers, what its sequences claim), from what the
    reader put in the stream's queue, without validating it."""
    return _rows(batch, decoded)


def _rows(batch: Any, decoded: tuple[Any, ...]) -> int:
    """The most rows a batch's data claims: its first layer's (decoded or as the message
    says) and its feature blocks'. A batch without layers (client-encoded features) also
    counts the rows its sequences claim, so it is not taken for an empty one. With a layer,
    the sequences' rows are not summed (that walks every sequence, ~30 us for a 64-sequence
    step on the loop): validation rejects a batch whose sequences claim other rows than its
    layers before any work that scales with them."""
    rows = -1
    for tensor in decoded:
        if tensor is not None:
            rows = int(tensor.shape[0])
            break
    else:
        for layer in batch.layers:
            shape = layer.activations.shape
            rows = int(shape[0]) if shape else 0
            break
    if rows < 0:  # no layer says how many rows: what the sequences claim
        rows = sum(sequence.rows for sequence in batch.sequences) + sum(batch.columns.rows)
    for block in batch.features:
        shape = block.values.shape
        rows = max(rows, int(shape[0]) if shape else 0)
    return rows


def parse_batch(data: bytes) -> Any:
    """A StepBatch from its bytes, or `UNDECODABLE`."""
    from monitor.wire import pb

    try:
        return pb.StepBatch.FromString(data)
    except (DecodeError, ValueError, RuntimeError):
        return UNDECODABLE


def tolerant_deserializer(message_type: type[Message]) -> Callable[[bytes], Any]:
    """A request deserializer that returns `UNDECODABLE` instead of raising, so the servicer
    can answer INVALID_ARGUMENT with a message of its own."""

    def deserialize(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except (DecodeError, ValueError, RuntimeError):
            return UNDECODABLE

    return deserialize


class StreamGate:
    """Counts open Monitor streams against `max_streams`."""

    def __init__(self, max_streams: int) -> None:
        self.max_streams = max_streams
        self.open = 0

    def admit(self) -> bool:
        """Take a place for a new stream; False when all are taken."""
        if self.open >= self.max_streams:
            return False
        self.open += 1
        return True

    def leave(self) -> None:
        self.open -= 1


class StreamBudget:
    """Batches one stream holds, bounded in count and in bytes. The reader waits for room
    before reading the next message; a batch is given back once its events are out."""

    def __init__(self, max_batches: int, max_bytes: int) -> None:
        self.max_batches = max_batches
        self.max_bytes = max_bytes
        self.batches = 0
        self.bytes = 0
        self.peak_bytes = 0
        self._changed = asyncio.Condition()

    async def wait_for_room(self) -> None:
        """Until one more batch may be read: fewer than `max_batches` held and fewer than
        `max_bytes`. A held batch counts its message and its decoded activations (a copy of
        the message's activation bytes, `add_bytes`), so a stream holds at most `max_bytes`
        plus one message and its decoded activations; an activation-heavy stream reads
        ahead about half as many bytes of messages as `max_bytes`."""
        if self.batches < self.max_batches and self.bytes < self.max_bytes:
            return  # the usual case: room now, no lock to take (one event loop: no race)
        async with self._changed:
            await self._changed.wait_for(
                lambda: self.batches < self.max_batches and self.bytes < self.max_bytes
            )

    def hold(self, size: int) -> None:
        self.batches += 1
        self.bytes += size
        self.peak_bytes = max(self.peak_bytes, self.bytes)

    def add_bytes(self, size: int) -> None:
        """A held batch takes `size` bytes more (its decoded activations)."""
        self.bytes += size
        self.peak_bytes = max(self.peak_bytes, self.bytes)

    async def release(self, size: int, batches: int = 1) -> None:
        """Give back `batches` processed batches of `size` bytes in all."""
        async with self._changed:
            self.batches -= batches
            self.bytes -= size
            self._changed.notify_all()


class PipelineWorker:
    """The single pipeline thread (`executor`, one worker) and whether it has work: the
    event loop may run a small batch itself only while no job is queued or running there,
    or the two would touch rule state at once. Three counters, each written by one thread
    only (jobs submitted, on the loop; jobs finished, on the worker, as a job's last step;
    queued jobs cancelled before they ran, on the loop, which is where asyncio cancels
    them), so no update is lost and "idle" is never seen before the last job has finished
    or been dropped from the queue."""

    def __init__(self, executor: Executor) -> None:
        self.executor = executor
        self.submitted = 0
        self.finished = 0
        self.cancelled = 0

    @property
    def idle(self) -> bool:
        """No job queued or running on the pipeline thread (call on the event loop)."""
        return self.finished + self.cancelled == self.submitted

    async def run(self, func: Callable[..., T], *args: Any) -> T:
        """`func(*args)` on the pipeline thread; its result or exception."""
        job = self.executor.submit(self._job, func, args)
        self.submitted += 1  # once queued: a refused job (shut down) never makes it busy
        # A job still queued when its caller is cancelled (client gone, deadline) never runs,
        # so `_job` never counts it: count it here. asyncio cancels the queued job from the
        # loop (`wrap_future`), and a cancel runs the done callbacks in the cancelling
        # thread, so this counter, too, is written on the loop only. A job that ran or is
        # running is counted by `_job` and not here (`cancelled()` is False for it).
        job.add_done_callback(self._count_cancelled)
        return await asyncio.wrap_future(job)

    def _count_cancelled(self, job: Future[Any]) -> None:
        if job.cancelled():
            self.cancelled += 1

    def _job(self, func: Callable[..., T], args: tuple[Any, ...]) -> T:
        try:
            return func(*args)
        finally:
            self.finished += 1  # the worker's last touch of the pipeline for this job


# Inline runs (see `small_batches`) over this much CPU turn the inline path off for
# INLINE_PAUSE seconds: the row bound says nothing of the work (wide packs, hundreds of
# rules, a state eviction sweep), and everything else on the event loop waits meanwhile.
# Two runs in a row over the budget, or one over INLINE_FAR_OVER times it, do: one run a
# little over is noise (a young-generation garbage collection, a cold cache), and at a few
# hundred steps a second each needless pause sent a second of steps through the dearer
# hand-off. Runs are timed in the loop thread's CPU time, not wall time: a thread preempted
# by another process has not done more work, and handing the steps to the pipeline thread
# would not make them wait less (it is preempted as well); wall time pauses only far over
# (`INLINE_WALL_FAR_OVER`). Work that is always slow then holds the loop twice per pause at
# most.
INLINE_BUDGET = 0.002
INLINE_FAR_OVER = 4.0
# CPU time misses the loop held without running: waiting for the GIL (relay, recorder and
# gRPC threads), for torch's intra-op threads, in a blocking write (a log line to a full
# pipe). A run that held the loop this many times the budget in wall time pauses the inline
# path whatever its CPU time. Far over, not just over: a preempted thread on a busy machine
# loses a scheduler slice (a few ms) without doing more work, and that alone must not pause.
INLINE_WALL_FAR_OVER = 16.0
INLINE_PAUSE = 1.0
LOG_PAUSES_EVERY = 60.0  # seconds between two log lines about pauses


class InlineBudget:
    """Whether the event loop may still run small batches itself: not for `pause` seconds
    after two runs in a row that took more than `budget` seconds of CPU each, one that
    took more than `INLINE_FAR_OVER` times it, or one that held the loop more than
    `INLINE_WALL_FAR_OVER` times it in wall time (then they go to the pipeline thread,
    where a slow step delays only its own stream). Used on the event loop only."""

    def __init__(self, budget: float = INLINE_BUDGET, pause: float = INLINE_PAUSE) -> None:
        self.budget = budget
        self.pause = pause
        self.paused_until = -math.inf
        self.pauses = 0  # how many times slow runs turned the inline path off
        self._over = False  # whether the last run was over the budget
        self._logged = -math.inf

    def allowed(self, now: float) -> bool:
        """Whether a small batch may run inline at `now` (`time.perf_counter`)."""
        return now >= self.paused_until

    def ran(self, seconds: float, now: float, wall: float = 0.0) -> None:
        """An inline run took `seconds` of the loop thread's CPU (`time.thread_time`) and
        `wall` seconds of wall time, ending at `now` (`time.perf_counter`); too long pauses
        the inline path."""
        if wall > self.budget * INLINE_WALL_FAR_OVER:
            self._pause(seconds, wall, now)
            return
        if seconds <= self.budget:
            self._over = False
            return
        if not self._over and seconds <= self.budget * INLINE_FAR_OVER:
            self._over = True  # once is noise; the next run decides
            return
        self._pause(seconds, wall, now)

    def _pause(self, seconds: float, wall: float, now: float) -> None:
        self._over = False
        self.paused_until = now + self.pause
        self.pauses += 1
        if now - self._logged >= LOG_PAUSES_EVERY:
            self._logged = now
            log.info(
                "inline steps paused: they took too long on the event loop",
                run_cpu_ms=round(seconds * 1000, 2),
                run_wall_ms=round(wall * 1000, 2),
                budget_ms=self.budget * 1000,
                pause_seconds=self.pause,
                pauses=self.pauses,
            )


# OS-level names of the sidecar's own threads (`top -H`, /proc/PID/task/TID/comm, at most
# 15 characters): `bench sidecar` splits the process's CPU by them.
PIPELINE_THREAD = "sm-pipeline"
PARSE_THREAD = "sm-parse"


def name_os_thread(name: str) -> None:
    """Give the calling thread `name` at the OS level (Linux `prctl(PR_SET_NAME)`; a no-op
    elsewhere). Python's thread names stay inside Python; this one shows in `top -H`."""
    if _PRCTL is not None:
        _PRCTL(15, name.encode()[:15], 0, 0, 0)  # 15: PR_SET_NAME


def _prctl() -> Callable[..., int] | None:
    try:
        prctl = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).prctl
    except (OSError, AttributeError, TypeError):
        return None
    prctl.restype = ctypes.c_int
    return prctl  # type: ignore[no-any-return]


_PRCTL = _prctl()
_trim_lock = threading.Lock()


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc: nothing to call
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_TRIM = _malloc_trim()


def give_memory_back(held_bytes: int) -> None:
    """Return the allocator's free memory to the system after a stream that held
    `held_bytes` at its peak (a no-op for small streams and where there is no malloc_trim).
    Run it off the event loop, after the stream's batches were processed."""
    if _TRIM is None or held_bytes < TRIM_AFTER_BYTES:
        return
    if not _trim_lock.acquire(blocking=False):  # one trim at a time is enough
        return
    try:
        started = time.perf_counter()
        _TRIM(0)
        log.info(
            "memory returned to the system",
            after_stream_bytes=held_bytes,
            trim_ms=round((time.perf_counter() - started) * 1000, 1),
        )
    finally:
        _trim_lock.release()
