"""Per-token probes fitted for the way the sidecar serves them (`pack fit`).

The sidecar sees a probe's value at every token and a rule pools it over time. A probe fitted
on one pooled vector per text is a different classifier from the one served (on MiniLM the
mean-pooled probe lost 29 points of recall at 1% FPR when served per token). So:

1. Every token of the roles that carry the label (``label_roles``) is a training example with
   its conversation's label, each conversation weighted equally and the two classes balanced
   (long conversations do not dominate). A weighted logistic regression with L2 on
   standardised activations, folded back into one ``w, b`` (probes.py).
2. The conversation score is the rule's pooling of those per-token values: the maximum over
   labeled tokens of a rolling mean over the last W tokens (Google DeepMind's production misuse
   probes use max-of-rolling-means aggregation so a short harmful span in a long context is
   not diluted). W is chosen on the held-out calibration split among ``WINDOWS`` (or given),
   by AUROC. A second candidate is the role-masked whole-turn mean: the mean of the last
   ``WHOLE_TURN`` tokens *of the labeled roles* (``max_rolling_mean:512,for:K,roles``, served
   with ``window_roles:``), which never reads a system prompt or another role's turn. A third
   is the *turn mean* (``max_rolling_mean:512,roles,turn_end``, served with ``at: turn_end``):
   the same mean read only at a labeled turn's last token, which is mean pooling served
   exactly; it starts from a logistic regression on the pooled vectors (``fit_pooled_probe``).
3. Then the probe is trained *through* that aggregation (``fit_through_aggregation``): the
   conversation score max-of-rolling-means(w.h_t + b) goes into the loss (a smooth max for
   training), so only the tokens that carry the signal must score high, not every token of a
   harmful request. Early-stopped on the held-out split's served (hard max) score.
4. The alert threshold is set on the calibration split's negatives for the target FPR, with
   the same pooling, and both are recorded in the pack (``aggregation``,
   ``threshold_pooling``) so rules and `rules calibrate` use what was fitted.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from monitor.conformal import fpr_upper_bound, minimum_negatives
from monitor.features.build.builder import assemble_pack
from monitor.features.build.conversations import (
    ConversationLike,
    ConversationTokens,
    replay,
    text_digest,
)
from monitor.features.build.probes import ProbeFit, probe_encoder
from monitor.features.build.scoring import (
    aggregation_guard,
    aggregation_masked,
    aggregation_turn_end,
    auroc,
    calibrated_threshold,
    conversation_score,
    labeled_runs,
    operating_point,
    parse_aggregation,
    recall_at_fpr,
)
from monitor.features.errors import FeatureError
from monitor.features.pack import FeatureInfo, FeaturePack, HookPointEncoder

WINDOWS = (1, 4, 8, 16, 32)
# Whole-turn means: a rolling mean over this many tokens of the labeled roles alone (the rule's
# ``window_roles``) is the mean of their last 512 tokens across turns (all of them while
# fewer; MiniLM reads at most 512 tokens a turn), guarded so that the first tokens of a turn
# alone cannot fire. Trained through, this is the served counterpart of a mean-pooled probe
# (what a probe fitted on one vector per text sees), and it cannot read the prompt: an
# unmasked mean learned the system prompt's instruction to lie on the shipped deception set.
WHOLE_TURN = 512
GUARDS = (4, 8, 16, 32)
# The turn mean: the labeled roles' whole-turn mean read at each labeled turn's last token
# (the rule's ``at: turn_end``), so no guard is needed: the turn is finished when it is read.
TURN_MEAN = f"max_rolling_mean:{WHOLE_TURN},roles,turn_end"


@dataclass
class LayerResult:
    """One layer's probe, its chosen aggregation and its held-out numbers."""

    hook_point: str
    fit: ProbeFit
    aggregation: str
    threshold: float  # alert when the aggregated score is above it
    heldout: dict[str, float]  # auroc, recall / fpr at the threshold, conversations
    by_window: dict[int, dict[str, float]] = field(default_factory=dict)


@dataclass
class FitReport:
    """What `pack fit` prints: per layer, held-out metrics (never training accuracy alone)."""

    layers: list[LayerResult]
    chosen: str  # hook point of the feature with the plain name
    fit_conversations: int
    heldout_conversations: int
    fit_seconds: float


