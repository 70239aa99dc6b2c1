"""Push fired rules to Alertmanager (`POST {url}/api/v2/alerts`), Prometheus-style.

`fire()` only enqueues (bounded, never blocks the pipeline); a background thread owns the set of
active alerts and the HTTP traffic:
- labels identify an alert, so firings with the same label set deduplicate into one alert;
- active alerts are re-sent every `resend_interval` with `endsAt` a few intervals ahead (as
  Prometheus does), so if this sidecar dies Alertmanager resolves them on its own;
- an alert not re-fired for `resolve_after` seconds is sent once more with `endsAt = now`
  (resolved) and forgotten;
- a failed POST is retried with exponential backoff; results go to `on_result`.

Conversation ids go into annotations, not labels: a label per conversation would make every
conversation a separate alert, flood Alertmanager and its receivers, and defeat grouping.
`conversation_label=True` opts in for deployments that page on individual conversations.
"""

from __future__ import annotations

import json
import queue
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal
from urllib.parse import quote

ResultKind = Literal["ok", "error", "dropped"]
MAX_BATCH = 500  # alerts per POST
MAX_ACTIVE = 10_000  # distinct label sets held; more are dropped (labels should be bounded)
ENDS_AT_INTERVALS = 4  # endsAt of an active alert is this many resend intervals ahead
_LABEL_NAME = re.compile(r"[^a-zA-Z0-9_]")


@dataclass(frozen=True)
class AlertmanagerAlert:
    """One firing as Alertmanager sees it: labels (rule, category, severity, model) identify it,
    the summary and conversation go into annotations.
    """

    rule: str
    category: str
    severity: str
    model: str
    summary: str  # the rule's rendered `output`
    conversation_id: str = ""
    request_id: str = ""
    value: float | None = None
    labels: Mapping[str, str] = field(default_factory=dict)  # the rule's own labels
    description: str = ""
    annotations: Mapping[str, str] = field(default_factory=dict)  # the rule's, rendered


@dataclass
class _Active:
    labels: dict[str, str]
    annotations: dict[str, str]
    starts_at: datetime
    last_fired: float
    last_sent: float | None = None  # None: never sent (or changed) -> send now
    resolved_at: datetime | None = None


