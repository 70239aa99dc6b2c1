"""Supervised linear probes (pack features with the 'identity' activation) and calibration.

A probe is one direction ``w`` and bias ``b`` at a hook point: its feature value per token is
the logit ``x @ w + b``. Fitting standardises the pooled activations (residual streams have a
few huge dimensions), then folds the standardisation back into ``w`` and ``b`` so the pack
runs it as one more column of the same GEMM.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from monitor.conformal import threshold_index
from monitor.features.build.builder import assemble_pack
from monitor.features.encoder import RestrictedEncoder
from monitor.features.errors import FeatureError
from monitor.features.pack import FeatureInfo, FeaturePack, HookPointEncoder
from monitor.hookpoints import hook_point_name
from monitor.layerlist import layer_list

POOLINGS = ("mean", "last", "max")
METHODS = ("logistic", "diff-means")


@dataclass(frozen=True)
class LabeledExample:
    """One labelled example: a text or a chat (`messages`), label 1 (the behaviour) or 0."""

    text: str | None  # one of text / messages
    messages: list[dict[str, str]] | None
    label: int  # 1 = positive (the behaviour to detect), 0 = negative


@dataclass(frozen=True)
class ProbeFit:
    """A fitted linear probe at one hook point: weight and bias on raw activations, the method and
    its training accuracy.
    """

    hook_point: str
    weight: torch.Tensor  # [d_model] float32, applies to raw activations
    bias: float
    method: str
    train_accuracy: float


# --- data ---------------------------------------------------------------------------------


def load_labeled_jsonl(path: str | Path) -> list[LabeledExample]:
    """``{"text": ..., "label": 0|1}`` or ``{"messages": [{"role", "content"}...], "label"}``."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise FeatureError("file not found", where=path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FeatureError(f"cannot read: {exc}", where=path) from exc
    examples = [
        _example(line, path, number) for number, line in enumerate(lines, start=1) if line.strip()
    ]
    if not examples:
        raise FeatureError("no examples", where=path)
    return examples


def _example(line: str, path: Path, number: int) -> LabeledExample:
    where = f"{path}:{number}"
    try:
        item = json.loads(line)
    except json.JSONDecodeError as exc:
        raise FeatureError(f"invalid JSON ({exc})", where=where) from None
    if not isinstance(item, dict):
        raise FeatureError("expected a JSON object", where=where)
    label = item.get("label")
    if isinstance(label, bool):
        label = int(label)
    if label not in (0, 1):
        raise FeatureError(
            f"expected 0, 1, true or false, got {label!r}", where=where, field="label"
        )
    text, messages = item.get("text"), item.get("messages")
    if isinstance(text, str) and messages is None:
        return LabeledExample(text, None, label)
    if text is None and _is_messages(messages):
        return LabeledExample(None, messages, label)
    raise FeatureError(
        "expected a string 'text' or a list of {role, content} 'messages'",
        where=where,
        field="text",
    )


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value
    )


def render(example: LabeledExample, tokenizer: Any) -> str:
    """The text a model sees: chat messages through the tokenizer's template when it has one."""
    if example.messages is None:
        assert example.text is not None
        return example.text
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(example.messages, tokenize=False)
    return "\n".join(f"{m['role']}: {m['content']}" for m in example.messages)


# --- activations --------------------------------------------------------------------------


