"""Evaluate calls in flight are bounded like streams: each waiting call holds a message of up
to max_message_bytes, so without a bound they evade max_streams and max_stream_bytes. A real
gRPC server on loopback with the sidecar's servicer and a real pipeline."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from monitor.features.build import build_pack_from_sae, load_sae
from monitor.fixtures import write_layer_sae
from monitor.outputs.metrics import SidecarMetrics
from monitor.sidecar.config import Limits
from monitor.sidecar.pipeline import Pipeline
from monitor.sidecar.process import load_ruleset
from monitor.sidecar.service import SafetyMonitorService, add_servicer
from monitor.wire import encode_tensor, pb, pb_grpc

D_MODEL, HOOK = 16, "layers.3"


@pytest.fixture
def pipeline(tmp_path) -> Pipeline:
    sae = load_sae(write_layer_sae(tmp_path / "sae", D_MODEL, 32, 3, seed=5))
    pack = build_pack_from_sae(sae, [1], name="p")
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "features: {a: p/1}\nrules:\n  - {rule: always, severity: info, condition: a > -1e9}\n"
    )
    return Pipeline([pack], load_ruleset([rules], [pack]), SidecarMetrics(), Limits(max_streams=2))


def _request() -> pb.EvaluateRequest:
    batch = pb.StepBatch(seq_no=1, model="m")
    batch.layers.append(
        pb.Layer(hook_point=HOOK, activations=encode_tensor(torch.randn(2, D_MODEL)))
    )
    batch.sequences.append(pb.Sequence(conversation_id="c", rows=2, position=0))
    return pb.EvaluateRequest(batch=batch)


def test_evaluate_calls_over_the_limit_are_refused_and_places_are_given_back(pipeline) -> None:
    async def scenario() -> None:
        executor = ThreadPoolExecutor(max_workers=1)
        service = SafetyMonitorService(pipeline, executor, pipeline.metrics)
        server = grpc.aio.server()
        add_servicer(service, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.SafetyMonitorStub(channel)
                for _ in range(3):  # more calls than places, one after another: all served
                    reply = await stub.Evaluate(_request(), timeout=30)
                    assert [a.rule for a in reply.alerts] == ["always"]
                assert service.evaluate_gate.open == 0
                service.evaluate_gate.open = 2  # two calls in flight (waiting for the worker)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.Evaluate(_request(), timeout=30)
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "limits.max_streams" in (refused.value.details() or "")
                assert service.evaluate_gate.open == 2  # the refused call took no place
                service.evaluate_gate.open = 1
                reply = await stub.Evaluate(_request(), timeout=30)
                assert len(reply.alerts) == 1
                assert service.evaluate_gate.open == 1
                # A rejected batch gives its place back too.
                bad = _request()
                bad.batch.sequences[0].rows = 3
                reply = await stub.Evaluate(bad, timeout=30)
                assert reply.error.reason
                assert service.evaluate_gate.open == 1
        finally:
            await server.stop(None)
            executor.shutdown()
            service.parser.shutdown()

    asyncio.run(scenario())
    rejected = pipeline.metrics.registry.get_sample_value(
        "safety_monitor_batches_rejected_total", {"reason": "too_many_evaluate_calls"}
    )
    assert rejected == 1
