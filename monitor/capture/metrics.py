"""Client-side metrics, registered on the serving process's own Prometheus registry.

One collector per registry reads the live clients' counters at scrape time, so the hot path
only bumps plain integers and several clients in one process never collide on metric names.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector, CollectorRegistry

if TYPE_CHECKING:
    from monitor.capture.client import CaptureClient

_collectors: dict[int, _CaptureCollector] = {}
_lock = threading.Lock()


class _CaptureCollector(Collector):
    def __init__(self) -> None:
        self.clients: weakref.WeakSet[CaptureClient] = weakref.WeakSet()

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        prefix = "safety_monitor_capture"
        steps = CounterMetricFamily(
            f"{prefix}_steps", "Forward passes captured.", labels=["target"]
        )
        sent = CounterMetricFamily(f"{prefix}_batches_sent", "Batches sent.", labels=["target"])
        acked = CounterMetricFamily(f"{prefix}_batches_acked", "Batches acked.", labels=["target"])
        rejected = CounterMetricFamily(
            f"{prefix}_batches_rejected", "Batches the sidecar rejected.", labels=["target"]
        )
        dropped = CounterMetricFamily(
            f"{prefix}_dropped", "Steps dropped, by reason.", labels=["target", "reason"]
        )
        messages = CounterMetricFamily(
            f"{prefix}_messages_sent",
            "StepBatch messages sent (several batches each with a relay linger).",
            labels=["target"],
        )
        reconnects = CounterMetricFamily(
            f"{prefix}_reconnects", "Stream reconnect attempts.", labels=["target"]
        )
        depth = GaugeMetricFamily(
            f"{prefix}_queue_depth", "Steps waiting to be sent.", labels=["target"]
        )
        # Only for clients whose relay encodes (`encode_in`): 1 for the state it is in, 0 for
        # the others, so `...{state="failed"} == 1` alerts on a relay that could not use the
        # pack (its steps then go out unencoded and the sidecar encodes them).
        encoder = GaugeMetricFamily(
            f"{prefix}_relay_encoder",
            "Local encoding in the capture relay: 1 for its state (loading, ready, failed).",
            labels=["target", "state"],
        )
        for client in list(self.clients):
            stats, target = client.stats, client.target
            steps.add_metric([target], stats.steps_captured)
            sent.add_metric([target], stats.batches_sent)
            acked.add_metric([target], stats.batches_acked)
            rejected.add_metric([target], stats.batches_rejected)
            reconnects.add_metric([target], stats.reconnects)
            messages.add_metric([target], stats.messages_sent)
            depth.add_metric([target], client.queue_depth)
            state = client.relay_encoder
            if state is not None:
                for name in ("loading", "ready", "failed"):
                    encoder.add_metric([target, name], 1 if name == state else 0)
            for reason, count in sorted(stats.dropped.items()):
                dropped.add_metric([target, reason], count)
        yield from (steps, sent, acked, rejected, dropped, reconnects, messages, depth, encoder)


def register_client(client: CaptureClient, registry: CollectorRegistry | None = REGISTRY) -> None:
    """Report `client`'s counters in `registry` (none when it is None); one collector per registry
    serves every client registered there.
    """
    if registry is None:
        return
    with _lock:
        collector = _collectors.get(id(registry))
        if collector is None:
            collector = _collectors[id(registry)] = _CaptureCollector()
            registry.register(collector)
        collector.clients.add(client)