def find_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers; FeatureError when it has none at a known path."""
    found = layer_list(model)
    if found is not None:
        return found
    raise FeatureError(f"{type(model).__name__}: no decoder layer list found", field="model")


@torch.no_grad()
def token_activations(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    layers: Sequence[int],
    *,
    batch_size: int = 8,
    max_length: int = 512,
) -> dict[str, list[torch.Tensor]]:
    """Per hook point ``layers.<i>``, each text's ``[tokens, d_model]`` float32 activations (the
    output of decoder layer i, captured by a forward hook, as the capture client sends it)."""
    layer_list = find_layers(model)
    for i in layers:
        if not 0 <= i < len(layer_list):
            raise FeatureError(f"layer {i} out of range [0, {len(layer_list)})", field="layers")
    captured: dict[int, torch.Tensor] = {}
    hooks = [layer_list[i].register_forward_hook(_capture(captured, i)) for i in layers]
    result: dict[str, list[torch.Tensor]] = {hook_point_name(i): [] for i in layers}
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                list(texts[start : start + batch_size]),
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
            )
            model(**batch)
            mask = batch["attention_mask"].bool()
            for i in layers:
                for row, keep in zip(captured[i], mask, strict=True):
                    result[hook_point_name(i)].append(row[keep].float())
    finally:
        for hook in hooks:
            hook.remove()
    return result


def _capture(store: dict[int, torch.Tensor], index: int) -> Any:
    def hook(module: nn.Module, inputs: Any, output: Any) -> None:
        # transformers 5 decoder layers return a tensor; older ones and BERT a tuple.
        store[index] = output[0] if isinstance(output, tuple) else output

    return hook


def pool(tokens: torch.Tensor, pooling: str) -> torch.Tensor:
    """``[tokens, d]`` -> ``[d]``."""
    if pooling == "mean":
        return tokens.mean(dim=0)
    if pooling == "last":
        return tokens[-1]
    if pooling == "max":
        return tokens.max(dim=0).values
    raise FeatureError(f"{pooling!r}, expected one of {', '.join(POOLINGS)}", field="pooling")


# --- fitting ------------------------------------------------------------------------------


def fit_probe(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    method: str = "logistic",
    l2: float = 1e-2,
    max_iter: int = 200,
    hook_point: str = "",
) -> ProbeFit:
    """Fit one probe on pooled activations ``x [n, d]`` and labels ``y [n]`` (0/1)."""
    labels = y.double()
    check_two_classes(labels)
    if method not in METHODS:
        raise FeatureError(f"{method!r}, expected one of {', '.join(METHODS)}", field="method")
    x64 = x.double()
    mu, sigma = x64.mean(dim=0), x64.std(dim=0).clamp(min=1e-6)
    z = (x64 - mu) / sigma
    if method == "logistic":
        w, b = _logistic(z, labels, l2, max_iter)
    else:
        w, b = _diff_means(z, labels)
    # Fold the standardisation: ((x - mu) / sigma) @ w + b == x @ (w / sigma) + (b - mu @ w').
    weight = w / sigma
    bias = float(b - mu @ weight)
    accuracy = float((((x64 @ weight + bias) > 0).double() == labels).double().mean())
    return ProbeFit(hook_point, weight.float(), bias, method, accuracy)


def check_two_classes(labels: torch.Tensor) -> None:
    """FeatureError unless both labels 0 and 1 occur."""
    classes = sorted(int(c) for c in labels.unique().tolist())
    if classes != [0, 1]:
        raise FeatureError(
            f"need examples of both labels 0 and 1, got only label {classes}", field="label"
        )


def _logistic(
    z: torch.Tensor, y: torch.Tensor, l2: float, max_iter: int
) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = z @ w + b
        loss = nn.functional.binary_cross_entropy_with_logits(logits, y) + 0.5 * l2 * (w @ w)
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach(), b.detach()


def _diff_means(z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    positive, negative = z[y == 1].mean(dim=0), z[y == 0].mean(dim=0)
    w = positive - negative
    # Zero at the midpoint of the class means, positive on the positive side.
    return w, -(w @ (positive + negative)) / 2


def fit_probes(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[LabeledExample],
    layers: Sequence[int],
    *,
    name: str,
    feature_name: str = "probe",
    method: str = "logistic",
    pooling: str = "mean",
    l2: float = 1e-2,
    category: str = "",
    description: str = "",
    labeled_roles: Sequence[str] = (),
) -> FeaturePack:
    """Fit one probe per layer on a transformers model's activations; a pack of them.
    ``labeled_roles``: the roles whose text the examples hold, recorded in each feature."""
    labels = torch.tensor([e.label for e in examples])
    check_two_classes(labels)  # before the costly forward passes
    if pooling not in POOLINGS or method not in METHODS:
        raise FeatureError(f"pooling {pooling!r} / method {method!r}", field="options")
    texts = [render(e, tokenizer) for e in examples]
    activations = token_activations(model, tokenizer, texts, layers)
    entries = []
    for hp, per_text in activations.items():
        x = torch.stack([pool(t, pooling) for t in per_text])
        fit = fit_probe(x, labels, method=method, l2=l2, hook_point=hp)
        # The first layer keeps the plain name rules refer to ('probes/misuse'); others are
        # '<name>.layers.<i>'.
        fname = feature_name if hp == f"layers.{layers[0]}" else f"{feature_name}.{hp}"
        info = FeatureInfo(
            name=fname,
            hook_point=hp,
            activation="identity",
            sae_index=None,
            category=category,
            description=description
            or f"{method} probe, {pooling} pooling, train accuracy {fit.train_accuracy:.3f}",
            source=f"probe:{method}:{pooling}",
            # What the fit pooled; `pack calibrate` uses it unless told otherwise.
            aggregation=pooling if pooling in ("mean", "max") else "",
            labeled_roles=tuple(sorted(set(labeled_roles))),
        )
        entries.append(HookPointEncoder(hp, probe_encoder(fit), [info]))
    return assemble_pack(name, entries)


def probe_encoder(fit: ProbeFit) -> RestrictedEncoder:
    """A fitted probe as a one-column encoder: its logit, never floored."""
    return RestrictedEncoder(
        weight=fit.weight.unsqueeze(1).contiguous(),
        bias=torch.tensor([fit.bias], dtype=torch.float32),
        floor=torch.tensor([-math.inf]),
        normalization="none",
    )


# --- calibration --------------------------------------------------------------------------


def calibrate_thresholds(scores: torch.Tensor, fpr: float) -> torch.Tensor:
    """Per-column threshold t for ``fpr`` on new data from the source of the benign
    ``scores [n, k]``: the split-conformal rank (`monitor.conformal`), the k-th smallest score
    with k = ceil((n + 1)(1 - fpr)), so at most n - k of them are above t."""
    n = scores.shape[0]
    try:
        index = threshold_index(n, fpr)
    except ValueError as e:  # out of (0, 1), or too few samples for the rank
        raise FeatureError(str(e), field="fpr") from None
    ordered = scores.double().sort(dim=0).values
    return ordered[index].float()


def sample_scores(
    pack: FeaturePack, hook_point: str, samples: Sequence[torch.Tensor], pooling: str = "max"
) -> torch.Tensor:
    """``[n, k]``: each sample's ``[tokens, d]`` activations encoded, pooled over tokens."""
    return torch.stack([pool(pack.encode(hook_point, s), pooling) for s in samples])


def calibrate_pack(
    pack: FeaturePack,
    scores: dict[str, torch.Tensor],
    fpr: float,
    pooling: dict[str, str] | None = None,
) -> FeaturePack:
    """A copy of ``pack`` whose features at each hook point of ``scores`` carry the alert
    threshold for ``fpr`` on those benign scores (``[n, k]`` per hook point), and the pooling
    (per feature name) that produced the scores."""
    updated: dict[str, FeatureInfo] = {}
    for hp, values in scores.items():
        features = pack.hook_points[hp].features
        if values.shape[1] != len(features):
            raise FeatureError(
                f"{values.shape[1]} score columns for {len(features)} features", field=hp
            )
        thresholds = calibrate_thresholds(values, fpr).tolist()
        for info, threshold in zip(features, thresholds, strict=True):
            updated[info.name] = replace(
                info,
                alert_threshold=threshold,
                target_fpr=fpr,
                threshold_pooling=(pooling or {}).get(info.name, ""),
            )
    return pack.with_features(updated)
