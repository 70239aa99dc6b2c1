"""The sidecar's per-step metric fast paths say exactly what prometheus-client's own would."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from monitor.outputs.metrics import SidecarMetrics, _StepCounter, _StepHistogram

BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 1.0)
AMOUNTS = [0.0, 0.0001, 0.00010001, 0.00025, 0.0003, 1.0, 1.5, -2.0, math.inf, math.nan, 0.001]


def _exposition(registry: CollectorRegistry) -> list[str]:
    # Creation timestamps differ between two metrics made at different times.
    return [
        line for line in generate_latest(registry).decode().splitlines() if "_created" not in line
    ]


def test_the_step_histogram_counts_as_the_histogram_does():
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    fast = _StepHistogram("x_seconds", "x", buckets=BUCKETS, registry=ours)
    slow = Histogram("x_seconds", "x", buckets=BUCKETS, registry=theirs)
    for amount in AMOUNTS:  # bounds exactly, between, past the last, negative, inf, NaN
        fast.observe(amount)
        slow.observe(amount)
    assert _exposition(ours) == _exposition(theirs)


def test_the_step_counter_counts_and_refuses_as_the_counter_does():
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    fast = _StepCounter("x", "x", registry=ours)
    slow = Counter("x", "x", registry=theirs)
    for amount in (1, 64, 0, 2.5):
        fast.inc(amount)
        slow.inc(amount)
    assert _exposition(ours) == _exposition(theirs)
    for counter in (fast, slow):
        with pytest.raises(ValueError):
            counter.inc(-1)
    assert _exposition(ours) == _exposition(theirs)
    labelled = _StepCounter("y", "y", ["reason"], registry=ours)
    with pytest.raises(ValueError):
        labelled.inc()  # a labelled parent is not observable
    labelled.labels(reason="a").inc(3)
    assert ours.get_sample_value("y_total", {"reason": "a"}) == 3


def test_the_conversations_gauge_follows_every_change():
    metrics = SidecarMetrics()
    for tracked in (0, 64, 64, 63, 0, 0, 5):
        metrics.show_conversations(tracked)
        assert metrics.registry.get_sample_value("safety_monitor_conversations") == tracked


def test_a_recorded_step_counts_as_the_separate_calls_do():
    """`record_step` updates the values behind the metrics directly: the exposition must be
    what tokens.inc, batches.inc and the three observes give, for every bucket bound, NaN
    (the checked path) and a step of no rows."""
    fast, slow = SidecarMetrics(), SidecarMetrics()
    assert fast._step_values is not None  # the direct path is the one under test
    steps = [(64, 0.0008, 0.0003, 0.0012), (1, 0.0001, 0.00025, 1.0), (0, 2.0, 0.0, 0.05)]
    steps += [(5, math.nan, 0.001, 0.002), (7, 0.0005, 0.0005, 0.0005)]
    for rows, encode, rules, batch in steps:
        fast.record_step(rows, encode, rules, batch)
        slow.tokens.inc(rows)
        slow.batches.inc()
        slow.encode_seconds.observe(encode)
        slow.rules_seconds.observe(rules)
        slow.batch_seconds.observe(batch)
    assert _exposition(fast.registry) == _exposition(slow.registry)
    assert fast.registry.get_sample_value("safety_monitor_batches_total") == len(steps)
