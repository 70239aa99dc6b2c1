"""The per-batch pipeline: validate -> encode (feature packs) -> rules -> events.

One Pipeline serves every stream of a sidecar; the server runs it on a single worker thread so
rule state is never touched concurrently and batches of a stream stay in order.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import structlog
import torch

from monitor.features import FeaturePack
from monitor.outputs.metrics import SidecarMetrics
from monitor.rules.engine import Firing, RuleEngine
from monitor.rules.loader import RuleSet
from monitor.sidecar.actions import Actions, ruleset_hash
from monitor.sidecar.config import Limits
from monitor.sidecar.validate import (
    BatchRejected,
    EncoderCatalog,
    ValidatedBatch,
    validate_batch,
)
from monitor.wire import pb

log = structlog.get_logger("safety_monitor.pipeline")


@dataclass(frozen=True)
class FeatureColumn:
    """Where a feature the rules use comes from: a pack's encoder at one hook point."""

    name: str  # qualified '<pack>/<feature>'
    pack: FeaturePack
    hook_point: str
    column: int


@dataclass
class BatchOutcome:
    events: list[pb.MonitorEvent]
    firings: list[Firing]
    features: dict[str, torch.Tensor]


class Pipeline:
    def __init__(
        self,
        packs: Sequence[FeaturePack],
        ruleset: RuleSet,
        metrics: SidecarMetrics,
        limits: Limits,
        actions: Actions | None = None,
    ) -> None:
        self.packs = list(packs)
        self.metrics = metrics
        self.limits = limits
        self.actions = actions
        self.engine = RuleEngine(ruleset, max_conversations=limits.max_conversations)
        self.catalog = EncoderCatalog(
            d_model_of=_d_model_by_hook_point(self.packs),
            columns_of={
                (p.name, hp): (p.sha256, len(p.qualified_names(hp)))
                for p in self.packs
                for hp in p.hook_points
            },
        )
        self._use_rules(ruleset)

    def replace_rules(self, ruleset: RuleSet) -> None:
        """Swap in a new rule set between batches; state of unchanged rules is kept."""
        self.engine.replace_rules(ruleset)
        self._use_rules(ruleset)

    def _use_rules(self, ruleset: RuleSet) -> None:
        self.ruleset = ruleset
        self.rules_hash = ruleset_hash(ruleset)
        self.columns = _feature_columns(self.packs, ruleset.required_features)
        self.required = {(c.pack.name, c.hook_point) for c in self.columns}

    def process(self, batch: pb.StepBatch) -> BatchOutcome:
        """Run one batch through the stream's stateful rule engine; never raises on bad input."""
        started = time.perf_counter()
        try:
            validated = self.validate(batch)
        except BatchRejected as rejected:
            return self._reject(batch.seq_no, rejected)
        features = self.encode(validated)
        rules_started = time.perf_counter()
        result = self.engine.evaluate(features, validated.slices, model=batch.model)
        self.metrics.rules_seconds.observe(time.perf_counter() - rules_started)
        self.metrics.position_gaps.inc(result.gaps)
        self.metrics.conversations_evicted.inc(result.evicted)
        self.metrics.conversations.set(self.engine.tracked_conversations)
        for firing in result.firings:
            self._record_firing(batch, firing)
        sendable, closing = self._dispatch(validated, features, result.firings)
        events = [_alert_event(batch.seq_no, f) for f in sendable]
        events.append(closing)
        self.metrics.tokens.inc(validated.rows)
        self.metrics.batches.inc()
        self.metrics.batch_seconds.observe(time.perf_counter() - started)
        return BatchOutcome(events, result.firings, features)

    def evaluate_once(self, batch: pb.StepBatch) -> BatchOutcome:
        """Score a batch with fresh rule state (the Evaluate RPC); shares no stream state."""
        try:
            validated = self.validate(batch)
        except BatchRejected as rejected:
            return self._reject(batch.seq_no, rejected)
        features = self.encode(validated)
        engine = RuleEngine(self.ruleset, max_conversations=self.limits.max_conversations)
        result = engine.evaluate(features, validated.slices, model=batch.model)
        events = [_alert_event(batch.seq_no, f) for f in result.firings]
        return BatchOutcome(events, result.firings, features)

    def validate(self, batch: pb.StepBatch) -> ValidatedBatch:
        return validate_batch(batch, self.catalog, self.required, self.limits)

    def encode(self, batch: ValidatedBatch) -> dict[str, torch.Tensor]:
        """Encode each hook point once per pack (unless the client already did) and pick out
        the columns the rules use."""
        started = time.perf_counter()
        encoded: dict[tuple[str, str], torch.Tensor] = dict(batch.encoded)
        features: dict[str, torch.Tensor] = {}
        for column in self.columns:
            key = (column.pack.name, column.hook_point)
            if key not in encoded:
                values = column.pack.encode(column.hook_point, batch.activations[key[1]])
                encoded[key] = values.to("cpu")  # the rules engine runs on CPU
            features[column.name] = encoded[key][:, column.column]
        self.metrics.encode_seconds.observe(time.perf_counter() - started)
        return features

    def _dispatch(
        self, batch: ValidatedBatch, features: dict[str, torch.Tensor], firings: list[Firing]
    ) -> tuple[list[Firing], pb.MonitorEvent]:
        """Audit and Alertmanager; returns the alerts that may be sent and the closing event
        (an Ack, or a BatchError when alerts were withheld for want of a durable record)."""
        ack = pb.Ack(seq_no=batch.seq_no, rows=batch.rows, alerts=len(firings))
        if self.actions is None:
            return firings, pb.MonitorEvent(ack=ack)
        result = self.actions.dispatch(batch, self.rules_hash, features, firings)
        if not result.withheld:
            ack.alerts = len(result.sendable)
            return result.sendable, pb.MonitorEvent(ack=ack)
        self.metrics.alerts_withheld.inc(result.withheld)
        self.metrics.batches_rejected.labels(reason="audit_not_durable").inc()
        log.error(
            "alerts withheld",
            seq_no=batch.seq_no,
            withheld=result.withheld,
            audit_status=result.audit_status,
        )
        error = pb.BatchError(
            seq_no=batch.seq_no,
            reason="audit_not_durable",
            field="",
            message=f"{result.withheld} alert(s) withheld: the audit store did not commit their "
            f"records (status {result.audit_status}); rules were evaluated",
        )
        return result.sendable, pb.MonitorEvent(error=error)

    def _reject(self, seq_no: int, rejected: BatchRejected) -> BatchOutcome:
        self.metrics.batches_rejected.labels(reason=rejected.reason).inc()
        log.warning(
            "batch rejected",
            seq_no=seq_no,
            reason=rejected.reason,
            field=rejected.field,
            error=rejected.message,
        )
        error = pb.BatchError(
            seq_no=seq_no, reason=rejected.reason, field=rejected.field, message=rejected.message
        )
        return BatchOutcome([pb.MonitorEvent(error=error)], [], {})

    def _record_firing(self, batch: pb.StepBatch, firing: Firing) -> None:
        self.metrics.alerts.labels(
            rule=firing.rule, category=firing.category, severity=firing.severity
        ).inc()
        log.warning(
            "rule fired",
            rule=firing.rule,
            category=firing.category,
            severity=firing.severity,
            conversation_id=firing.conversation_id,
            request_id=firing.request_id,
            position=firing.position,
            value=firing.value,
            model=batch.model,
            seq_no=batch.seq_no,
            output=firing.message,
        )


