"""The sidecar's light-load inline path, its two guards on the event loop side: the pipeline
worker's idle count survives a job cancelled while queued, and the inline budget turns the
inline path off after a slow run."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from monitor.sidecar.streams import InlineBudget, PipelineWorker


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


def test_a_slow_inline_run_pauses_the_inline_path_for_a_while():
    budget = InlineBudget(budget=0.002, pause=10.0)
    assert budget.allowed(100.0)
    budget.ran(0.0015, 100.0)  # within budget
    assert budget.allowed(100.0) and budget.pauses == 0
    budget.ran(0.004, 100.0)  # over: no inline runs for 10 s
    assert budget.pauses == 1
    assert not budget.allowed(100.0) and not budget.allowed(109.9)
    assert budget.allowed(110.0)