def token_values(tokens: ConversationTokens, hook_point: str, fit: ProbeFit) -> torch.Tensor:
    """The probe's value at every token, computed as the pack's encoder computes it."""
    x = tokens.activations[hook_point]
    return torch.addmm(torch.tensor([fit.bias], dtype=torch.float32), x, fit.weight[:, None])[:, 0]


def fit_token_probe(
    conversations: Sequence[ConversationTokens],
    hook_point: str,
    *,
    l2: float = 1e-2,
    max_iter: int = 200,
) -> ProbeFit:
    """Weighted logistic regression on the labeled tokens of ``conversations``."""
    rows, labels, weights = [], [], []
    counts = _both_labels(conversations)
    for conv in conversations:
        n = int(conv.labeled.sum())
        if n == 0:
            continue
        rows.append(conv.activations[hook_point][conv.labeled])
        labels.append(torch.full((n,), float(conv.label), dtype=torch.float64))
        # Each conversation weighs 1 / (conversations of its class), spread over its tokens.
        weights.append(torch.full((n,), 1.0 / (n * counts[conv.label]), dtype=torch.float64))
    x = torch.cat(rows).double()
    return _fit_standardised(
        x, torch.cat(labels), torch.cat(weights), hook_point, "logistic-token", l2, max_iter
    )


def _both_labels(conversations: Sequence[ConversationTokens]) -> dict[int, int]:
    counts = {0: 0, 1: 0}
    for conv in conversations:
        if bool(conv.labeled.any()):
            counts[conv.label] += 1
    if not counts[0] or not counts[1]:
        raise FeatureError(
            f"need conversations of both labels 0 and 1 with labeled tokens, got {counts}",
            field="label",
        )
    return counts


def _fit_standardised(
    x: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
    hook_point: str,
    method: str,
    l2: float,
    max_iter: int,
) -> ProbeFit:
    """Weighted logistic regression with L2 on standardised rows, folded into one ``w, b`` on
    the raw activations."""
    weight = weight / weight.sum() * len(weight)
    mu = (x * weight[:, None]).sum(0) / weight.sum()
    sigma = (((x - mu) ** 2) * weight[:, None]).sum(0).div(weight.sum()).sqrt().clamp(min=1e-6)
    z = (x - mu) / sigma
    w, b = _weighted_logistic(z, y, weight, l2, max_iter)
    folded = w / sigma
    bias = float(b - mu @ folded)
    accuracy = float(
        ((((x @ folded + bias) > 0).double() == y).double() * weight).sum() / weight.sum()
    )
    return ProbeFit(hook_point, folded.float(), bias, method, accuracy)


def pooled_vectors(conversation: ConversationTokens, hook_point: str, window: int) -> torch.Tensor:
    """[labeled turn ends, d_model] float64: at each labeled turn's last token, the mean of the
    last ``window`` labeled tokens' activations (across the labeled turns so far). A linear
    probe's value on it is the turn mean's score there (w.mean(h) + b = mean(w.h + b)); for one
    labeled turn of at most ``window`` tokens it is plain mean pooling of that turn."""
    x = conversation.activations[hook_point][conversation.labeled].double()
    ends = torch.nonzero(conversation.turn_ends[conversation.labeled])[:, 0]
    sums = torch.cat([x.new_zeros(1, x.shape[1]), torch.cumsum(x, 0)])
    starts = (ends + 1 - window).clamp(min=0)
    return (sums[ends + 1] - sums[starts]) / (ends + 1 - starts)[:, None]


def fit_pooled_probe(
    conversations: Sequence[ConversationTokens],
    hook_point: str,
    *,
    window: int = WHOLE_TURN,
    l2: float = 1e-2,
    max_iter: int = 200,
) -> ProbeFit:
    """Logistic regression on the pooled vectors (`pooled_vectors`): one example per labeled
    turn end, each conversation weighted equally and the classes balanced. The turn mean's
    starting point: served through ``max_rolling_mean:<window>,roles,turn_end`` it scores a
    conversation exactly as a mean-pooled probe scores its labeled turn."""
    counts = _both_labels(conversations)
    rows, labels, weights = [], [], []
    for conv in conversations:
        if not bool(conv.labeled.any()):
            continue
        pooled = pooled_vectors(conv, hook_point, window)
        n = len(pooled)
        rows.append(pooled)
        labels.append(torch.full((n,), float(conv.label), dtype=torch.float64))
        weights.append(torch.full((n,), 1.0 / (n * counts[conv.label]), dtype=torch.float64))
    return _fit_standardised(
        torch.cat(rows),
        torch.cat(labels),
        torch.cat(weights),
        hook_point,
        "logistic-turn-mean",
        l2,
        max_iter,
    )


