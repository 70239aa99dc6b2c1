"""The sidecar's inline path and its guards on the event loop side: what is small enough
(rows and sequences), the pipeline worker's idle count survives a job cancelled while
queued, and the inline budget turns the inline path off after slow runs."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from monitor.sidecar import streams
from monitor.sidecar.streams import INLINE_FAR_OVER, InlineBudget, PipelineWorker, small_batches
from monitor.wire import encode_tensor, pb


async def _until(condition, limit: float = 30.0) -> None:
    """Yield to the loop until `condition()` holds (at most `limit` seconds)."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.001)


def test_a_job_cancelled_in_the_queue_leaves_the_worker_idle_afterwards():
    """A stream's handler cancelled while its job still waits behind another (client gone)
    must not leave `idle` False for good: the inline path would never be taken again."""

    async def scenario() -> tuple[int, int, int, bool]:
        executor = ThreadPoolExecutor(1)
        worker = PipelineWorker(executor)
        running, gate = threading.Event(), threading.Event()

        def hold() -> str:
            running.set()
            assert gate.wait(30)
            return "held"

        try:
            first = asyncio.ensure_future(worker.run(hold))
            await _until(running.is_set)
            ran: list[str] = []
            second = asyncio.ensure_future(worker.run(lambda: ran.append("ran")))
            await _until(lambda: worker.submitted == 2)
            assert not worker.idle
            second.cancel()  # the stream's handler is cancelled while its job is queued
            await asyncio.gather(second, return_exceptions=True)
            gate.set()
            assert await first == "held"
            await _until(lambda: worker.finished == 1)
            assert ran == []  # the cancelled job never ran
            # The job that ran and the one cancelled in the queue are both counted.
            return worker.submitted, worker.finished, worker.cancelled, worker.idle
        finally:
            gate.set()
            executor.shutdown(wait=True)

    assert asyncio.run(scenario()) == (2, 1, 1, True)


def test_a_job_cancelled_while_running_is_counted_once_when_it_ends():
    """Cancelling the caller of a job already running does not stop the job: it is counted
    as finished (by the worker), not as cancelled, so `idle` turns True only once it ends."""

    async def scenario() -> tuple[bool, tuple[int, int, int, bool]]:
        executor = ThreadPoolExecutor(1)
        worker = PipelineWorker(executor)
        running, gate = threading.Event(), threading.Event()

        def hold() -> None:
            running.set()
            assert gate.wait(30)

        try:
            task = asyncio.ensure_future(worker.run(hold))
            await _until(running.is_set)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            busy_while_running = not worker.idle
            gate.set()
            await _until(lambda: worker.finished == 1)
            return busy_while_running, (
                worker.submitted,
                worker.finished,
                worker.cancelled,
                worker.idle,
            )
        finally:
            gate.set()
            executor.shutdown(wait=True)

    assert asyncio.run(scenario()) == (True, (1, 1, 0, True))


def test_slow_inline_runs_pause_the_inline_path_for_a_while():
    budget = InlineBudget(budget=0.002, pause=10.0)
    assert budget.allowed(100.0)
    budget.ran(0.0015, 100.0)  # within budget
    assert budget.allowed(100.0) and budget.pauses == 0
    budget.ran(0.004, 100.0)  # over once: noise (a collection, a cold cache), no pause yet
    assert budget.allowed(100.0) and budget.pauses == 0
    budget.ran(0.004, 100.0)  # over twice in a row: no inline runs for 10 s
    assert budget.pauses == 1
    assert not budget.allowed(100.0) and not budget.allowed(109.9)
    assert budget.allowed(110.0)


def test_a_run_over_the_budget_once_between_fast_ones_never_pauses():
    budget = InlineBudget(budget=0.002, pause=10.0)
    for _ in range(5):
        budget.ran(0.005, 100.0)
        budget.ran(0.001, 100.0)
    assert budget.pauses == 0 and budget.allowed(100.0)


def test_a_run_far_over_the_budget_pauses_at_once():
    budget = InlineBudget(budget=0.002, pause=10.0)
    budget.ran(0.002 * INLINE_FAR_OVER + 0.001, 100.0)
    assert budget.pauses == 1 and not budget.allowed(105.0)