def _rfc3339(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _label_name(name: str) -> str:
    clean = _LABEL_NAME.sub("_", name)
    return clean if clean and not clean[0].isdigit() else f"_{clean}"


class AlertmanagerClient:
    """Pushes alerts to one Alertmanager from a background thread (see the module docstring:
    deduplication, re-sending, resolving, retries).

        client = AlertmanagerClient("http://alertmanager:9093", resend_interval=60)
        client.fire(AlertmanagerAlert(rule="r", category="c", severity="critical", model="m",
                                      summary="..."))
        client.close()
    """

    def __init__(
        self,
        url: str,
        *,
        resend_interval: float = 60.0,
        resolve_after: float = 300.0,
        timeout: float = 5.0,
        max_queue: int = 10_000,
        on_result: Callable[[ResultKind], None] | None = None,
        audit_base_url: str | None = None,
        generator_url: str | None = None,
        conversation_label: bool = False,
        retry_initial: float = 0.5,
        retry_max: float = 60.0,
    ) -> None:
        self._endpoint = url.rstrip("/") + "/api/v2/alerts"
        self._resend = resend_interval
        self._resolve_after = resolve_after
        self._timeout = timeout
        self._on_result = on_result
        self._audit_base = audit_base_url.rstrip("/") if audit_base_url else None
        self._generator_url = generator_url
        self._conversation_label = conversation_label
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._queue: queue.Queue[AlertmanagerAlert] = queue.Queue(maxsize=max(1, max_queue))
        self._active: dict[frozenset[tuple[str, str]], _Active] = {}
        self._stop = threading.Event()
        self._flush_deadline = float("inf")
        self._retry_at = 0.0
        self._delay = retry_initial
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="alertmanager", daemon=True)
        self._thread.start()

    # --- any thread ---------------------------------------------------------------------------
    def fire(self, alert: AlertmanagerAlert) -> None:
        """Enqueue an alert; never blocks (counted as dropped when the queue is full)."""
        try:
            self._queue.put_nowait(alert)
        except queue.Full:
            self.dropped += 1
            self._report("dropped")

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued and due (one attempt each), then stop the thread."""
        self._flush_deadline = time.monotonic() + timeout
        self._stop.set()
        self._thread.join(timeout + self._timeout + 1.0)

    def active_count(self) -> int:
        """Alerts currently active (fired and not yet resolved)."""
        return len(self._active)

    # --- background thread ---------------------------------------------------------------------
    def _report(self, kind: ResultKind) -> None:
        if self._on_result is not None:
            self._on_result(kind)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._drain(wait=min(0.2, self._resend / 4))
            self._send_due(time.monotonic(), final=False)
        self._drain(wait=0.0)
        if time.monotonic() < self._flush_deadline:
            self._retry_at = 0.0  # one last attempt regardless of backoff
            self._send_due(time.monotonic(), final=True)

    def _drain(self, wait: float) -> None:
        try:
            first = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
        except queue.Empty:
            return
        self._accept(first)
        for _ in range(self._queue.qsize()):  # bounded: what was queued at this moment
            try:
                self._accept(self._queue.get_nowait())
            except queue.Empty:
                break

    def _accept(self, alert: AlertmanagerAlert) -> None:
        labels = self._labels(alert)
        key = frozenset(labels.items())
        now = time.monotonic()
        active = self._active.get(key)
        if active is None:
            if len(self._active) >= MAX_ACTIVE:
                self.dropped += 1
                self._report("dropped")
                return
            self._active[key] = _Active(labels, self._annotations(alert), datetime.now(UTC), now)
            return
        active.last_fired = now
        active.annotations = self._annotations(alert)
        if active.resolved_at is not None:
            # Fired again while its resolve was still being sent: it is a live alert again.
            active.resolved_at = None
            active.last_sent = None

    def _labels(self, alert: AlertmanagerAlert) -> dict[str, str]:
        labels = {_label_name(k): str(v) for k, v in alert.labels.items()}
        # The identifying labels win over a rule label of the same name.
        labels.update(
            alertname=alert.rule,
            category=alert.category,
            severity=alert.severity,
            model=alert.model,
        )
        if self._conversation_label and alert.conversation_id:
            labels["conversation_id"] = alert.conversation_id
        return labels

    def _annotations(self, alert: AlertmanagerAlert) -> dict[str, str]:
        # The rule's own annotations (runbook, a richer summary) come first; ids and the
        # audit link below are the sidecar's and win.
        notes = {"summary": alert.summary, **alert.annotations}
        if alert.description:
            notes["description"] = alert.description
        if alert.conversation_id:
            notes["conversation_id"] = alert.conversation_id
            if self._audit_base:
                notes["audit_url"] = f"{self._audit_base}/{quote(alert.conversation_id, safe='')}"
        if alert.request_id:
            notes["request_id"] = alert.request_id
        if alert.value is not None:
            notes["value"] = f"{alert.value:.6g}"
        return notes

    def _due(self, now: float, final: bool) -> list[_Active]:
        due = []
        for active in self._active.values():
            if active.resolved_at is None and now - active.last_fired >= self._resolve_after:
                active.resolved_at = datetime.now(UTC)
                active.last_sent = None
            stale = active.last_sent is None or now - active.last_sent >= self._resend
            if stale or (final and active.resolved_at is not None):
                due.append(active)
        return due[:MAX_BATCH]

    def _send_due(self, now: float, final: bool) -> None:
        if now < self._retry_at:
            return
        due = self._due(now, final)
        if not due:
            return
        if not self._post([self._payload(a) for a in due]):
            self._retry_at = time.monotonic() + self._delay
            self._delay = min(self._delay * 2, self._retry_max)
            return
        self._delay = self._retry_initial
        sent_at = time.monotonic()
        for active in due:
            active.last_sent = sent_at
            if active.resolved_at is not None:
                self._active.pop(frozenset(active.labels.items()), None)

    def _payload(self, active: _Active) -> dict[str, object]:
        ends = active.resolved_at or datetime.now(UTC) + timedelta(
            seconds=ENDS_AT_INTERVALS * max(self._resend, 1.0)
        )
        payload: dict[str, object] = {
            "labels": active.labels,
            "annotations": active.annotations,
            "startsAt": _rfc3339(active.starts_at),
            "endsAt": _rfc3339(ends),
        }
        if self._generator_url:
            payload["generatorURL"] = self._generator_url
        return payload

    def _post(self, alerts: list[dict[str, object]]) -> bool:
        request = urllib.request.Request(
            self._endpoint,
            data=json.dumps(alerts).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as reply:
                reply.read()
        except (urllib.error.URLError, OSError, ValueError):
            self._report("error")
            return False
        self._report("ok")
        return True