def _weighted_logistic(
    z: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, l2: float, max_iter: int
) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(z @ w + b, y, weight=weight)
        loss = loss + 0.5 * l2 * (w @ w)
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach(), b.detach()


@dataclass
class AggregationFit:
    """The probe trained through the aggregation, and how training went on held-out data."""

    fit: ProbeFit
    steps: int  # the step kept (0: the per-token initialisation was best held out)
    initial_auroc: float  # held-out AUROC of the served score before training
    auroc: float  # ... and of the kept step


class _Padded:
    """Conversations as a padded [conversations, tokens] grid over their concatenated token rows,
    so the served score of every conversation is a few tensor operations."""

    def __init__(self, conversations: Sequence[ConversationTokens], hook_point: str) -> None:
        lengths = torch.tensor([c.tokens for c in conversations])
        self.count, width = len(conversations), max(int(lengths.max()), 1)
        starts = torch.cumsum(lengths, 0) - lengths
        columns = torch.arange(width)
        self.valid = columns[None, :] < lengths[:, None]
        total = max(int(lengths.sum()), 1)
        self.index = (starts[:, None] + columns[None, :]).clamp(max=total - 1)
        labeled = torch.cat([c.labeled for c in conversations])
        self.labeled = labeled[self.index] & self.valid
        turn_end = torch.cat([c.turn_ends for c in conversations])
        self.turn_end = turn_end[self.index] & self.valid
        self.labels = torch.tensor([float(c.label) for c in conversations], dtype=torch.float64)
        self.x = torch.cat([c.activations[hook_point] for c in conversations]).double()
        if bool(labeled.any()):
            self.labeled_rows = self.x[labeled]
        else:
            self.labeled_rows = self.x
        # The labeled tokens alone, as their own grid (``masked`` pooling: ``window_roles``),
        # with the length of the run of consecutive labeled tokens ending at each.
        rows = [
            torch.nonzero(c.labeled)[:, 0] + int(start)
            for c, start in zip(conversations, starts.tolist(), strict=True)
        ]
        runs = [labeled_runs(c.labeled) for c in conversations]
        counts = torch.tensor([len(r) for r in rows])
        columns = torch.arange(max(int(counts.max()), 1))
        self.masked_valid = columns[None, :] < counts[:, None]
        self.masked_index = torch.zeros(self.masked_valid.shape, dtype=torch.int64)
        self.masked_runs = torch.zeros(self.masked_valid.shape, dtype=torch.int64)
        for i, (r, run) in enumerate(zip(rows, runs, strict=True)):
            self.masked_index[i, : len(r)] = r
            self.masked_runs[i, : len(r)] = run
        self.masked_turn_end = turn_end[self.masked_index] & self.masked_valid

    def pooled(
        self,
        values: torch.Tensor,
        window: int,
        tau: float | None,
        guard: int = 1,
        masked: bool = False,
        turn_end: bool = False,
    ) -> torch.Tensor:
        """Per conversation: the max over labeled tokens of the rolling mean of the last
        ``window`` values of the stream (scoring.rolling_mean), with ``guard`` > 1 over runs of
        that many labeled tokens of the run's smallest mean (scoring.conversation_score); with
        ``tau``, a smooth max (``tau * logsumexp(r / tau)`` minus its value for equal inputs)
        for training. A conversation with no such run scores -inf (hard max) or a very
        negative number (smooth max). With ``masked`` the stream is the labeled tokens alone
        (scoring's ``,roles``), and a guard's run must not cross another role's tokens. With
        ``turn_end`` (no guard) the max is over the labeled turns' last tokens alone."""
        if masked:
            return self._pooled_masked(values, window, tau, guard, turn_end)
        grid = values[self.index] * self.valid
        sums = torch.cat([grid.new_zeros(self.count, 1), torch.cumsum(grid, 1)], 1)
        ends = torch.arange(1, grid.shape[1] + 1)
        starts = (ends - window).clamp(min=0)
        means = (sums[:, ends] - sums[:, starts]) / (ends - starts)
        where = self.labeled & self.turn_end if turn_end else self.labeled
        if guard > 1:
            padded = torch.cat([means.new_full((self.count, guard - 1), math.inf), means], 1)
            means = padded.unfold(1, guard, 1).min(2).values
            counts = torch.cat(
                [self.labeled.new_zeros(self.count, 1, dtype=torch.int64),
                 torch.cumsum(self.labeled.long(), 1)], 1
            )  # fmt: skip
            first = (ends - guard).clamp(min=0)
            where = (ends >= guard) & (counts[:, ends] - counts[:, first] == guard)
            where = where & self.labeled
        return _max(means, where, tau)

    def _pooled_masked(
        self, values: torch.Tensor, window: int, tau: float | None, guard: int, turn_end: bool
    ) -> torch.Tensor:
        valid = self.masked_valid
        grid = values[self.masked_index] * valid
        sums = torch.cat([grid.new_zeros(self.count, 1), torch.cumsum(grid, 1)], 1)
        ends = torch.arange(1, grid.shape[1] + 1)
        starts = (ends - window).clamp(min=0)
        means = (sums[:, ends] - sums[:, starts]) / (ends - starts)
        where = self.masked_turn_end if turn_end else valid
        if guard > 1:
            padded = torch.cat([means.new_full((self.count, guard - 1), math.inf), means], 1)
            means = padded.unfold(1, guard, 1).min(2).values
            where = valid & (self.masked_runs >= guard)
        return _max(means, where, tau)


