"""`safety-monitor eval`: labeled conversations through the real path, measured.

A sidecar starts on a loopback port with the given packs and rules (the production server, in
a background thread). The capture client attaches to the model and every conversation is
replayed turn by turn (`monitor.features.build.conversations`), so its tokens travel capture ->
relay process -> gRPC stream -> sidecar -> rules exactly as in production; the alerts that come
back on the stream are what the per-rule numbers count. The feature values behind the
per-feature numbers come from the same sidecar, through its Evaluate RPC with
``include_features`` on the activations the replay captured, pooled with each feature's
recorded aggregation.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from monitor.features.build.conversations import ConversationLike, ConversationTokens, replay
from monitor.features.build.scoring import auroc, conversation_score, operating_point, recall_at_fpr
from monitor.features.pack import FeaturePack, load_pack

DEFAULT_FPRS = (0.01, 0.05)
_EVALUATE_ROWS = 8192  # rows per Evaluate message (each [rows, d_model] float32)


@dataclass
class RuleResult:
    """A rule's conversation-level numbers on the labeled set."""

    rule: str
    category: str
    severity: str
    recall: float
    fpr: float
    precision: float
    true_positives: int
    false_positives: int
    positives: int
    negatives: int
    tokens_to_first_alert_median: float  # over detected positives, from their first labeled token
    tokens_to_first_alert_p90: float


@dataclass
class FeatureResult:
    """A feature's pooled score: AUROC, recall at fixed FPRs, and at the pack's threshold."""

    feature: str
    aggregation: str
    auroc: float
    at_fpr: dict[float, tuple[float, float, float]]  # fpr -> (threshold, recall, actual fpr)
    pack_threshold: tuple[float, float, float] | None  # (threshold, recall, fpr)
    roc: tuple[list[float], list[float]] = field(default_factory=lambda: ([], []))


@dataclass
class EvalReport:
    """Everything `eval` measured, for the table, the JSON and the plot."""

    conversations: int
    positives: int
    negatives: int
    rules: list[RuleResult]
    features: list[FeatureResult]
    seconds: float
    capture: dict[str, Any]


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    pack_paths: Sequence[Path],
    rule_paths: Sequence[Path],
    conversations: Sequence[ConversationLike],
    *,
    model_name: str = "",
    fprs: Sequence[float] = DEFAULT_FPRS,
    progress: Callable[[int], None] | None = None,
    timeout: float = 600.0,
) -> EvalReport:
    """Run ``conversations`` through capture -> sidecar -> rules and measure."""
    from monitor.sidecar.config import Limits, SidecarConfig
    from monitor.sidecar.process import SidecarThread

    started = time.perf_counter()
    packs = [load_pack(path) for path in pack_paths]
    layers = sorted({int(hp.split(".")[1]) for p in packs for hp in p.hook_points})
    ids = [f"eval-{i}" for i in range(len(conversations))]
    id_of = {conversation.id: ids[i] for i, conversation in enumerate(conversations)}
    if len(id_of) != len(conversations):
        raise ValueError("conversation ids are not unique")
    config = SidecarConfig(
        listen="127.0.0.1:0",
        metrics_port=0,
        packs=tuple(Path(p) for p in pack_paths),
        rules=tuple(Path(r) for r in rule_paths),
        rules_reload_seconds=0,
        log_format="json",
        log_level="error",
        device="cpu",
        limits=Limits(max_conversations=max(len(conversations) + 1, 1000)),
    )
    sidecar = SidecarThread(config)
    running = sidecar.start()
    try:
        target = f"127.0.0.1:{running.port}"
        alerts, tokens, capture = _stream(
            model, tokenizer, target, model_name, conversations, id_of, layers, progress, timeout
        )
        features = _served_features(target, packs, tokens, ids, model_name)
    finally:
        sidecar.stop()
    ruleset_rules = _rule_meta(rule_paths, packs)
    labels = [int(c.label) for c in conversations]
    rules = [
        _rule_result(name, meta, alerts.get(name, {}), ids, labels, tokens)
        for name, meta in ruleset_rules.items()
    ]
    feature_results = [
        _feature_result(name, aggregation, features[name], tokens, labels, fprs, threshold)
        for name, (aggregation, threshold) in _feature_meta(packs).items()
        if name in features
    ]
    return EvalReport(
        len(conversations),
        labels.count(1),
        labels.count(0),
        rules,
        feature_results,
        time.perf_counter() - started,
        capture,
    )


