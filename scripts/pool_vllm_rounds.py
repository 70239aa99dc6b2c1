"""Pool the rounds of several `bench overhead --engine vllm --json` runs: the median per-round
throughput loss of one mode against another over every round of every run, with a 95%
interval from a two-level bootstrap (resample the runs, then the rounds within each chosen
run), so the differences between runs widen the interval instead of being taken for noise
within one run. One run's interval (`monitor/bench/intervals.py`) cannot decide a 3% target
on a 2-core shared machine. With few runs the pooled interval is approximate and likely too
narrow (with 3 runs the first level has only 10 distinct sets of runs, and a bootstrap over
so few clusters understates the spread between them): gather more runs, ideally 10 or more,
before deciding, and read it beside the runs' own medians (printed, with their range).

    python scripts/pool_vllm_rounds.py RUN.json [RUN.json ...] [--mode sidecar-up]
        [--against up-paused] [--execution compiled]

The loss of a round is 1 - the mode's tokens/s over the reference's in the same round, as
the bench computes it (`--against off`: against the monitor-off engine; `up-paused`: the same
engine with its plugin paused). Seeded: the same files give the same interval.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

RESAMPLES = 10_000
SEED = 0


def round_losses(result: dict, execution: str, mode: str, against: str) -> list[float]:
    """One run's per-round losses (%) of `mode` against `against`, from its `per_round`."""
    rows = result["execution"][execution]

    def rates(name: str) -> np.ndarray:
        per_round = rows[name]["per_round"]
        return np.asarray(per_round["tokens"], float) / np.asarray(per_round["seconds"], float)

    return list(100 * (1 - rates(mode) / rates(against)))


def pooled_median_ci(
    runs: list[list[float]], level: float = 0.95, resamples: int = RESAMPLES, seed: int = SEED
) -> tuple[float, float, float]:
    """(median of all rounds, interval low, high): each resample draws len(runs) runs with
    replacement and, within each drawn run, as many rounds as it has, with replacement."""
    if not runs or any(not run for run in runs):
        raise ValueError("runs: expected one or more runs, each with rounds")
    arrays = [np.asarray(run, float) for run in runs]
    rng = np.random.default_rng(seed)
    medians = np.empty(resamples)
    for index in range(resamples):
        chosen = rng.integers(0, len(arrays), size=len(arrays))
        sample = np.concatenate(
            [arrays[c][rng.integers(0, arrays[c].size, size=arrays[c].size)] for c in chosen]
        )
        medians[index] = np.median(sample)
    tail = (1 - level) / 2
    low, high = np.quantile(medians, [tail, 1 - tail], method="inverted_cdf")
    return float(np.median(np.concatenate(arrays))), float(low), float(high)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="--json outputs of the vLLM bench")
    parser.add_argument("--mode", default="sidecar-up")
    parser.add_argument("--against", default="up-paused")
    parser.add_argument("--execution", default="compiled")
    args = parser.parse_args()
    runs = []
    for path in args.runs:
        result = json.loads(path.read_text())
        losses = round_losses(result, args.execution, args.mode, args.against)
        runs.append(losses)
        print(
            f"{path}: {result.get('new_tokens')} new tokens, {len(losses)} rounds, "
            f"median {np.median(losses):.2f}%"
        )
    median, low, high = pooled_median_ci(runs)
    medians = [float(np.median(run)) for run in runs]
    print(
        f"{args.mode} against {args.against} ({args.execution}), {len(runs)} runs, "
        f"{sum(map(len, runs))} rounds: median loss {median:.2f}% "
        f"(95% CI {low:.2f} to {high:.2f}; runs, then rounds, resampled"
        + ("; approximate and likely too narrow with under 10 runs" if len(runs) < 10 else "")
        + f"); the runs' medians {min(medians):.2f} to {max(medians):.2f}%"
    )


if __name__ == "__main__":
    main()