class _TurnMeans:
    """Conversations as their pooled vectors (`pooled_vectors`, [turn ends, d_model]) for the
    turn mean (``max_rolling_mean:W,roles,turn_end``): the rolling mean of w.h_t + b over the
    labeled tokens, read at a labeled turn end, is w.p + b for that turn end's pooled vector p,
    so training through it needs one row per turn end, not the token grid of `_Padded` (the
    scores agree up to float64 rounding: a test checks it)."""

    def __init__(
        self, conversations: Sequence[ConversationTokens], hook_point: str, window: int
    ) -> None:
        vectors = [pooled_vectors(c, hook_point, window) for c in conversations]
        counts = torch.tensor([len(v) for v in vectors])
        self.count = len(conversations)
        self.x = torch.cat(vectors)
        columns = torch.arange(max(int(counts.max()), 1))
        self.valid = columns[None, :] < counts[:, None]
        starts = torch.cumsum(counts, 0) - counts
        self.index = (starts[:, None] + columns[None, :]).clamp(max=max(len(self.x) - 1, 0))
        self.labels = torch.tensor([float(c.label) for c in conversations], dtype=torch.float64)
        labeled = [c.activations[hook_point][c.labeled] for c in conversations]
        self.labeled_rows = torch.cat(labeled).double()

    def pooled(
        self,
        values: torch.Tensor,
        window: int,
        tau: float | None,
        guard: int = 1,
        masked: bool = True,
        turn_end: bool = True,
    ) -> torch.Tensor:
        """Per conversation: the max (hard, or smooth with ``tau`` as `_Padded.pooled`) of the
        probe's values on its pooled vectors (``values`` [turn ends]); the window is the one
        the vectors were pooled with."""
        return _max(values[self.index] * self.valid, self.valid, tau)


def _max(means: torch.Tensor, where: torch.Tensor, tau: float | None) -> torch.Tensor:
    """Per row, the max of ``means`` where ``where``: hard (``tau`` None; -inf for none) or
    smooth (``tau * logsumexp(m / tau)`` minus its value for equal inputs)."""
    if tau is None:
        return means.masked_fill(~where, -math.inf).max(1).values
    means = means.masked_fill(~where, -1e30)
    n = where.sum(1).clamp(min=1).double()
    return tau * (torch.logsumexp(means / tau, 1) - torch.log(n))


