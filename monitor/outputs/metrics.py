"""Prometheus metrics of the sidecar (prefix safety_monitor_).

Each sidecar owns a CollectorRegistry rather than the process-global one so that several
sidecars (tests, an embedded demo) can live in one process. No label takes an unbounded value:
conversation ids never appear, rule names are bounded by the loaded rule files.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

import monitor

# Encode and rule evaluation run in the 0.05 ms - 50 ms range on CPU; end to end adds gRPC.
_LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
)


class _StepCounter(Counter):
    """A Counter whose unlabelled ``inc`` skips the checks it cannot fail (the sidecar counts
    every step: prometheus-client's checks are two Python calls, microseconds when the caches
    are cold, as they are right after an encode). Anything else takes the checked path, and so
    does everything on a prometheus-client whose private layout differs (``AttributeError``)."""

    def inc(self, amount: float = 1, exemplar: Any = None) -> None:
        """Increment by ``amount`` (not negative)."""
        if exemplar or self._labelnames or not amount >= 0:
            super().inc(amount, exemplar)
            return
        try:
            self._value.inc(amount)
        except AttributeError:  # a prometheus-client without this private layout
            super().inc(amount, exemplar)


class _StepHistogram(Histogram):
    """A Histogram whose unlabelled ``observe`` finds the bucket by bisection and skips the
    checks it cannot fail (see ``_StepCounter``); the same buckets and sum as ``Histogram``'s
    (the first bucket whose bound is at least the amount). Anything else (NaN, an exemplar,
    labels) takes the checked path."""

    def observe(self, amount: float, exemplar: Any = None) -> None:
        """Observe ``amount``."""
        if exemplar or self._labelnames or amount != amount:
            super().observe(amount, exemplar)
            return
        try:
            bucket = self._buckets[bisect_left(self._upper_bounds, amount)]
        except AttributeError:  # a prometheus-client without this private layout
            super().observe(amount, exemplar)
            return
        self._sum.inc(amount)
        bucket.inc(1)


@dataclass
class SidecarMetrics:
    """The sidecar's Prometheus metrics, in their own registry (several sidecars can share a
    process, as in tests and the demo).
    """

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.tokens = _StepCounter(
            "safety_monitor_tokens",
            "Token rows monitored (once per row, whatever the layers).",
            registry=r,
        )
        self.batches = _StepCounter(
            "safety_monitor_batches", "Step batches accepted and processed.", registry=r
        )
        self.batches_grouped = Counter(
            "safety_monitor_batches_grouped",
            "Step batches that waited together and were evaluated as one (under load).",
            registry=r,
        )
        self.batches_rejected = Counter(
            "safety_monitor_batches_rejected",
            "Step batches rejected with a BatchError, by reason.",
            ["reason"],
            registry=r,
        )
        self.alerts = Counter(
            "safety_monitor_alerts",
            "Rule firings, by rule, category and severity.",
            ["rule", "category", "severity"],
            registry=r,
        )
        self.position_gaps = Counter(
            "safety_monitor_position_gaps",
            "Sequence slices whose position did not continue their conversation.",
            registry=r,
        )
        self.conversations_evicted = Counter(
            "safety_monitor_conversations_evicted",
            "Conversations whose rule state was evicted because the tracked cap was reached.",
            registry=r,
        )
        self.encode_seconds = _StepHistogram(
            "safety_monitor_encode_seconds",
            "Time to encode one batch with the feature packs.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.rules_seconds = _StepHistogram(
            "safety_monitor_rules_seconds",
            "Time to evaluate the rules on one batch.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_seconds = _StepHistogram(
            "safety_monitor_batch_seconds",
            "Time from receiving a batch to sending its Ack.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.active_streams = Gauge(
            "safety_monitor_active_streams", "Open Monitor streams.", registry=r
        )
        self.conversations = Gauge(
            "safety_monitor_conversations", "Conversations with live rule state.", registry=r
        )
        self.audit_writes = Counter(
            "safety_monitor_audit_writes",
            "Audit store writes, by result (ok, error, dropped).",
            ["result"],
            registry=r,
        )
        self.alertmanager_sends = Counter(
            "safety_monitor_alertmanager_sends",
            "Alertmanager pushes, by result (ok, error, dropped).",
            ["result"],
            registry=r,
        )
        self.alerts_withheld = Counter(
            "safety_monitor_alerts_withheld",
            "Alerts not sent on the stream because their audit record was not durable.",
            registry=r,
        )
        self.rule_reloads = Counter(
            "safety_monitor_rule_reloads",
            "Rule file reloads, by result (ok, error).",
            ["result"],
            registry=r,
        )
        self._conversations_shown: int | None = None
        self.build = Info("safety_monitor_build", "Build information.", registry=r)
        self.build.info({"version": monitor.__version__})

    def show_conversations(self, tracked: int) -> None:
        """Set the conversations gauge (only when it changes: a gauge call costs microseconds,
        and a decode step usually leaves the count as it was)."""
        if tracked != self._conversations_shown:
            self.conversations.set(tracked)
            self._conversations_shown = tracked
