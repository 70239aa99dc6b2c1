"""What happens when rules fire: the log line and alerts metric, the Alert on the stream, the
step's closing Ack or BatchError, the audit trail and Alertmanager. Every translation of a
`Firing` lives here: to the proto `Alert` (`alert_event`), to `AuditFiring` (`_audit_step`)
and to `AlertmanagerAlert` (`_alertmanager_alert`). The audit trail and Alertmanager are
optional and configured in the sidecar config.

The audit write for a batch happens before its alerts are sent: an Alert on the stream means
its audit record is committed. When the audit store cannot make a batch durable, the alerts of
rules with the `audit` action are withheld and the batch gets a BatchError instead (the
records follow once the store recovers when the recorder kept them pending).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import structlog
import torch

from monitor.audit import AuditFiring, AuditRecorder, AuditSlice, AuditStep, RecorderConfig
from monitor.audit.redaction import Redactor, redact_identifier
from monitor.limits import MAX_CONVERSATIONS
from monitor.outputs.alertmanager import AlertmanagerAlert, AlertmanagerClient
from monitor.outputs.metrics import SidecarMetrics
from monitor.rules import Firing, RuleSet
from monitor.sidecar.config import AlertmanagerSettings, AuditSettings
from monitor.sidecar.validate import ValidatedBatch
from monitor.wire import pb

# The pipeline's logger: these lines kept their logger name when they moved here.
log = structlog.get_logger("safety_monitor.pipeline")


@dataclass(frozen=True)
class DispatchResult:
    """Which firings of a batch may go on the stream now, how many were withheld for want of a
    durable audit record, and the audit status of the batch.
    """

    sendable: list[Firing]  # alerts that may go on the stream now
    withheld: int  # alerts held back because their audit record is not durable
    audit_status: str  # "nothing" | "written" | "pending" | "dropped" | "off"


def ruleset_hash(ruleset: RuleSet) -> str:
    """One hash for the loaded rule files (recorded with each audited alert)."""
    digest = hashlib.sha256()
    for path, sha in sorted(ruleset.files):
        digest.update(f"{path}\0{sha}\n".encode())
    return digest.hexdigest()


class Actions:
    """Where firings go besides the stream: the audit recorder and the Alertmanager client, each
    made only when configured. `Pipeline` calls `dispatch` once per batch on its worker thread.
    """

    def __init__(
        self,
        audit: AuditSettings,
        alertmanager: AlertmanagerSettings,
        metrics: SidecarMetrics,
        max_conversations: int = MAX_CONVERSATIONS,
        max_model_labels: int = 16,
    ) -> None:
        self.metrics = metrics
        self.model_labels = BoundedLabel(max_model_labels)
        # The recorder tracks as many conversations as the rule engine, so a flagged
        # conversation the engine still follows is never evicted from the audit trail first.
        self.recorder = _recorder(audit, metrics, max_conversations) if audit.url else None
        self.alertmanager = _alertmanager(alertmanager, metrics) if alertmanager.url else None
        # Alertmanager gets what the audit store keeps: ids redacted the same way (text +
        # '#' + digest, so the review link opens the stored conversation) and the rendered
        # text redacted, since receivers (mail, chat) are outside the audit store's retention.
        self.redaction = AlertRedaction(audit.redact_patterns)

    @property
    def audit_healthy(self) -> bool:
        """False while the audit store cannot commit (the named health service turns
        NOT_SERVING)."""
        return self.recorder is None or self.recorder.healthy

    def dispatch(
        self,
        batch: ValidatedBatch,
        rules_hash: str,
        features: Mapping[str, torch.Tensor | np.ndarray],
        firings: Sequence[Firing],
    ) -> DispatchResult:
        """Audit the batch (durably, before its alerts may be sent), then push the sendable
        alerts with the `alert` action to Alertmanager."""
        status = "off"
        sendable = list(firings)
        ids = _audited_ids(firings)
        if self.recorder is not None:
            step = _audit_step(batch, rules_hash, features, firings, ids)
            result = self.recorder.record_batch(step)
            status = result.status
            if not result.durable:
                sendable = [f for f in firings if "audit" not in f.actions]
        if self.alertmanager is not None:
            audited = {id(f): cid for f, cid in zip(firings, ids, strict=True)}
            for firing in sendable:
                if "alert" in firing.actions:
                    model = self.model_labels.value(batch.model)
                    cid = audited[id(firing)]
                    self.alertmanager.fire(_alertmanager_alert(model, firing, cid, self.redaction))
        return DispatchResult(sendable, len(firings) - len(sendable), status)

    def close(self, timeout: float = 10.0) -> None:
        """Flush and stop the recorder and the Alertmanager client, each within `timeout`
        seconds."""
        if self.recorder is not None:
            self.recorder.close(timeout)
        if self.alertmanager is not None:
            self.alertmanager.close(timeout)


class AlertRedaction:
    """Client text in an alert made safe the way the audit recorder stores it: ids with
    `redact_identifier` (cached, as they repeat on every step), text with `Redactor.redact`."""

    def __init__(self, patterns: Sequence[str] = ()) -> None:
        self._redactor = Redactor(tuple(patterns))
        self.identifier: Callable[[str], str] = functools.lru_cache(maxsize=4096)(
            functools.partial(redact_identifier, self._redactor)
        )

    def text(self, text: str) -> str:
        """`text` with personal data replaced by placeholders."""
        return self._redactor.redact(text)


class BoundedLabel:
    """A label value chosen by clients, bounded in cardinality: the first `limit` distinct
    values are kept, any later one becomes "other" (an alert's `model` label must not become
    a label series per client-invented name)."""

    OTHER = "other"

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen: set[str] = set()

    def value(self, raw: str) -> str:
        if raw in self._seen:
            return raw
        if len(self._seen) < self.limit:
            self._seen.add(raw)
            return raw
        return self.OTHER


def _recorder(
    settings: AuditSettings, metrics: SidecarMetrics, max_conversations: int
) -> AuditRecorder:
    config = RecorderConfig(
        window_tokens=settings.window_tokens,
        max_conversations=max_conversations,
        max_tokens_per_conversation=settings.max_tokens_per_conversation,
        redact_patterns=settings.redact_patterns,
        retention_days=settings.retention_days,
        on_backpressure=settings.on_backpressure,  # type: ignore[arg-type]
        write_timeout=settings.write_timeout_seconds,
        health_probe_seconds=settings.health_probe_seconds,
        spool_path=settings.spool_path or None,
    )
    return AuditRecorder(
        settings.url,
        config,
        on_result=lambda result: metrics.audit_writes.labels(result=result).inc(),
    )


def _alertmanager(settings: AlertmanagerSettings, metrics: SidecarMetrics) -> AlertmanagerClient:
    return AlertmanagerClient(
        settings.url,
        resend_interval=settings.resend_interval_seconds,
        resolve_after=settings.resolve_after_seconds,
        audit_base_url=settings.audit_base_url or None,
        on_result=lambda result: metrics.alertmanager_sends.labels(result=result).inc(),
    )


def audited_conversation_id(scope: str, conversation_id: str) -> str:
    """The id a conversation is audited (and alerted) under. Rule state is scoped by client
    (or tenant attribute): the same id sent by two clients is two conversations, so in the
    audit store it must be two records too, or one client could end the other's audited
    conversation and overwrite its stored token text. A scoped conversation is stored as
    `<scope>/<id>`, the scope with `%` and `/` percent-encoded so that no two scopes give the
    same prefix; an unscoped one under its id as sent."""
    if not scope:
        return conversation_id
    return scope.replace("%", "%25").replace("/", "%2F") + "/" + conversation_id


def _audited_ids(firings: Sequence[Firing]) -> list[str]:
    """Each firing's audited conversation id, under the scope of the slice it fired on (not
    looked up by row: a slice without rows, whose turn end a rule fired at, starts at the
    row of the slice after it)."""
    return [audited_conversation_id(f.scope, f.conversation_id) for f in firings]


def _feature_values(
    features: Mapping[str, torch.Tensor | np.ndarray], firing: Firing
) -> dict[str, float]:
    """The batch's feature values at the firing's row; none for a firing at a turn end marked
    by a slice without rows (its token came in an earlier batch: no row here holds it)."""
    if not firing.in_batch:
        return {}
    return {n: float(v[firing.row]) for n, v in features.items()}


def _audit_step(
    batch: ValidatedBatch,
    rules_hash: str,
    features: Mapping[str, torch.Tensor | np.ndarray],
    firings: Sequence[Firing],
    audited_ids: Sequence[str],
) -> AuditStep:
    audit_slices = [
        AuditSlice(
            conversation_id=audited_conversation_id(s.scope, s.conversation_id),
            request_id=s.request_id,
            position=s.position,
            tokens=tuple(text),
            role=s.role,
            end=s.end,
            features={n: v[s.start_row : s.start_row + s.rows] for n, v in features.items()},
            rows=s.rows,
        )
        for s, text in zip(batch.slices, batch.tokens, strict=True)
    ]
    audit_firings = [
        AuditFiring(
            rule=f.rule,
            category=f.category,
            severity=f.severity,
            conversation_id=cid,
            request_id=f.request_id,
            position=f.position,
            value=f.value,
            message=f.message,
            labels=f.labels,
            actions=f.actions,
            feature_values=_feature_values(features, f),
        )
        for f, cid in zip(firings, audited_ids, strict=True)
    ]
    hook_points = sorted({*batch.activations, *(hp for _, hp in batch.encoded)})
    return AuditStep(batch.model, rules_hash, audit_slices, audit_firings, tuple(hook_points))


def _alertmanager_alert(
    model: str, firing: Firing, audited_id: str, redact: AlertRedaction
) -> AlertmanagerAlert:
    """The Alertmanager alert of a firing, under its audited conversation id (redacted as the
    audit store keeps it, so the review link opens the stored conversation)."""
    # The output and annotation templates may render {conversation_id} and {request_id}.
    return AlertmanagerAlert(
        rule=firing.rule,
        category=firing.category,
        severity=firing.severity,
        model=model,
        summary=redact.text(firing.message),
        conversation_id=redact.identifier(audited_id),
        request_id=redact.identifier(firing.request_id),
        value=firing.value,
        labels=firing.labels,
        annotations={name: redact.text(text) for name, text in firing.annotations.items()},
    )


def alert_event(seq_no: int, firing: Firing) -> pb.MonitorEvent:
    """A firing as the stream's Alert event for step `seq_no`."""
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
        actions=firing.actions,
    )
    return pb.MonitorEvent(alert=alert)