def _d_model_by_hook_point(packs: Sequence[FeaturePack]) -> dict[str, int]:
    d_model_of: dict[str, int] = {}
    for pack in packs:
        for hook_point in pack.hook_points:
            d_model = pack.d_model(hook_point)
            if d_model_of.setdefault(hook_point, d_model) != d_model:
                raise ValueError(
                    f"pack {pack.name!r}: {hook_point} has d_model {d_model}, another pack "
                    f"says {d_model_of[hook_point]}"
                )
    return d_model_of


def _feature_columns(packs: Sequence[FeaturePack], required: set[str]) -> list[FeatureColumn]:
    columns = []
    for pack in packs:
        for hook_point in pack.hook_points:
            for index, name in enumerate(pack.qualified_names(hook_point)):
                if name in required:
                    columns.append(FeatureColumn(name, pack, hook_point, index))
    return columns


def _alert_event(seq_no: int, firing: Firing) -> pb.MonitorEvent:
    alert = pb.Alert(
        seq_no=seq_no,
        rule=firing.rule,
        category=firing.category,
        severity=firing.severity,
        conversation_id=firing.conversation_id,
        request_id=firing.request_id,
        position=firing.position,
        value=firing.value,
        message=firing.message,
        labels=firing.labels,
    )
    return pb.MonitorEvent(alert=alert)


def qualified_feature_names(packs: Sequence[FeaturePack]) -> set[str]:
    """Every '<pack>/<feature>' the loaded packs provide (for rule validation)."""
    return {name for pack in packs for hp in pack.hook_points for name in pack.qualified_names(hp)}
