"""Decode-step cost of a rule with ``window_roles`` against the same rule without it.

One rule, ``rolling_mean(a, 512) > 0.5`` with ``for: 8 tokens`` and ``roles: [user]`` (the
shape of a role-masked whole-turn rule), 64 conversations of 600 prefilled tokens each, then
300 timed one-token decode steps of the user's tokens and of the assistant's, the two engines
alternating step by step; standard normal values and probabilities. The same measurement as the
``window_roles`` part of ``safety-monitor bench rules`` (``monitor.bench.rules``), three rounds.
Run from the repository root: ``OMP_NUM_THREADS=1 python scripts/window_roles_step_cost.py``
(about 10 seconds); another function as the argument, e.g. ``'rolling_max(a, 512)'`` or
``'ewma(a, 64)'``.
"""

from __future__ import annotations

import sys

from monitor.bench.rules import bench_window_roles


def main() -> None:
    """Print each round's medians and ratios."""
    function = sys.argv[1] if len(sys.argv) > 1 else "rolling_mean(a, 512)"
    for round_ in range(3):
        for case in bench_window_roles(function=function)["cases"]:
            print(
                f"{function}, round {round_}, {case['values']} values, {case['role']} tokens: "
                f"plain {case['plain_median_ms'] * 1000:.0f} us, window_roles "
                f"{case['window_roles_median_ms'] * 1000:.0f} us, ratio {case['ratio']:.2f}"
            )


if __name__ == "__main__":
    main()
