"""Calibration thresholds that hold their false-positive rate on new data (split-conformal rank).

Every calibration here (``rules calibrate``, ``pack calibrate``, ``pack fit``) sets a threshold
``t`` on ``n`` benign scores and alerts when a score is above ``t``. Taking the empirical
quantile (``floor(fpr * n)`` negatives above ``t``) hits the target on the calibration data
but not on new data from the same source: there the expected rate of that threshold is
``(allowed + 1) / (n + 1)``, e.g. 2/101 for 1% on 100 negatives.

The split-conformal rank fixes that (Vovk, Gammerman & Shafer 2005; Angelopoulos & Bates 2021,
arXiv:2107.07511): with ``n`` exchangeable benign scores, the ``k``-th smallest,
``k = ceil((n + 1)(1 - fpr))``, as threshold gives ``P(new benign score > t) <= fpr``
(averaged over calibration sets). So ``n - k`` calibration scores may lie above it, and the
rate is resolvable only when ``k <= n``, i.e. ``n >= (1 - fpr) / fpr`` (99 for 1%).

What it assumes: the new conversations come from the same source as the calibration ones
(exchangeable) and alerts fire on ``score > t``; ties at the threshold only make fewer fire.
Under distribution shift (other data, other users) nothing is guaranteed: a public data set
the probes never saw is such a shift.

`fpr_upper_bound` reports how far the rate of *this* threshold may be from the calibration
rate: the one-sided Clopper-Pearson bound of ``fired`` of ``n``. For a threshold at an order
statistic of continuous scores, its true rate follows Beta(fired + 1, n - fired) over
calibration sets, whose quantile that bound is, so it holds although the threshold was chosen
on the same scores. Where ties or a jump in firings leave fewer than ``allowed`` above the
threshold, the count that fired is itself data-dependent and the bound of that count treats
it as fixed; the bound of ``allowed`` (never lower) holds without that assumption.

Pure Python (``math`` only), so both the evaluation and the build side import it.
"""

from __future__ import annotations

import math
from fractions import Fraction

__all__ = [
    "UnresolvableRate",
    "allowed_above",
    "conformal_rank",
    "expected_rate",
    "fpr_upper_bound",
    "minimum_negatives",
    "threshold_index",
    "unresolvable_message",
]


class UnresolvableRate(ValueError):
    """Too few benign samples for the target rate (the conformal rank is beyond them)."""


def _rate(fpr: float) -> Fraction:
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"{fpr} is not in (0, 1)")
    # The decimal the user typed (0.01), not its binary neighbour: 100 * 0.99 must be 99.
    return Fraction(fpr).limit_denominator(10**9)


def conformal_rank(n: int, fpr: float) -> int:
    """``k = ceil((n + 1)(1 - fpr))``: the threshold is the k-th smallest of ``n`` benign
    scores (1-based). May exceed ``n`` (then the rate is not resolvable)."""
    if n < 0:
        raise ValueError(f"{n} samples")
    return math.ceil((n + 1) * (1 - _rate(fpr)))


def minimum_negatives(fpr: float) -> int:
    """The fewest benign samples that resolve ``fpr``: ``ceil((1 - fpr) / fpr)``."""
    a = _rate(fpr)
    return math.ceil((1 - a) / a)


def unresolvable_message(n: int, fpr: float, what: str = "benign samples") -> str:
    """Why ``n`` samples cannot set a threshold for ``fpr``."""
    return (
        f"{n} {what} cannot resolve a false-positive rate of {fpr:g} on new data "
        f"(the conformal rank ceil((n + 1)(1 - fpr)) = {conformal_rank(n, fpr)} is beyond "
        f"them; need at least {minimum_negatives(fpr)})"
    )


def allowed_above(n: int, fpr: float, what: str = "benign samples") -> int:
    """How many of ``n`` calibration scores may lie above the threshold: ``n - k``.

    Raises `UnresolvableRate` when ``n`` is below `minimum_negatives`."""
    k = conformal_rank(n, fpr)
    if k > n:
        raise UnresolvableRate(unresolvable_message(n, fpr, what))
    return n - k


def threshold_index(n: int, fpr: float, what: str = "benign samples") -> int:
    """The 0-based index of the threshold in the ``n`` scores sorted ascending (``k - 1``)."""
    return n - allowed_above(n, fpr, what) - 1


def expected_rate(allowed: int, n: int) -> float:
    """The expected rate on new data of a threshold with ``allowed`` of ``n`` exchangeable
    (continuous) scores above it: ``(allowed + 1) / (n + 1)``."""
    return (allowed + 1) / (n + 1)


def _binomial_cdf(x: int, n: int, p: float) -> float:
    """``P(Binomial(n, p) <= x)``, summed in log space (exact binomial coefficients)."""
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 1.0 if x >= n else 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    return min(
        1.0,
        sum(
            math.exp(math.log(math.comb(n, i)) + i * log_p + (n - i) * log_q) for i in range(x + 1)
        ),
    )


def fpr_upper_bound(fired: int, n: int, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson upper bound of a rate seen as ``fired`` of ``n``: the ``p``
    with ``P(Binomial(n, p) <= fired) = 1 - confidence`` (found by bisection); 1.0 when all
    fired. 0 of 100 at 95% gives 1 - 0.05 ** (1 / 100) = 0.0295."""
    if not 0 <= fired <= n or n < 1:
        raise ValueError(f"{fired} of {n}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence {confidence} is not in (0, 1)")
    if fired == n:
        return 1.0
    tail = 1.0 - confidence
    low, high = fired / n, 1.0  # the CDF falls as p grows; at p = fired / n it is > tail
    for _ in range(100):  # bounded: 2**-100 is far below float resolution here
        middle = (low + high) / 2
        if middle in (low, high):
            break
        if _binomial_cdf(fired, n, middle) > tail:
            low = middle
        else:
            high = middle
    return high