def _stream(
    model: nn.Module,
    tokenizer: Any,
    target: str,
    model_name: str,
    conversations: Sequence[ConversationLike],
    id_of: dict[str, str],
    layers: list[int],
    progress: Callable[[int], None] | None,
    timeout: float,
) -> tuple[dict[str, dict[str, int]], list[ConversationTokens], dict[str, Any]]:
    from monitor.capture import CaptureClient

    alerts: dict[str, dict[str, int]] = {}

    def on_alert(alert: Any) -> None:  # called on the client's reader thread
        first = alerts.setdefault(alert.rule, {})
        if alert.conversation_id not in first or alert.position < first[alert.conversation_id]:
            first[alert.conversation_id] = alert.position

    # Block rather than drop: a measurement must see every token.
    client = CaptureClient(
        target,
        model_name=model_name,
        on_full="block",
        block_timeout=timeout,
        on_alert=on_alert,
        metrics_registry=None,
    )
    renamed = [_Renamed(c, id_of[c.id]) for c in conversations]
    try:
        client.attach(model, layers)

        def around(ids: list[str], roles: list[str]) -> contextlib.AbstractContextManager[Any]:
            # Each replayed turn is one forward pass: its last row ends the turn (where a
            # rule with `at: turn_end` reads the turn's mean, as the pooled score does).
            return client.conversation(ids, role=roles, turn_end=True)

        tokens = replay(model, tokenizer, renamed, layers, around=around, progress=progress)
        if not client.flush(timeout):
            raise RuntimeError(f"the sidecar did not acknowledge every step within {timeout} s")
        stats = client.stats
    finally:
        client.close()
    capture = {
        "steps": stats.steps_captured,
        "acked": stats.batches_acked,
        "rejected": stats.batches_rejected,
        "rows": stats.rows_acked,
        "dropped": dict(stats.dropped),
    }
    expected_rows = sum(t.tokens for t in tokens)
    if stats.batches_rejected or stats.dropped or stats.rows_acked != expected_rows:
        raise RuntimeError(
            f"not every token reached the rules: {stats.rows_acked} of {expected_rows} rows "
            f"acknowledged, {stats.batches_rejected} batches rejected, "
            f"dropped {dict(stats.dropped)}"
        )
    return alerts, tokens, capture


@dataclass(frozen=True)
class _Renamed:
    """A conversation under the id the eval streams it as (ids must be unique and short)."""

    inner: Any
    id: str

    @property
    def label(self) -> int:
        return int(self.inner.label)

    @property
    def turns(self) -> Sequence[Any]:
        return self.inner.turns

    @property
    def labeled_roles(self) -> tuple[str, ...]:
        return tuple(self.inner.labeled_roles)


def _served_features(
    target: str,
    packs: Sequence[FeaturePack],
    tokens: Sequence[ConversationTokens],
    ids: Sequence[str],
    model_name: str,
) -> dict[str, list[torch.Tensor]]:
    """Per feature, each conversation's per-token values as the sidecar computes them."""
    import grpc

    from monitor.wire import encode_tensor, pb, pb_grpc

    names = [f"{p.name}/{i.name}" for p in packs for i in p.features()]
    served: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    hook_points = sorted({hp for p in packs for hp in p.hook_points})
    with grpc.insecure_channel(
        target, options=[("grpc.max_send_message_length", 256 * 1024 * 1024)]
    ) as channel:
        stub = pb_grpc.SafetyMonitorStub(channel)
        for chunk in _chunks(tokens, _EVALUATE_ROWS):
            batch = pb.StepBatch(seq_no=1, model=model_name)
            for hp in hook_points:
                rows = torch.cat([tokens[i].activations[hp] for i in chunk])
                batch.layers.append(pb.Layer(hook_point=hp, activations=encode_tensor(rows)))
            for i in chunk:
                batch.sequences.append(
                    pb.Sequence(conversation_id=ids[i], rows=tokens[i].tokens, position=0)
                )
            reply = stub.Evaluate(pb.EvaluateRequest(batch=batch, include_features=True))
            if reply.HasField("error"):
                raise RuntimeError(f"sidecar Evaluate: {reply.error.reason}: {reply.error.message}")
            values = {
                f.name: torch.tensor(list(f.values), dtype=torch.float32) for f in reply.features
            }
            offset = 0
            for i in chunk:
                for name in names:
                    served[name].append(values[name][offset : offset + tokens[i].tokens])
                offset += tokens[i].tokens
    return served


