"""A decode step's encode on one torch thread and on two, with and without a busy loop on
CPU 0 (what the load client of ``bench sidecar --pin client``, or an engine, does there).

The sidecar encodes batches of at most ``single_thread_rows`` rows on one torch thread. This
times the encode the pipeline runs for the bench's decode step (BF16 ``[64, 2304]``
activations, a narrowed encoder of 32 columns: the BF16 to float32 copy, ``addmm`` and the
epilogue) and a 512-row prefill of the same shape, on 1 and 2 threads, alternating, with CPU
0 idle and then with a pure-Python spin pinned to it. Per case: wall time per call (mean, p50,
p99, max) and the calling thread's CPU per call. Run from the repository root, needs two
CPUs: ``python scripts/encode_threads.py`` (about 40 seconds).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import torch

from monitor.features import RestrictedEncoder

# The spinner ends by itself: with its parent (PR_SET_PDEATHSIG) and after SPIN_SECONDS.
SPIN_SECONDS = 40
_SPIN = (
    "import ctypes, os, signal, time\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)\n"  # PR_SET_PDEATHSIG
    f"os.sched_setaffinity(0, {{0}})\ndeadline = time.monotonic() + {SPIN_SECONDS}\n"
    "while time.monotonic() < deadline: pass"
)
D_MODEL, WIDTH = 2304, 32
CALLS = {64: 2000, 512: 300}


def _encoder() -> RestrictedEncoder:
    generator = torch.Generator().manual_seed(0)
    return RestrictedEncoder(
        weight=torch.randn(D_MODEL, WIDTH, generator=generator),
        bias=torch.randn(WIDTH, generator=generator),
        floor=torch.zeros(WIDTH),
        normalization="none",
    )


def _time(encoder: RestrictedEncoder, rows: int, threads: int) -> str:
    x = torch.randn(rows, D_MODEL, generator=torch.Generator().manual_seed(1)).bfloat16()
    torch.set_num_threads(threads)
    for _ in range(100):  # warm: caches, the OpenMP team
        encoder.encode(x)
    calls = CALLS[rows]
    times = []
    cpu, wall = time.thread_time(), time.perf_counter()
    for _ in range(calls):
        started = time.perf_counter()
        encoder.encode(x)
        times.append(time.perf_counter() - started)
    cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
    times.sort()
    us = [round(1e6 * t) for t in (times[calls // 2], times[int(0.99 * calls)], times[-1])]
    return (
        f"{rows:>4} rows, {threads} thread(s): wall {1e6 * wall / calls:6.0f} us/call "
        f"(p50 {us[0]}, p99 {us[1]}, max {us[2]}), thread CPU {1e6 * cpu / calls:.0f} us/call"
    )


def main() -> int:
    if not {0, 1} <= os.sched_getaffinity(0):
        print("needs CPUs 0 and 1", file=sys.stderr)
        return 2
    encoder = _encoder()
    for label in ("CPU 0 idle", "a Python spin on CPU 0"):
        spinner = None
        if label != "CPU 0 idle":
            spinner = subprocess.Popen([sys.executable, "-c", _SPIN])
            time.sleep(0.2)
        try:
            print(label)
            for rows in CALLS:
                for threads in (2, 1, 2, 1):
                    print("  " + _time(encoder, rows, threads))
        finally:
            if spinner is not None:
                spinner.kill()
                spinner.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
