"""How far a bench's median over rounds can be trusted: a bootstrap confidence interval.

The benches report the median of per-round values (a throughput loss paired within its round,
a CPU time per step). Their quartiles say how much one round varies; the interval here says
how far the median itself could move if the same bench ran again on a machine behaving the
same way: resample the rounds with replacement (each round keeps its pairing: the values are
already per-round differences or ratios), take each resample's median, and report the
middle `level` of those medians (the percentile bootstrap). Seeded, so the same rounds give
the same interval on every run of the report.

It assumes the rounds are exchangeable (no trend across the run): the overhead bench rotates
and mirrors its order so drift hits every mode alike. With few rounds the interval is coarse
(the median of an odd number of values is always one of them, so the interval's ends are
rounds' values or, for an even number, means of two).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import numpy as np

RESAMPLES = 10_000
SEED = 0


def median_ci(
    values: Sequence[float],
    level: float = 0.95,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> tuple[float, float]:
    """The percentile-bootstrap `level` interval of the median of `values` (one per round).

    The lower end is the smallest resampled median with at least (1 - level) / 2 of them at
    or below it, the upper the smallest with at least (1 + level) / 2 (the empirical
    quantile, no interpolation between two medians no resample gave). The order of `values`
    does not matter."""
    if not 0 < level < 1:
        raise ValueError(f"level: expected 0 < level < 1, got {level!r}")
    if resamples < 1:
        raise ValueError(f"resamples: expected >= 1, got {resamples!r}")
    # Sorted: the interval depends on the rounds' values, not on the order they are given in
    # (a table's and an analysis of the JSON's per-round lists agree).
    data = np.sort(np.asarray(values, dtype=np.float64))
    if data.ndim != 1 or data.size == 0:
        raise ValueError("values: expected a non-empty sequence of numbers")
    if not np.isfinite(data).all():
        raise ValueError("values: NaN or infinity in the rounds")
    if data.size == 1:
        return float(data[0]), float(data[0])
    rng = np.random.default_rng(seed)
    # Resampled in blocks: 10,000 x n indices at once would be 1.6 MB at n = 20, fine, but a
    # long bench (hundreds of rounds) should not allocate resamples x n all at once.
    medians = np.empty(resamples)
    block = max(1, 2_000_000 // data.size)
    for start in range(0, resamples, block):
        stop = min(resamples, start + block)
        picks = rng.integers(0, data.size, size=(stop - start, data.size))
        medians[start:stop] = np.median(data[picks], axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(medians, [tail, 1 - tail], method="inverted_cdf")
    return float(low), float(high)


def summary(values: Sequence[float], prefix: str) -> dict[str, float]:
    """Median, its interval, quartiles and range of per-round values, keyed `<prefix>_median`,
    `_ci_low`, `_ci_high`, `_q1`, `_q3`, `_min`, `_max`."""
    ordered = sorted(values)
    low, high = median_ci(ordered)
    q1, _, q3 = quartiles(ordered)
    return {
        f"{prefix}_median": float(np.median(ordered)),
        f"{prefix}_ci_low": low,
        f"{prefix}_ci_high": high,
        f"{prefix}_q1": q1,
        f"{prefix}_q3": q3,
        f"{prefix}_min": ordered[0],
        f"{prefix}_max": ordered[-1],
    }


def quartiles(ordered: Sequence[float]) -> tuple[float, float, float]:
    """Q1, median, Q3 of sorted values (inclusive method, as the bench tables always used)."""
    if len(ordered) == 1:
        return ordered[0], ordered[0], ordered[0]
    q1, q2, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    return q1, q2, q3