def _chunks(tokens: Sequence[ConversationTokens], rows: int) -> list[list[int]]:
    chunks: list[list[int]] = [[]]
    count = 0
    for i, conversation in enumerate(tokens):
        if chunks[-1] and count + conversation.tokens > rows:
            chunks.append([])
            count = 0
        chunks[-1].append(i)
        count += conversation.tokens
    return [c for c in chunks if c]


def _rule_meta(rule_paths: Sequence[Path], packs: Sequence[FeaturePack]) -> dict[str, Any]:
    from monitor.evaluation.engine_replay import pack_features
    from monitor.rules import load_rules

    ruleset = load_rules(list(rule_paths), pack_features(packs))
    return {rule.name: rule for rule in ruleset.enabled_rules}


def _feature_meta(packs: Sequence[FeaturePack]) -> dict[str, tuple[str, float | None]]:
    meta = {}
    for pack in packs:
        for info in pack.features():
            aggregation = info.aggregation or "max"
            # The pack's threshold is comparable only if calibrated with the same pooling.
            same = (info.threshold_pooling or "") in (aggregation, "")
            threshold = info.alert_threshold if same and info.threshold_pooling else None
            meta[f"{pack.name}/{info.name}"] = (aggregation, threshold)
    return meta


def _rule_result(
    name: str,
    rule: Any,
    first: dict[str, int],
    ids: Sequence[str],
    labels: Sequence[int],
    tokens: Sequence[ConversationTokens],
) -> RuleResult:
    tp = fp = 0
    delays = []
    for conversation_id, label, stream in zip(ids, labels, tokens, strict=True):
        if conversation_id not in first:
            continue
        if label == 1:
            tp += 1
            labeled = torch.nonzero(stream.labeled).flatten()
            start = int(labeled[0]) if len(labeled) else 0
            delays.append(first[conversation_id] - start + 1)
        else:
            fp += 1
    positives, negatives = labels.count(1), labels.count(0)
    return RuleResult(
        rule=name,
        category=rule.category,
        severity=rule.severity,
        recall=tp / positives if positives else math.nan,
        fpr=fp / negatives if negatives else math.nan,
        precision=tp / (tp + fp) if tp + fp else math.nan,
        true_positives=tp,
        false_positives=fp,
        positives=positives,
        negatives=negatives,
        tokens_to_first_alert_median=statistics.median(delays) if delays else math.nan,
        tokens_to_first_alert_p90=_quantile(delays, 0.9),
    )


def _quantile(values: list[int], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)])


def _feature_result(
    name: str,
    aggregation: str,
    values: Sequence[torch.Tensor],
    tokens: Sequence[ConversationTokens],
    labels: Sequence[int],
    fprs: Sequence[float],
    threshold: float | None,
) -> FeatureResult:
    from monitor.features.build.scoring import roc_curve

    scores = [
        # Each replayed turn is one forward pass, so its last token is a turn end (what the
        # stream marks and a rule with `at: turn_end` is checked at).
        conversation_score(v, t.labeled, aggregation, t.turn_ends)
        for v, t in zip(values, tokens, strict=True)
    ]
    at_fpr = {}
    for fpr in fprs:
        if math.floor(fpr * labels.count(0)) >= 1 and labels.count(1):
            point = recall_at_fpr(scores, labels, fpr)
            at_fpr[fpr] = (point.threshold, point.recall, point.fpr)
    pack_point = None
    if threshold is not None:
        point = operating_point(scores, labels, threshold)
        pack_point = (threshold, point.recall, point.fpr)
    return FeatureResult(
        name, aggregation, auroc(scores, labels), at_fpr, pack_point, roc_curve(scores, labels)
    )