def closing_event(
    metrics: SidecarMetrics, step: ValidatedBatch, sent: list[Firing], fired: int, audit_status: str
) -> pb.MonitorEvent:
    """The step's Ack, or a BatchError when some of its alerts were withheld for want of
    a durable audit record (its rules were still evaluated)."""
    withheld = fired - len(sent)
    if not withheld:
        return pb.MonitorEvent(ack=pb.Ack(seq_no=step.seq_no, rows=step.rows, alerts=len(sent)))
    metrics.alerts_withheld.inc(withheld)
    metrics.batches_rejected.labels(reason="audit_not_durable").inc()
    log.error("alerts withheld", seq_no=step.seq_no, withheld=withheld, audit_status=audit_status)
    error = pb.BatchError(
        seq_no=step.seq_no,
        reason="audit_not_durable",
        field="",
        message=f"{withheld} alert(s) withheld: the audit store did not commit their "
        f"records (status {audit_status}); rules were evaluated",
    )
    return pb.MonitorEvent(error=error)


def log_firing(
    metrics: SidecarMetrics, batch: ValidatedBatch, firing: Firing, redaction: AlertRedaction
) -> None:
    """Count a firing in the alerts metric and log it (every firing, sent or withheld).

    Logs leave the process (collectors, terminals), so the client-chosen ids, the model name
    and the rendered output are redacted the way the audit store redacts them (an id keeps its
    `#` digest, so two ids stay two ids in the log).
    """
    metrics.alerts.labels(
        rule=firing.rule, category=firing.category, severity=firing.severity
    ).inc()
    log.warning(
        "rule fired",
        rule=firing.rule,
        category=firing.category,
        severity=firing.severity,
        conversation_id=redaction.identifier(firing.conversation_id),
        request_id=redaction.identifier(firing.request_id) if firing.request_id else "",
        position=firing.position,
        value=firing.value,
        model=redaction.identifier(batch.model),
        seq_no=batch.seq_no,
        output=redaction.text(firing.message),
    )
