"""The benches' confidence interval of a median over rounds (monitor/bench/intervals.py):
against the exact bootstrap distribution of a small sample's median, against the normal
approximation for a large one, and reproducible from its seed."""

from __future__ import annotations

import math
import random

import pytest

from monitor.bench.intervals import median_ci, summary


def _exact_percentile_interval(ordered: list[float], level: float) -> tuple[float, float]:
    """The percentile-bootstrap interval with infinitely many resamples, for an odd number
    of distinct values: a resample's median is at or below the k-th smallest value exactly
    when more than half the resample is, a binomial count with p = k/n."""
    n = len(ordered)
    half = n // 2

    def at_or_below(k: int) -> float:
        p = k / n
        return sum(math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(half + 1, n + 1))

    tail = (1 - level) / 2
    low = next(ordered[k - 1] for k in range(1, n + 1) if at_or_below(k) >= tail)
    high = next(ordered[k - 1] for k in range(1, n + 1) if at_or_below(k) >= 1 - tail)
    return low, high


def test_a_known_small_sample_gets_the_exact_bootstrap_interval():
    # 21 rounds: the exact 95% interval is the 7th to the 15th smallest value (the binomial
    # probabilities at the ends are 0.018/0.056 and 0.944/0.982: far from 0.025 and 0.975
    # for 10,000 resamples, so every seed must find the same order statistics).
    rounds = [(-1) ** i * (i * 0.37 % 5) + 2.0 + i / 100 for i in range(21)]
    ordered = sorted(rounds)
    assert len(set(ordered)) == 21
    exact = _exact_percentile_interval(ordered, 0.95)
    assert exact == (ordered[6], ordered[14])
    for seed in range(5):
        assert median_ci(rounds, seed=seed) == exact


def test_a_large_normal_sample_gets_the_normal_theory_width():
    # The median of n normal values has a standard error of sqrt(pi/2) sigma / sqrt(n):
    # a 95% interval about 2 x 1.96 x 1.2533 sigma / sqrt(n) wide, centred on the median.
    rng = random.Random(7)
    sigma, n = 6.0, 400
    rounds = [rng.gauss(3.0, sigma) for _ in range(n)]
    low, high = median_ci(rounds)
    expected = 2 * 1.96 * math.sqrt(math.pi / 2) * sigma / math.sqrt(n)
    assert high - low == pytest.approx(expected, rel=0.2)
    middle = sorted(rounds)[n // 2 - 1 : n // 2 + 1]
    assert low < sum(middle) / 2 < high


def test_the_seed_makes_it_reproducible():
    rounds = [random.Random(i).gauss(0, 5) for i in range(20)]
    assert median_ci(rounds) == median_ci(list(rounds))  # seed 0 by default, every call
    # The rounds' order does not matter (the JSON lists them in run order, the table sorted).
    assert median_ci(rounds) == median_ci(sorted(rounds)) == median_ci(rounds[::-1])
    # With few resamples the seed shows (with 10,000 most seeds land on the same medians):
    # the same seed, the same interval; other seeds, other resamples.
    few = {seed: median_ci(rounds, resamples=50, seed=seed) for seed in range(6)}
    assert all(median_ci(rounds, resamples=50, seed=seed) == few[seed] for seed in few)
    assert len(set(few.values())) > 1


def test_edge_cases_and_bad_input():
    assert median_ci([4.0]) == (4.0, 4.0)
    assert median_ci([2.0] * 9) == (2.0, 2.0)
    with pytest.raises(ValueError, match="non-empty"):
        median_ci([])
    with pytest.raises(ValueError, match="NaN"):
        median_ci([1.0, float("nan")])
    with pytest.raises(ValueError, match="level"):
        median_ci([1.0, 2.0], level=1.0)


def test_summary_keys():
    row = summary([3.0, 1.0, 2.0, 5.0, 4.0], "loss_pct")
    assert row["loss_pct_median"] == 3.0
    assert (row["loss_pct_q1"], row["loss_pct_q3"]) == (2.0, 4.0)
    assert (row["loss_pct_min"], row["loss_pct_max"]) == (1.0, 5.0)
    assert row["loss_pct_ci_low"] <= 3.0 <= row["loss_pct_ci_high"]