def fit_through_aggregation(
    fit_tokens: Sequence[ConversationTokens],
    heldout_tokens: Sequence[ConversationTokens],
    init: ProbeFit,
    window: int,
    *,
    guard: int = 1,
    masked: bool = False,
    turn_end: bool = False,
    l2: float = 1e-2,
    tau: float = 0.5,
    lr: float = 0.01,
    max_steps: int = 500,
    every: int = 10,
    patience: int = 100,
) -> AggregationFit:
    """Train the per-token probe with the rule's pooling inside the loss.

    The conversation score is ``max_t rolling_mean_W(w.h_t + b)`` over the labeled tokens, with
    a smooth max (temperature ``tau``) so every high window gets gradient (with ``guard`` > 1,
    over runs of that many labeled tokens of the run's smallest mean, what a rule with
    ``for: <guard> tokens`` fires on; with ``masked``, over the labeled tokens alone, what a
    rule with ``window_roles:`` the labeled roles serves; with ``turn_end``, read at the
    labeled turns' last tokens alone, what a rule with ``at: turn_end`` serves); the loss is BCE on
    the conversation label (classes balanced) plus L2 on the standardised weights. Only the
    tokens that carry the signal need to score high, where the per-token fit asks every token
    of a harmful request ("How do I ...") to. Full-batch Adam from ``init`` (the per-token
    fit); every ``every`` steps the *served* score (hard max) is measured on ``heldout_tokens``
    and the step with the best AUROC is kept (early stopping; step 0 is ``init``, so the result
    is never worse than it held out; when step 0 is best, ``init`` itself is returned).
    Deterministic: no sampling.
    """
    hook_point = init.hook_point
    train: _Padded | _TurnMeans
    heldout: _Padded | _TurnMeans
    if masked and turn_end and guard == 1:
        # The turn mean is linear in the pooled vectors: no token grid needed.
        train = _TurnMeans(fit_tokens, hook_point, window)
        heldout = _TurnMeans(heldout_tokens, hook_point, window)
    else:
        train = _Padded(fit_tokens, hook_point)
        heldout = _Padded(heldout_tokens, hook_point)
    labels = [int(y) for y in heldout.labels.tolist()]
    rows = train.labeled_rows
    mu = rows.mean(0)
    sigma = rows.std(0).clamp(min=1e-6)
    z_train = (train.x - mu) / sigma
    z_heldout = (heldout.x - mu) / sigma
    # The same probe on standardised inputs: w.x + b == (w * sigma).z + (b + w.mu).
    w0 = init.weight.double()
    w = (w0 * sigma).clone().requires_grad_(True)
    b = (torch.tensor(init.bias, dtype=torch.float64) + w0 @ mu).clone().requires_grad_(True)
    positives = float(train.labels.sum())
    pos_weight = torch.tensor((len(train.labels) - positives) / max(positives, 1.0))
    optimizer = torch.optim.Adam([w, b], lr=lr)
    best = (-math.inf, 0, w.detach().clone(), b.detach().clone())
    initial = math.nan
    for step in range(max_steps + 1):
        if step % every == 0:
            with torch.no_grad():
                served = heldout.pooled(z_heldout @ w + b, window, None, guard, masked, turn_end)
            score = auroc(served.tolist(), labels)
            if step == 0:
                initial = score
            if score > best[0]:
                best = (score, step, w.detach().clone(), b.detach().clone())
            elif step - best[1] >= patience:
                break
        if step == max_steps:
            break
        optimizer.zero_grad()
        pooled = train.pooled(z_train @ w + b, window, tau, guard, masked, turn_end)
        loss = nn.functional.binary_cross_entropy_with_logits(
            pooled, train.labels, pos_weight=pos_weight
        )
        (loss + 0.5 * l2 * (w @ w)).backward()
        optimizer.step()
    score, step, w_best, b_best = best
    if step == 0:  # training never beat the per-token fit held out: serve that fit unchanged
        return AggregationFit(init, 0, initial, score)
    folded = w_best / sigma
    bias = float(b_best - mu @ folded)
    # The source a pack records says where training started (the per-token fit, or the
    # pooled-vector fit of the turn mean).
    method = "logistic-token" if init.method == "logistic-token" else init.method
    fit = ProbeFit(hook_point, folded.float(), bias, f"{method}-aggregated", init.train_accuracy)
    return AggregationFit(fit, step, initial, score)


