"""Health, reflection and graceful shutdown of a real sidecar process."""

from __future__ import annotations

import signal

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from monitor.wire import SERVICE_NAME
from tests.conftest import build_pack_with_cli


def _sidecar(tmp_path, sidecar_factory):
    pack = build_pack_with_cli(tmp_path, d_in=16, d_sae=32, hook_layer=0, features=[1, 2])
    return sidecar_factory({"packs": [str(pack)], "shutdown_grace_seconds": 2})


def test_health_reflection_and_sigterm(tmp_path, sidecar_factory):
    sidecar = _sidecar(tmp_path, sidecar_factory)
    with grpc.insecure_channel(sidecar.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        reply = next(reflection.ServerReflectionInfo(iter([request]), timeout=5))
        services = {s.name for s in reply.list_services_response.service}
        assert {SERVICE_NAME, "grpc.health.v1.Health"} <= services

    assert sidecar.stop() == 0
    events = [e.get("event") for e in sidecar.log_events()]
    assert events.index("sidecar draining") < events.index("sidecar stopped")


def test_metrics_endpoint_has_build_info_and_histograms(tmp_path, sidecar_factory):
    sidecar = _sidecar(tmp_path, sidecar_factory)
    metrics = sidecar.metrics()
    names = {name for name, _ in metrics}
    assert "safety_monitor_build_info" in names
    assert "safety_monitor_encode_seconds_bucket" in names
    assert "safety_monitor_tokens_total" in names
    assert metrics[("safety_monitor_active_streams", ())] == 0


def test_signals_at_the_ready_line_drain_not_kill(tmp_path, sidecar_factory):
    """SIGHUP then SIGTERM the moment 'sidecar started' is logged (the fixture's readiness
    signal). The handlers used to go in only after that line and the heap settling after it,
    so either signal met the default action there: exit -1 / -15, no drain (the flake of
    test_sqlite_file_locked_mid_stream's second sidecar). Now both are handled."""
    sidecar = _sidecar(tmp_path, sidecar_factory)
    sidecar.process.send_signal(signal.SIGHUP)  # a rule reload, not an exit
    assert sidecar.stop() == 0
    events = [e.get("event") for e in sidecar.log_events()]
    assert events.index("sidecar draining") < events.index("sidecar stopped")
