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
   by AUROC.
3. The alert threshold is set on the calibration split's negatives for the target FPR, with
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

from monitor.features.build.builder import assemble_pack
from monitor.features.build.conversations import (
    ConversationLike,
    ConversationTokens,
    replay,
    text_digest,
)
from monitor.features.build.probes import ProbeFit, probe_encoder
from monitor.features.build.scoring import (
    auroc,
    conversation_score,
    operating_point,
    recall_at_fpr,
    threshold_at_fpr,
)
from monitor.features.errors import FeatureError
from monitor.features.pack import FeatureInfo, FeaturePack, HookPointEncoder

WINDOWS = (1, 4, 8, 16, 32)


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
    counts = {0: 0, 1: 0}
    for conv in conversations:
        if bool(conv.labeled.any()):
            counts[conv.label] += 1
    if not counts[0] or not counts[1]:
        raise FeatureError(
            f"need conversations of both labels 0 and 1 with labeled tokens, got {counts}",
            field="label",
        )
    for conv in conversations:
        n = int(conv.labeled.sum())
        if n == 0:
            continue
        rows.append(conv.activations[hook_point][conv.labeled])
        labels.append(torch.full((n,), float(conv.label), dtype=torch.float64))
        # Each conversation weighs 1 / (conversations of its class), spread over its tokens.
        weights.append(torch.full((n,), 1.0 / (n * counts[conv.label]), dtype=torch.float64))
    x = torch.cat(rows).double()
    y = torch.cat(labels)
    weight = torch.cat(weights)
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
    return ProbeFit(hook_point, folded.float(), bias, "logistic-token", accuracy)


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


def score_conversations(
    conversations: Sequence[ConversationTokens], hook_point: str, fit: ProbeFit, aggregation: str
) -> list[float]:
    """Each conversation's score: the probe's per-token values pooled by ``aggregation``."""
    return [
        conversation_score(token_values(c, hook_point, fit), c.labeled, aggregation)
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


def fit_layers(
    fit_tokens: Sequence[ConversationTokens],
    heldout_tokens: Sequence[ConversationTokens],
    hook_points: Sequence[str],
    *,
    fpr: float = 0.01,
    windows: Sequence[int] = WINDOWS,
    l2: float = 1e-2,
) -> list[LayerResult]:
    """Fit, choose the aggregation and set the threshold, per hook point."""
    results = []
    labels = [c.label for c in heldout_tokens]
    negatives = labels.count(0)
    if negatives == 0 or labels.count(1) == 0:
        raise FeatureError("the held-out split needs both labels", field="label")
    # Too few negatives to resolve ``fpr``: the threshold goes just above the highest negative
    # score (none of them above it), which is the lowest rate these negatives can show.
    resolvable = math.floor(fpr * negatives) >= 1
    for hp in hook_points:
        fit = fit_token_probe(fit_tokens, hp, l2=l2)
        aggregation, by_window = choose_aggregation(heldout_tokens, hp, fit, fpr, windows)
        scores = score_conversations(heldout_tokens, hp, fit, aggregation)
        negative_scores = [s for s, y in zip(scores, labels, strict=True) if y == 0]
        threshold = threshold_at_fpr(negative_scores, fpr) if resolvable else max(negative_scores)
        point = operating_point(scores, labels, threshold)
        heldout = {
            "auroc": auroc(scores, labels),
            "recall": point.recall,
            "fpr": point.fpr,
            "conversations": float(len(heldout_tokens)),
            "negatives": float(negatives),
            # 1.0 when the negatives could not resolve ``fpr`` and the threshold is their max.
            "threshold_at_max_negative": float(not resolvable),
        }
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
    results = fit_layers(fit_tokens, heldout_tokens, hook_points, fpr=fpr, windows=windows, l2=l2)
    chosen = max(results, key=lambda r: (r.heldout["auroc"], r.heldout["recall"])).hook_point
    entries = []
    for result in results:
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
                f"per-token logistic probe, {result.aggregation}; held-out AUROC "
                f"{result.heldout['auroc']:.3f}, recall {result.heldout['recall']:.3f} at "
                f"FPR {result.heldout['fpr']:.3f}"
            ),
            source="probe:logistic-token",
            alert_threshold=result.threshold,
            target_fpr=fpr,
            aggregation=result.aggregation,
            threshold_pooling=result.aggregation,
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


def fit_digests(pack: FeaturePack) -> set[str]:
    """Content digests of the conversations a pack's probes were fitted on (empty if unknown)."""
    fit = pack.provenance.get("fit", {}) if isinstance(pack.provenance, dict) else {}
    digests = fit.get("digests", []) if isinstance(fit, dict) else []
    return {d for d in digests if isinstance(d, str)}