def score_conversations(
    conversations: Sequence[ConversationTokens], hook_point: str, fit: ProbeFit, aggregation: str
) -> list[float]:
    """Each conversation's score: the probe's per-token values pooled by ``aggregation``."""
    return [
        conversation_score(token_values(c, hook_point, fit), c.labeled, aggregation, c.turn_ends)
        for c in conversations
    ]


def choose_aggregation(
    heldout: Sequence[ConversationTokens],
    hook_point: str,
    fit: ProbeFit,
    fpr: float,
    windows: Sequence[int],
) -> tuple[str, dict[int, dict[str, float]]]:
    """The window with the best held-out AUROC (then recall at ``fpr``, then the shorter).
    AUROC first: recall at 1% FPR rests on a handful of negatives and is the noisier guide."""
    labels = [c.label for c in heldout]
    by_window: dict[int, dict[str, float]] = {}
    for window in windows:
        scores = score_conversations(heldout, hook_point, fit, f"max_rolling_mean:{window}")
        point = recall_at_fpr(scores, labels, fpr)
        by_window[window] = {"auroc": auroc(scores, labels), "recall": point.recall}
    best = max(windows, key=lambda w: (by_window[w]["auroc"], by_window[w]["recall"], -w))
    return f"max_rolling_mean:{best}", by_window


def choose_guard(
    heldout: Sequence[ConversationTokens],
    hook_point: str,
    fit: ProbeFit,
    guards: Sequence[int],
    window: int = WHOLE_TURN,
) -> tuple[str, float]:
    """The role-masked whole-turn mean's guard with the best held-out AUROC (then the
    shorter), and it."""
    labels = [c.label for c in heldout]
    best: tuple[float, int] = (-math.inf, 0)
    for guard in guards:
        aggregation = f"max_rolling_mean:{window},for:{guard},roles"
        score = auroc(score_conversations(heldout, hook_point, fit, aggregation), labels)
        if (score, -guard) > (best[0], -best[1]):
            best = (score, guard)
    return f"max_rolling_mean:{window},for:{best[1]},roles", best[0]


def window_reads_other_roles(conversations: Sequence[ConversationTokens], window: int) -> bool:
    """True if, in some conversation, the rolling mean over the last ``window`` tokens of the
    stream at a labeled token takes in a token of a role that does not carry the label (a
    system prompt or user turn just before the answer).

    Such a pooling can learn the *prompt* instead of the labeled text: the unmasked whole-turn
    mean learned the shipped deception set's instruction to lie (README, "Detection you can
    measure"). The role-masked whole-turn mean cannot; a short window still reads the last
    few prompt tokens at the start of a turn, which `fit_layers` reports
    (``windowed_reads_other_roles``).
    """
    for c in conversations:
        other = (~c.labeled).long()
        before = torch.cat([other.new_zeros(1), torch.cumsum(other, 0)])  # others before i
        ends = torch.arange(1, len(other) + 1)
        starts = (ends - window).clamp(min=0)
        if bool(((before[ends] - before[starts]) > 0)[c.labeled].any()):
            return True
    return False


