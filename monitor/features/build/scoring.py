"""Conversation scores from per-token feature values, and the metrics that judge them.

A pack feature yields one value per token; a rule pools those values over time. The pooling a
probe is fitted and calibrated with is recorded in the pack as its *aggregation*, one of:

- ``max_rolling_mean:W``: the maximum, over the tokens of the labeled roles, of the mean of the
  last W tokens of the conversation's stream (fewer at its start). This is exactly what the
  rule ``rolling_mean(f, W) > t`` with ``roles: [<labeled roles>]`` fires on: it fires in a
  conversation if and only if the conversation's score is above t (a test checks it).
- ``max_rolling_mean:W,for:K``: the same with a minimum-token guard: the maximum, over runs
  of K consecutive labeled tokens, of the smallest rolling mean in the run. This is exactly
  what the rule ``rolling_mean(f, W) > t`` with ``for: K tokens`` and ``roles: [<labeled
  roles>]`` fires on (tokens of other roles break a ``for`` run). With W at least the
  conversation's length the rolling mean is the mean of everything seen so far, so this is a
  whole-turn mean that the first K - 1 tokens cannot fire on alone.
- ``max_rolling_mean:W,for:K,roles`` (or ``max_rolling_mean:W,roles``): the rolling mean takes
  in the labeled tokens alone (the last W of them, across turns), never a system prompt or
  another role's turn: what ``rolling_mean(f, W) > t`` with ``roles:`` *and* ``window_roles:``
  set to the labeled roles (and ``for: K tokens``) fires on. With W = 512 this is the
  role-masked whole-turn mean, the closest causal counterpart of mean pooling that cannot read
  the prompt.
- ``max_rolling_mean:W,roles,turn_end`` (or ``max_rolling_mean:W,turn_end``): the same rolling
  mean, read only at the labeled tokens that *end a turn* (a turn's last token, where that
  turn's role is labeled): what ``rolling_mean(f, W) > t`` with ``roles:``, ``window_roles:``
  (with ``,roles``) and ``at: turn_end`` fires on. With W = 512 and ``,roles`` this is mean
  pooling served exactly: at the end of a labeled turn the rule reads the mean of the labeled
  role's tokens so far (w.mean(h) + b = mean(w.h + b)), for one labeled turn the mean of that
  turn ("turn mean"). ``for`` together with ``turn_end`` is invalid (a rule checked once per
  turn has no run of consecutive tokens to guard).
- ``max``: ``max_rolling_mean:1``.
- ``mean``: the mean over the labeled tokens (what a probe fitted on mean-pooled texts sees;
  no rule reproduces it exactly).

Window sums are taken in float64 like the rules engine's, so the two agree to float32
rounding.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from monitor.conformal import threshold_index
from monitor.features.errors import FeatureError

DEFAULT_WINDOW = 8


MAX_FOR = 64  # the longest minimum-token guard an aggregation may name
# Counts in an aggregation are ASCII digits only, as the rules' parser reads them
# (monitor/rules/pooling.py): a pack's text comes from elsewhere, and `str.isdigit` also
# takes '²' (which int() refuses: a ValueError, not a FeatureError) and '٣' (which int()
# reads as 3, a window the rules would refuse).
_DIGITS = re.compile(r"[0-9]{1,5}")


def _count(text: str, most: int) -> bool:
    """Whether `text` is a count in 1..`most` in ASCII digits."""
    return _DIGITS.fullmatch(text) is not None and 1 <= int(text) <= most


def parse_aggregation(text: str) -> tuple[str, int]:
    """``'max_rolling_mean:8'`` -> ``('max_rolling_mean', 8)``; ``'mean'`` -> ``('mean', 0)``;
    the guard of ``'max_rolling_mean:W,for:K'`` is `aggregation_guard`'s, the ``,roles``
    option `aggregation_masked`'s, the ``,turn_end`` option `aggregation_turn_end`'s."""
    text = _split_options(text).base
    kind, _, window = text.partition(":")
    if kind == "max" and not window:
        return "max_rolling_mean", 1
    if kind == "mean" and not window:
        return "mean", 0
    if kind == "max_rolling_mean" and _count(window, 4096):
        return kind, int(window)
    raise FeatureError(
        f"{text!r}, expected max_rolling_mean:W[,for:K] (W in 1..4096, K in 1..{MAX_FOR}), "
        "max or mean",
        field="aggregation",
    )


def aggregation_guard(text: str) -> int:
    """The minimum-token guard K of ``'max_rolling_mean:W,for:K'`` (1 without one)."""
    return _split_options(text).guard


def aggregation_masked(text: str) -> bool:
    """Whether the rolling mean takes in the labeled roles' tokens alone (``,roles``): served
    with ``window_roles:`` set to the labeled roles."""
    return _split_options(text).masked


def aggregation_turn_end(text: str) -> bool:
    """Whether the score is read only at the labeled turns' last tokens (``,turn_end``): served
    with ``at: turn_end``."""
    return _split_options(text).turn_end


@dataclass(frozen=True)
class _Options:
    base: str
    guard: int
    masked: bool
    turn_end: bool


def _split_options(text: str) -> _Options:
    base, *options = text.split(",")
    guard, masked, turn_end = 1, False, False
    for option in options:
        name, _, k = option.partition(":")
        if not base.startswith("max_rolling"):
            break
        if name == "for" and _count(k, MAX_FOR) and guard == 1:
            guard = int(k)
        elif option == "roles" and not masked:
            masked = True
        elif option == "turn_end" and not turn_end:
            turn_end = True
        else:
            break
    else:
        if turn_end and guard > 1:
            # A rule checked only at a turn's last token sees one row per turn: `for: K` would
            # need K consecutive turn ends (the rules loader rejects the pair too).
            raise FeatureError(
                f"{text!r}: for:K cannot be combined with turn_end (a rule with at: turn_end "
                "is checked once per turn)",
                field="aggregation",
            )
        return _Options(base, guard, masked, turn_end)
    raise FeatureError(
        f"{text!r}, expected max_rolling_mean:W[,for:K][,roles][,turn_end] (K in 1..{MAX_FOR})",
        field="aggregation",
    )


def turn_ends(turn_rows: Sequence[int]) -> torch.Tensor:
    """bool [tokens]: True at each turn's last token, from the tokens per turn
    (``ConversationTokens.turn_rows``); a turn of no tokens has no end."""
    ends = torch.zeros(sum(turn_rows), dtype=torch.bool)
    position = 0
    for rows in turn_rows:
        position += rows
        if rows > 0:
            ends[position - 1] = True
    return ends


def guarded_runs(labeled: torch.Tensor, guard: int) -> torch.Tensor:
    """bool [tokens]: where ``guard`` consecutive labeled tokens end (a ``for`` run's length)."""
    if guard <= 1:
        return labeled.clone()
    counts = torch.cumsum(torch.cat([labeled.new_zeros(1, dtype=torch.int64), labeled.long()]), 0)
    ends = torch.arange(1, len(labeled) + 1)
    starts = (ends - guard).clamp(min=0)
    return (ends >= guard) & (counts[ends] - counts[starts] == guard)


def labeled_runs(labeled: torch.Tensor) -> torch.Tensor:
    """int64 [labeled tokens]: at each labeled token, how many consecutive labeled tokens end
    there (a ``for`` run's length; another role's token in between breaks it)."""
    positions = torch.nonzero(labeled)[:, 0]
    if positions.numel() == 0:
        return positions
    index = torch.arange(len(positions))
    starts = torch.ones(len(positions), dtype=torch.bool)
    starts[1:] = positions[1:] != positions[:-1] + 1
    first = torch.cummax(torch.where(starts, index, torch.zeros_like(index)), 0).values
    return index - first + 1


def rolling_min(values: torch.Tensor, window: int) -> torch.Tensor:
    """Minimum of the last ``window`` values at every position (fewer at the start)."""
    if window <= 1 or values.numel() == 0:
        return values
    padded = torch.cat([values.new_full((window - 1,), math.inf), values])
    return padded.unfold(0, window, 1).min(1).values


def rolling_mean(values: torch.Tensor, window: int) -> torch.Tensor:
    """Causal mean of the last ``window`` values at every position (fewer at the start), as the
    rules engine's ``rolling_mean`` computes it: float64 sums, one rounding to float32."""
    x = values.double()
    sums = torch.cumsum(torch.cat([x.new_zeros(1), x]), dim=0)
    n = x.shape[0]
    ends = torch.arange(1, n + 1)
    starts = (ends - window).clamp(min=0)
    return ((sums[ends] - sums[starts]) / (ends - starts)).float()


def conversation_score(
    values: torch.Tensor,
    labeled: torch.Tensor,
    aggregation: str,
    turn_end: torch.Tensor | None = None,
) -> float:
    """One conversation's score: per-token ``values`` [tokens] pooled by ``aggregation`` over
    the ``labeled`` tokens (bool [tokens]); -inf when no token is labeled. A ``,turn_end``
    aggregation needs ``turn_end`` (bool [tokens], each turn's last token: `turn_ends`); the
    others ignore it."""
    kind, window = parse_aggregation(aggregation)
    options = _split_options(aggregation)
    if options.turn_end:
        if turn_end is None:
            raise ValueError(f"{aggregation!r} is read at turn ends: pass turn_end (turn_ends)")
        if turn_end.shape != labeled.shape:
            raise ValueError(f"turn_end has {len(turn_end)} tokens, labeled {len(labeled)}")
    if not bool(labeled.any()):
        return -math.inf
    if kind == "mean":
        return float(values[labeled].double().mean())
    guard, masked = options.guard, options.masked
    if options.turn_end:
        assert turn_end is not None
        # The rule is checked at the labeled turns' last tokens only (`at: turn_end`).
        if masked:
            means = rolling_mean(values[labeled], window)[turn_end[labeled]]
        else:
            means = rolling_mean(values, window)[labeled & turn_end]
        return float(means.max()) if means.numel() else -math.inf
    if masked:
        # The window holds the labeled tokens alone (``window_roles``); a ``for`` run is still
        # broken by another role's tokens.
        means = rolling_mean(values[labeled], window)
        if guard == 1:
            return float(means.max())
        ends = labeled_runs(labeled) >= guard
        if not bool(ends.any()):
            return -math.inf
        return float(rolling_min(means, guard)[ends].max())
    means = rolling_mean(values, window)
    if guard == 1:
        return float(means[labeled].max())
    # A rule with `for: K` fires at the K-th consecutive evaluated token on which its
    # condition holds: the run's smallest rolling mean is what must be above the threshold.
    ends = guarded_runs(labeled, guard)
    if not bool(ends.any()):
        return -math.inf  # no run of K labeled tokens: the rule can never fire
    return float(rolling_min(means, guard)[ends].max())


# --- metrics ------------------------------------------------------------------------------


def auroc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve (ties count one half); NaN without both classes."""
    s = torch.tensor(list(scores), dtype=torch.float64)
    y = torch.tensor(list(labels), dtype=torch.bool)
    positives, negatives = s[y], s[~y]
    if len(positives) == 0 or len(negatives) == 0:
        return math.nan
    # Mann-Whitney U with average ranks: O(n log n), exact with ties.
    order = torch.cat([positives, negatives])
    ranks = _average_ranks(order)
    u = ranks[: len(positives)].sum() - len(positives) * (len(positives) + 1) / 2
    return float(u / (len(positives) * len(negatives)))


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    sorted_x, order = torch.sort(x)
    ranks = torch.empty_like(x)
    n = len(x)
    i = 0
    values = sorted_x.tolist()
    positions = order.tolist()
    while i < n:
        j = i
        while j + 1 < n and values[j + 1] == values[i]:
            j += 1
        for k in range(i, j + 1):
            ranks[positions[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def threshold_at_fpr(negative_scores: Sequence[float], fpr: float) -> float:
    """The smallest threshold t (alert when score > t) with at most ``fpr`` of *these*
    negatives above it: a rate measured on the data at hand (`recall_at_fpr`, `eval`'s columns
    on a test split). To set a threshold for new data use `calibrated_threshold`: on new
    negatives from the same source this one's expected rate is (floor(fpr n) + 1) / (n + 1),
    above ``fpr``."""
    if not 0.0 < fpr < 1.0:
        raise FeatureError(f"{fpr} is not in (0, 1)", field="fpr")
    ordered = sorted(negative_scores)
    n = len(ordered)
    if n == 0:
        raise FeatureError("no negative (label 0) conversations", field="fpr")
    allowed = math.floor(fpr * n)
    return ordered[n - allowed - 1]


def calibrated_threshold(negative_scores: Sequence[float], fpr: float) -> float:
    """The threshold t (alert when score > t) for ``fpr`` on new negatives from the same
    source: the split-conformal rank (`monitor.conformal`), the k-th smallest score with
    k = ceil((n + 1)(1 - fpr)). Raises `FeatureError` when n < (1 - fpr) / fpr."""
    ordered = sorted(negative_scores)
    if not ordered:
        raise FeatureError("no negative (label 0) conversations", field="fpr")
    try:
        return ordered[threshold_index(len(ordered), fpr, "negatives")]
    except ValueError as e:
        raise FeatureError(str(e), field="fpr") from None


@dataclass(frozen=True)
class OperatingPoint:
    """Recall and false-positive rate of ``score > threshold``."""

    threshold: float
    recall: float
    fpr: float


def operating_point(
    scores: Sequence[float], labels: Sequence[int], threshold: float
) -> OperatingPoint:
    """Recall and FPR of alerting when a score is above ``threshold``."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y == 1]
    neg = [s for s, y in zip(scores, labels, strict=True) if y == 0]
    recall = sum(s > threshold for s in pos) / len(pos) if pos else math.nan
    fpr = sum(s > threshold for s in neg) / len(neg) if neg else math.nan
    return OperatingPoint(threshold, recall, fpr)


def recall_at_fpr(scores: Sequence[float], labels: Sequence[int], fpr: float) -> OperatingPoint:
    """The operating point whose threshold allows at most ``fpr`` of these negatives."""
    negatives = [s for s, y in zip(scores, labels, strict=True) if y == 0]
    return operating_point(scores, labels, threshold_at_fpr(negatives, fpr))


def roc_curve(scores: Sequence[float], labels: Sequence[int]) -> tuple[list[float], list[float]]:
    """(false-positive rates, true-positive rates) at every distinct threshold, from (0, 0)."""
    pairs = sorted(zip(scores, labels, strict=True), key=lambda p: -p[0])
    p = sum(1 for _, y in pairs if y == 1) or 1
    n = sum(1 for _, y in pairs if y == 0) or 1
    fprs, tprs = [0.0], [0.0]
    tp = fp = 0
    for i, (score, label) in enumerate(pairs):
        tp += label == 1
        fp += label == 0
        if i + 1 == len(pairs) or pairs[i + 1][0] != score:
            fprs.append(fp / n)
            tprs.append(tp / p)
    return fprs, tprs