def _step(rows: int, width: int = 8, conversations: int | None = None) -> pb.StepBatch:
    batch = pb.StepBatch(seq_no=1, model="m")
    batch.layers.append(
        pb.Layer(hook_point="layers.1", activations=encode_tensor(torch.zeros(rows, width)))
    )
    count = rows if conversations is None else conversations
    for c in range(count):
        batch.sequences.append(pb.Sequence(conversation_id=f"c{c}", rows=rows // count))
    return batch


def test_the_inline_bound_is_on_rows_and_sequences_not_the_message_bytes():
    """A 64-conversation decode step of a wide model (~295 KB at d_model 2304, BF16) runs
    inline; so do two of them together; three, or a step of more rows, or one holding more
    than the byte cap, do not."""
    step = _step(64, width=2304)
    size = step.ByteSize()
    assert size > 256 * 1024  # the old byte bound (64 KiB) kept every such step off the loop
    assert small_batches([(step, size, ())])
    assert small_batches([(step, size, ()), (step, size, ())])
    assert not small_batches([(step, size, ())] * 3)  # 192 rows: the pipeline thread groups
    wide = _step(streams.INLINE_ROWS + 1, conversations=1)
    assert not small_batches([(wide, wide.ByteSize(), ())])
    assert not small_batches([(step, streams.INLINE_BYTES + 1, ())])
    many = _step(streams.INLINE_SEQUENCES + 1)  # one row each, but too many sequences
    assert not small_batches([(many, many.ByteSize(), ())])


def test_the_inline_rows_come_from_the_decoded_layers_when_there_are_some():
    step = _step(4)  # the message says 4 rows
    decoded = (torch.zeros(streams.INLINE_ROWS + 1, 8),)
    assert small_batches([(step, step.ByteSize(), ())])
    assert not small_batches([(step, step.ByteSize(), decoded)])


def _encoded(rows: int, claimed: int | None = None, columns: int = 6) -> pb.StepBatch:
    """A client-encoded step (encode_locally): a feature block, no layers; its one
    sequence claims `claimed` rows (default: as many as the block holds)."""
    batch = pb.StepBatch(seq_no=1, model="m")
    batch.features.append(
        pb.FeatureBlock(
            pack="p",
            pack_sha256="0" * 64,
            hook_point="layers.1",
            values=encode_tensor(torch.zeros(rows, columns)),
        )
    )
    batch.sequences.append(
        pb.Sequence(conversation_id="c", rows=rows if claimed is None else claimed)
    )
    return batch


def test_a_client_encoded_step_is_bounded_by_its_rows_though_it_has_no_layers():
    """Without layers, the rows come from the sequences and the feature blocks: the review's
    repro (170,000 rows of six features in 128 sequences, 4 MB) is not small; a decode step
    of client-encoded features is."""
    step = _encoded(4)
    assert small_batches([(step, step.ByteSize(), ())])
    huge = pb.StepBatch(seq_no=1, model="m")
    huge.features.append(
        pb.FeatureBlock(
            pack="p", hook_point="layers.1", values=encode_tensor(torch.zeros(172762, 6))
        )
    )
    for c in range(128):
        huge.sequences.append(pb.Sequence(conversation_id=f"c{c}", rows=1349))
    assert not small_batches([(huge, huge.ByteSize(), ())])
    over = _encoded(streams.INLINE_ROWS + 1)
    assert not small_batches([(over, over.ByteSize(), ())])


def test_the_rows_a_batch_claims_count_whichever_part_claims_more():
    """Without layers, the sequences claim more rows than the block holds, or the block more
    than the sequences: either is over the bound (validation rejects the mismatch later)."""
    claims_more = _encoded(4, claimed=streams.INLINE_ROWS + 1)
    assert not small_batches([(claims_more, claims_more.ByteSize(), ())])
    holds_more = _encoded(streams.INLINE_ROWS + 1, claimed=4)
    assert not small_batches([(holds_more, holds_more.ByteSize(), ())])
    columns = pb.StepBatch(seq_no=1, model="m")
    columns.columns.slot.append(0)
    columns.columns.rows.append(streams.INLINE_ROWS + 1)
    assert not small_batches([(columns, columns.ByteSize(), ())])


def test_client_encoded_steps_keep_the_small_byte_bound():
    """Few rows but many features: over `INLINE_FEATURE_BYTES` goes to the pipeline thread,
    though a layer batch of those bytes would run inline."""
    wide = _encoded(64, columns=512)  # 128 KiB of float32 values
    size = wide.ByteSize()
    assert streams.INLINE_FEATURE_BYTES < size <= streams.INLINE_BYTES
    assert not small_batches([(wide, size, ())])
    step = _encoded(64, columns=64)
    assert small_batches([(step, step.ByteSize(), ())])


def test_a_run_that_held_the_loop_far_over_the_budget_in_wall_time_pauses_at_once():
    """CPU time misses the loop held while waiting (the GIL, a blocking write): a run far
    over in wall time pauses whatever its CPU; a little over in wall time does not."""
    budget = InlineBudget(budget=0.002, pause=10.0)
    budget.ran(0.001, 100.0, wall=0.002 * INLINE_FAR_OVER)  # preempted: not far enough
    assert budget.pauses == 0 and budget.allowed(100.0)
    budget.ran(0.001, 100.0, wall=0.002 * streams.INLINE_WALL_FAR_OVER + 0.001)
    assert budget.pauses == 1 and not budget.allowed(105.0) and budget.allowed(110.0)