def fit_layers(
    fit_tokens: Sequence[ConversationTokens],
    heldout_tokens: Sequence[ConversationTokens],
    hook_points: Sequence[str],
    *,
    fpr: float = 0.01,
    windows: Sequence[int] = WINDOWS,
    l2: float = 1e-2,
    train_aggregation: bool = True,
    guards: Sequence[int] = GUARDS,
    turn_mean: bool = True,
) -> list[LayerResult]:
    """Fit, choose the aggregation and set the threshold, per hook point.

    The per-token fit chooses the window; with ``train_aggregation`` the probe is then trained
    through that aggregation (`fit_through_aggregation`), early-stopped on ``heldout_tokens``.
    With ``guards`` (and training), a second candidate is trained through the role-masked
    whole-turn mean (``max_rolling_mean:WHOLE_TURN,for:K,roles``: the labeled roles' tokens
    alone, the guard K chosen by the per-token fit's held-out AUROC) and whichever of the two
    serves the better held-out AUROC is kept. It reads no other role, so it is offered for
    every data set (the unmasked whole-turn mean it replaces learned a system prompt). With
    ``turn_mean`` (and training), a third candidate, the turn mean (``TURN_MEAN``: that mean
    read only at each labeled turn's last token, served with ``at: turn_end``), starts from a
    logistic regression on the pooled vectors (`fit_pooled_probe`) and is trained through its
    pooling too; the best held-out AUROC of the three is kept (ties keep the earlier one: the
    windowed pooling alerts without waiting for a guard, the whole-turn mean before the turn
    ends).
    """
    results = []
    labels = [c.label for c in heldout_tokens]
    negatives = labels.count(0)
    if negatives == 0 or labels.count(1) == 0:
        raise FeatureError("the held-out split needs both labels", field="label")
    # Too few negatives to resolve ``fpr`` on new data (the conformal rank, monitor.conformal,
    # needs n >= (1 - fpr) / fpr): the threshold is the highest negative score (none of them
    # above it), the lowest rate these negatives can show.
    resolvable = negatives >= minimum_negatives(fpr)
    for hp in hook_points:
        fit = fit_token_probe(fit_tokens, hp, l2=l2)
        aggregation, by_window = choose_aggregation(heldout_tokens, hp, fit, fpr, windows)
        trained = None
        _, window = parse_aggregation(aggregation)
        # Whether the windowed candidate reads another role's tokens (a prompt's last tokens
        # at a turn's start): then it could partly learn the prompt (reported, not gated).
        reads = any(window_reads_other_roles(t, window) for t in (fit_tokens, heldout_tokens))
        extra: dict[str, float] = {"windowed_reads_other_roles": float(reads)}
        if train_aggregation:
            per_token = fit
            trained = fit_through_aggregation(fit_tokens, heldout_tokens, fit, window, l2=l2)
            fit = trained.fit
            if guards or turn_mean:
                extra["auroc_windowed"] = trained.auroc
            if guards:
                whole, _ = choose_guard(heldout_tokens, hp, per_token, guards)
                _, whole_window = parse_aggregation(whole)
                candidate = fit_through_aggregation(
                    fit_tokens, heldout_tokens, per_token, whole_window,
                    guard=aggregation_guard(whole), masked=aggregation_masked(whole), l2=l2,
                )  # fmt: skip
                extra |= {
                    "auroc_whole_turn": candidate.auroc,
                    "whole_turn_guard": float(aggregation_guard(whole)),
                }
                # Ties keep the windowed pooling: it alerts without waiting for a guard.
                if candidate.auroc > trained.auroc:
                    trained, fit, aggregation = candidate, candidate.fit, whole
            if turn_mean:
                pooled_fit = fit_pooled_probe(fit_tokens, hp, window=WHOLE_TURN, l2=l2)
                _, turn_window = parse_aggregation(TURN_MEAN)
                turn = fit_through_aggregation(
                    fit_tokens, heldout_tokens, pooled_fit, turn_window,
                    masked=aggregation_masked(TURN_MEAN),
                    turn_end=aggregation_turn_end(TURN_MEAN), l2=l2,
                )  # fmt: skip
                # The pooled-vector fit served exactly (step 0), and what training added.
                extra |= {
                    "auroc_turn_mean": turn.auroc,
                    "auroc_turn_mean_pooled": turn.initial_auroc,
                }
                if turn.auroc > trained.auroc:
                    trained, fit, aggregation = turn, turn.fit, TURN_MEAN
        scores = score_conversations(heldout_tokens, hp, fit, aggregation)
        negative_scores = [s for s, y in zip(scores, labels, strict=True) if y == 0]
        threshold = (
            calibrated_threshold(negative_scores, fpr) if resolvable else max(negative_scores)
        )
        point = operating_point(scores, labels, threshold)
        heldout = {
            "auroc": auroc(scores, labels),
            "recall": point.recall,
            "fpr": point.fpr,
            # One-sided 95% Clopper-Pearson bound of the rate on new data from this source
            # (monitor.conformal): the held-out split also chose the window and layer, so it
            # is a little optimistic.
            "fpr_upper_95": fpr_upper_bound(round(point.fpr * negatives), negatives),
            "conversations": float(len(heldout_tokens)),
            "negatives": float(negatives),
            # 1.0 when the negatives could not resolve ``fpr`` and the threshold is their max.
            "threshold_at_max_negative": float(not resolvable),
        }
        if trained is not None:
            # What training through the aggregation gained over the fit it started from, held
            # out (the turn mean starts from the pooled-vector fit: auroc_turn_mean_pooled).
            if aggregation != TURN_MEAN:
                heldout["auroc_per_token_fit"] = trained.initial_auroc
            heldout["aggregation_steps"] = float(trained.steps)
        heldout.update(extra)
        results.append(LayerResult(hp, fit, aggregation, threshold, heldout, by_window))
    return results


