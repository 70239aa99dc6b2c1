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


def _observe(histogram: tuple[Any, Any, Any], amount: float) -> None:
    """``_StepHistogram.observe`` on a histogram's values (``_step_values``)."""
    bounds, buckets, total = histogram
    bucket = buckets[bisect_left(bounds, amount)]
    with total._lock:
        total._value += amount
    with bucket._lock:
        bucket._value += 1


def _step_values(
    tokens: Counter, batches: Counter, *histograms: Histogram
) -> tuple[Any, Any, list[tuple[Any, Any, Any]]] | None:
    """What ``SidecarMetrics.record_step`` updates: the counters' values and each histogram's
    bounds, buckets and sum, when they are prometheus-client's in-process values (whose
    ``inc`` adds under the value's lock, as ``record_step`` does); None otherwise."""
    try:
        from prometheus_client.values import MutexValue

        found = (
            tokens._value,
            batches._value,
            [(h._upper_bounds, h._buckets, h._sum) for h in histograms],
        )
    except (ImportError, AttributeError):
        return None
    every = [found[0], found[1]]
    for _, buckets, total in found[2]:
        every += [*buckets, total]
    if not all(type(value) is MutexValue for value in every):
        return None
    if not all(isinstance(h, _StepHistogram) and not h._labelnames for h in histograms):
        return None
    return found


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
        self._step_values = _step_values(
            self.tokens, self.batches, self.encode_seconds, self.rules_seconds, self.batch_seconds
        )
        self.build = Info("safety_monitor_build", "Build information.", registry=r)
        self.build.info({"version": monitor.__version__})

    def record_step(
        self, rows: int, encode_seconds: float, rules_seconds: float, batch_seconds: float
    ) -> None:
        """One step processed alone: ``tokens.inc(rows)``, ``batches.inc()`` and ``observe`` of
        the encode, rules and batch histograms, with the same result, in one call: the eight
        value updates behind them are eight more Python calls, tens of microseconds when the
        caches are cold, as they are right after an encode. Anything unusual (a NaN, a
        negative count, a prometheus-client whose values are laid out otherwise, e.g. in
        multiprocess mode) takes the metrics' own calls."""
        values = self._step_values
        # NaN (x != x) and negative counts take the checked calls; written out, not looped:
        # this runs on every step.
        if (
            values is None
            or not rows >= 0
            or encode_seconds != encode_seconds
            or rules_seconds != rules_seconds
            or batch_seconds != batch_seconds
        ):
            self.tokens.inc(rows)
            self.batches.inc()
            self.encode_seconds.observe(encode_seconds)
            self.rules_seconds.observe(rules_seconds)
            self.batch_seconds.observe(batch_seconds)
            return
        tokens, batches, (encode, rules, batch) = values
        with tokens._lock:
            tokens._value += rows
        with batches._lock:
            batches._value += 1
        _observe(encode, encode_seconds)
        _observe(rules, rules_seconds)
        _observe(batch, batch_seconds)

    def show_conversations(self, tracked: int) -> None:
        """Set the conversations gauge (only when it changes: a gauge call costs microseconds,
        and a decode step usually leaves the count as it was)."""
        if tracked != self._conversations_shown:
            self.conversations.set(tracked)
            self._conversations_shown = tracked
