"""What waking a thread on another CPU costs the waker: the CPU time of one `eventfd_write`
that wakes a process blocked in poll() on CPU 1, from a thread on CPU 0, one write every 8 ms
(a decode step's pace), against the same loop without the write.

This is the system call the capture ring's producer (the model's thread) makes when the relay
sleeps, and why the relay follows the steps' pace instead of being woken for each one
(monitor/capture/relay/sender.py). Run from the repository root:
``python scripts/eventfd_wake_cost.py`` (about 15 seconds; needs CPUs 0 and 1).
"""

from __future__ import annotations

import contextlib
import os
import select
import time


def waker_us(fd: int, write: bool, n: int = 300, gap: float = 0.008) -> float:
    """Microseconds of this thread's CPU time per iteration (the write, or nothing)."""
    total = 0
    for _ in range(n):
        time.sleep(gap)
        start = time.thread_time_ns()
        if write:
            os.eventfd_write(fd, 1)
        total += time.thread_time_ns() - start
    return total / n / 1e3


def main() -> None:
    """Print three rounds of (with the write, without)."""
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    child = os.fork()
    if child == 0:  # the sleeper: blocked in poll() on CPU 1, as the relay is
        os.sched_setaffinity(0, {1})
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if poller.poll(1000):
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(fd)
        os._exit(0)
    try:
        os.sched_setaffinity(0, {0})
        time.sleep(0.5)
        for round_ in range(3):
            woke, idle = waker_us(fd, True), waker_us(fd, False)
            print(f"round {round_}: write that wakes CPU 1 {woke:.1f} us, no write {idle:.1f} us")
    finally:
        os.kill(child, 9)
        os.waitpid(child, 0)


if __name__ == "__main__":
    main()