def fit_token_probe_pack(
    model: nn.Module,
    tokenizer: Any,
    fit_data: Sequence[ConversationLike],
    heldout_data: Sequence[ConversationLike],
    layers: Sequence[int],
    *,
    name: str,
    feature_name: str,
    fpr: float = 0.01,
    windows: Sequence[int] = WINDOWS,
    l2: float = 1e-2,
    train_aggregation: bool = True,
    guards: Sequence[int] = GUARDS,
    turn_mean: bool = True,
    category: str = "",
    description: str = "",
    data_name: str = "",
    progress: Callable[[int], None] | None = None,
) -> tuple[FeaturePack, FitReport]:
    """Replay both splits, fit per layer, and build the pack.

    The layer with the best held-out AUROC (then recall at ``fpr``) gets the plain
    ``feature_name`` (what rules refer to, e.g. ``probes/misuse``); the other layers are
    ``<feature_name>.layers.<i>``.
    """
    started = time.perf_counter()
    fit_tokens = replay(model, tokenizer, fit_data, layers, progress=progress)
    heldout_tokens = replay(model, tokenizer, heldout_data, layers, progress=progress)
    hook_points = [f"layers.{i}" for i in layers]
    results = fit_layers(
        fit_tokens, heldout_tokens, hook_points, fpr=fpr, windows=windows, l2=l2,
        train_aggregation=train_aggregation, guards=guards, turn_mean=turn_mean,
    )  # fmt: skip
    chosen = max(results, key=lambda r: (r.heldout["auroc"], r.heldout["recall"])).hook_point
    roles = labeled_roles(fit_data)
    entries = []
    for result in results:
        trained_note = (
            " trained through the aggregation" if result.fit.method.endswith("aggregated") else ""
        )
        fname = (
            feature_name if result.hook_point == chosen else f"{feature_name}.{result.hook_point}"
        )
        info = FeatureInfo(
            name=fname,
            hook_point=result.hook_point,
            activation="identity",
            sae_index=None,
            category=category,
            description=description
            or (
                f"per-token logistic probe{trained_note}, {result.aggregation}; held-out AUROC "
                f"{result.heldout['auroc']:.3f}, recall {result.heldout['recall']:.3f} at "
                f"FPR {result.heldout['fpr']:.3f}"
            ),
            source=f"probe:{result.fit.method}",
            alert_threshold=result.threshold,
            target_fpr=fpr,
            aggregation=result.aggregation,
            threshold_pooling=result.aggregation,
            labeled_roles=roles,
        )
        entries.append(HookPointEncoder(result.hook_point, probe_encoder(result.fit), [info]))
    pack = assemble_pack(name, entries)
    pack.provenance = {
        "fit": {
            "data": data_name,
            "conversations": len(fit_data),
            "digests": sorted(text_digest(c) for c in fit_data),
        },
        "heldout": {
            "conversations": len(heldout_data),
            "metrics": {r.hook_point: r.heldout for r in results},
            "fpr": fpr,
        },
    }
    report = FitReport(
        results, chosen, len(fit_data), len(heldout_data), time.perf_counter() - started
    )
    return pack, report


def labeled_roles(conversations: Sequence[ConversationLike]) -> tuple[str, ...]:
    """The roles whose tokens carry the label in any of ``conversations`` (those named by
    ``label_roles``, else every role present), sorted: what a pack records of its fit data."""
    return tuple(sorted({role for c in conversations for role in c.labeled_roles}))


def fit_digests(pack: FeaturePack) -> set[str]:
    """Content digests of the conversations a pack's probes were fitted on (empty if unknown)."""
    fit = pack.provenance.get("fit", {}) if isinstance(pack.provenance, dict) else {}
    digests = fit.get("digests", []) if isinstance(fit, dict) else []
    return {d for d in digests if isinstance(d, str)}
