"""Decode-step cost of a rule with ``window_roles`` against the same rule without it.

One rule, ``rolling_mean(a, 512) > 0.5`` with ``for: 8 tokens`` and ``roles: [user]`` (the
shape of a role-masked whole-turn rule), 64 conversations of 600 prefilled tokens each, then
300 timed one-token decode steps; the median step, both engines alternately in one run.
Run from the repository root: ``OMP_NUM_THREADS=1 python scripts/window_roles_step_cost.py``
(about 10 seconds).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from monitor.rules import RuleEngine, SequenceSlice, load_rules
from monitor.rules.engine import FeatureBlock

RULE = """\
features: {a: p/a}
rules:
  - rule: r
    severity: info
    condition: rolling_mean(a, 512) > 0.5
    for: 8 tokens
    roles: [user]
"""


def median_step_us(extra: str, role: str, steps: int = 300, conversations: int = 64) -> float:
    """Median decode-step time in microseconds, every step's slices of ``role``."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "rules.yaml"
        path.write_text(RULE + extra)
        engine = RuleEngine(load_rules([path]))
    rng = np.random.default_rng(0)
    index = {"p/a": 0}
    prefill = FeatureBlock(rng.standard_normal((conversations * 600, 1), dtype=np.float32), index)
    engine.evaluate(
        prefill, [SequenceSlice(f"c{i}", i * 600, 600, 0, "user") for i in range(conversations)]
    )
    times = []
    for t in range(steps):
        block = FeatureBlock(rng.standard_normal((conversations, 1), dtype=np.float32), index)
        slices = [SequenceSlice(f"c{i}", i, 1, 600 + t, role) for i in range(conversations)]
        started = time.perf_counter()
        engine.evaluate(block, slices)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def main() -> None:
    for round_ in range(3):
        for role in ("user", "assistant"):
            plain = median_step_us("", role)
            masked = median_step_us("    window_roles: [user]\n", role)
            print(
                f"round {round_}, {role} tokens: plain {plain:.0f} us, window_roles "
                f"{masked:.0f} us, ratio {masked / plain:.2f}"
            )


if __name__ == "__main__":
    main()
