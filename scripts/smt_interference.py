"""How much a process on one CPU slows a torch GEMM loop pinned to another.

On a 2-vCPU machine whose two CPUs share a core (hyperthreads), the monitor's relay and sidecar
on CPU 1 are not free for an engine pinned to CPU 0. This pins a 256x1024 @ 1024x1024 GEMM loop
to CPU 0 and times it while CPU 1 runs nothing, a pure-Python spin loop, another GEMM loop, or
a 16 MiB memcpy loop; three rounds. Run from the repository root on a quiet machine:
``OMP_NUM_THREADS=1 python scripts/smt_interference.py`` (about 30 seconds; needs CPUs 0 and 1).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import torch

# Each burner ends by itself: with its parent (PR_SET_PDEATHSIG, so a parent killed with
# SIGKILL or by a timeout leaves no spinning orphan) and after BURN_SECONDS at the latest.
BURN_SECONDS = 60
_PRELUDE = (
    "import ctypes, os, signal, time\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)\n"  # PR_SET_PDEATHSIG
    f"os.sched_setaffinity(0, {{1}})\ndeadline = time.monotonic() + {BURN_SECONDS}\n"
)
BURNERS = {
    "none": None,
    "pyspin": _PRELUDE + "while time.monotonic() < deadline: pass",
    "gemm": _PRELUDE + "import torch\ntorch.set_num_threads(1)\n"
    "x = torch.randn(512, 512)\nwhile time.monotonic() < deadline: x @ x",
    "memcpy": _PRELUDE + "import numpy as np\n"
    "x = np.ones(16 << 20, dtype=np.uint8); y = np.empty_like(x)\n"
    "while time.monotonic() < deadline: np.copyto(y, x)",
}


def gemm_ms(a: torch.Tensor, b: torch.Tensor, n: int = 400) -> float:
    """Milliseconds per GEMM, the mean of `n`."""
    start = time.perf_counter()
    for _ in range(n):
        a @ b
    return (time.perf_counter() - start) / n * 1e3


def main() -> None:
    """Print each round's ms per GEMM beside each burner, and the slowdown against none."""
    torch.set_num_threads(1)
    os.sched_setaffinity(0, {0})
    a, b = torch.randn(256, 1024), torch.randn(1024, 1024)
    gemm_ms(a, b, 50)  # warm-up
    for round_ in range(3):
        base = None
        for name, code in BURNERS.items():
            burner = subprocess.Popen([sys.executable, "-c", code]) if code else None
            try:
                time.sleep(0.5)
                ms = gemm_ms(a, b)
            finally:
                if burner is not None:
                    burner.kill()
                    burner.wait()
            base = ms if base is None else base
            print(f"round {round_}: CPU 1 {name:<7} {ms:.3f} ms/GEMM ({ms / base - 1:+.1%})")


if __name__ == "__main__":
    main()
