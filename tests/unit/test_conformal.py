"""The split-conformal rank every calibration uses, and the rate bound the commands print.

Known values: the rank k = ceil((n + 1)(1 - fpr)) worked by hand; the Clopper-Pearson bounds
are the 95% quantiles of Beta(fired + 1, n - fired) (scipy.stats.beta.ppf, checked once by
hand, not a dependency), 0 of n in closed form: 1 - 0.05 ** (1 / n).
"""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from monitor.conformal import (
    UnresolvableRate,
    allowed_above,
    conformal_rank,
    expected_rate,
    fpr_upper_bound,
    minimum_negatives,
    threshold_index,
)
from monitor.features.build.probes import calibrate_thresholds
from monitor.features.build.scoring import calibrated_threshold, threshold_at_fpr
from monitor.features.errors import FeatureError

# (n, fpr, k, allowed): ceil(100 * 0.99) = 99; ceil(101 * 0.99) = ceil(99.99) = 100;
# ceil(229 * 0.99) = ceil(226.71) = 227; ceil(389 * 0.99) = ceil(385.11) = 386;
# ceil(97 * 0.98) = ceil(95.06) = 96 (the shipped bias set's 96 neutral at 2%).
RANKS = [
    (99, 0.01, 99, 0),
    (100, 0.01, 100, 0),
    (228, 0.01, 227, 1),
    (388, 0.01, 386, 2),
    (96, 0.02, 96, 0),
    (2000, 0.01, 1981, 19),
]


@pytest.mark.parametrize(("n", "fpr", "k", "allowed"), RANKS)
def test_the_rank_on_hand_made_scores(n: int, fpr: float, k: int, allowed: int) -> None:
    assert conformal_rank(n, fpr) == k and allowed_above(n, fpr) == allowed
    assert threshold_index(n, fpr) == k - 1
    scores = [float(i) for i in range(n)]
    random.Random(n).shuffle(scores)
    # Every call site picks the same score: the k-th smallest, with n - k above it.
    threshold = calibrated_threshold(scores, fpr)
    assert threshold == float(k - 1)
    assert sum(s > threshold for s in scores) == allowed
    column = calibrate_thresholds(torch.tensor(scores).unsqueeze(1), fpr)
    assert float(column[0]) == threshold
    # The empirical quantile lets more through: floor(fpr * n) (3 of 388, 2 of 228, 1 of 100).
    assert sum(s > threshold_at_fpr(scores, fpr) for s in scores) == math.floor(fpr * n)


def test_fewer_samples_than_the_rank_needs_is_a_clear_error() -> None:
    assert minimum_negatives(0.01) == 99 and minimum_negatives(0.02) == 49
    assert minimum_negatives(0.05) == 19 and minimum_negatives(0.1) == 9
    with pytest.raises(UnresolvableRate, match=r"98 benign samples .* need at least 99"):
        allowed_above(98, 0.01)
    with pytest.raises(FeatureError, match="need at least 99"):
        calibrated_threshold([float(i) for i in range(98)], 0.01)
    with pytest.raises(FeatureError, match="need at least 99"):
        calibrate_thresholds(torch.randn(98, 2), 0.01)
    with pytest.raises(ValueError, match="not in"):
        conformal_rank(100, 0.0)


def test_the_expected_rate_of_each_rule() -> None:
    # The empirical quantile's rate on new data, against the conformal rank's (README's cases).
    assert expected_rate(math.floor(0.01 * 100), 100) == pytest.approx(2 / 101)
    assert expected_rate(math.floor(0.01 * 228), 228) == pytest.approx(3 / 229)
    assert expected_rate(allowed_above(100, 0.01), 100) == pytest.approx(1 / 101)
    assert expected_rate(allowed_above(388, 0.01), 388) == pytest.approx(3 / 389)
    assert 1 / 101 <= 0.01 and 3 / 389 <= 0.01


@pytest.mark.parametrize(
    ("fired", "n", "bound"),
    [
        (0, 100, 0.0295130),  # 1 - 0.05 ** (1 / 100)
        (1, 100, 0.0465598),
        (10, 100, 0.1637176),
        (2, 388, 0.0161367),
        (0, 1, 0.95),
    ],
)
def test_the_upper_bound_against_known_values(fired: int, n: int, bound: float) -> None:
    assert fpr_upper_bound(fired, n) == pytest.approx(bound, abs=2e-7)


def test_the_upper_bound_is_monotone_and_edged() -> None:
    assert fpr_upper_bound(0, 100) == pytest.approx(1 - 0.05 ** (1 / 100), rel=1e-9)
    assert fpr_upper_bound(5, 5) == 1.0
    bounds = [fpr_upper_bound(f, 200) for f in range(0, 20)]
    assert all(a < b for a, b in itertools.pairwise(bounds))
    assert all(b > f / 200 for f, b in enumerate(bounds))
    assert fpr_upper_bound(3, 100, confidence=0.99) > fpr_upper_bound(3, 100)
    with pytest.raises(ValueError):
        fpr_upper_bound(3, 2)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    n=st.integers(min_value=99, max_value=400),
    fpr=st.sampled_from([0.01, 0.02, 0.05, 0.1]),
    levels=st.sampled_from([0, 7, 50]),
    seed=st.integers(min_value=0, max_value=2**31),
)
def test_average_new_data_rate_holds_over_exchangeable_draws(
    n: int, fpr: float, levels: int, seed: int
) -> None:
    """Benign scores uniform on [0, 1) (continuous, levels == 0) or on {0, ..., levels - 1}
    (ties): the exact rate of a threshold t on new data is P(X > t). Averaged over many
    calibration sets the conformal rank's rate stays at or below fpr (up to sampling noise);
    the rank is distribution-free, so one distribution per kind is enough."""
    rng = random.Random(seed)
    draws = 300

    def rate(t: float) -> float:
        return 1.0 - t if levels == 0 else (levels - 1 - t) / levels

    def sample() -> list[float]:
        if levels == 0:
            return [rng.random() for _ in range(n)]
        return [float(rng.randrange(levels)) for _ in range(n)]

    rates = [rate(calibrated_threshold(sample(), fpr)) for _ in range(draws)]
    mean = sum(rates) / draws
    spread = math.sqrt(sum((r - mean) ** 2 for r in rates) / (draws - 1))
    # Continuous: the mean is (n - k + 1) / (n + 1) <= fpr exactly; ties only lower it.
    assert mean <= fpr + 4 * spread / math.sqrt(draws) + 1e-12
    if levels == 0:
        exact = expected_rate(allowed_above(n, fpr), n)
        assert exact <= fpr
        assert abs(mean - exact) <= 4 * spread / math.sqrt(draws) + 1e-12
