"""Rule exceptions match on what the client sends: sequence attributes and the batch's model,
through a real sidecar and the real capture client."""

from __future__ import annotations

import grpc
import torch

from monitor.capture import CaptureClient
from monitor.fixtures import build_tiny_llama
from monitor.wire import pb_grpc
from tests.conftest import build_pack_with_cli
from tests.integration.test_bad_batches import good_batch

RULES = """
features: {one: bars/1}
lists:
  eval_tenants: [evals, red-team]
rules:
  - rule: always
    severity: info
    condition: one > -1000
    exceptions:
      - name: evaluations
        attributes: {tenant: eval_tenants}
      - name: staging
        attributes: {model: staging-llm}
"""


def _fired(target: str, batch) -> list[str]:  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(target) as channel:
        events = list(pb_grpc.SafetyMonitorStub(channel).Monitor(iter([batch]), timeout=30))
    assert events[-1].HasField("ack")
    return [e.alert.rule for e in events if e.HasField("alert")]


def test_exceptions_on_attributes_and_model(tmp_path, sidecar_factory):
    pack = build_pack_with_cli(tmp_path, d_in=32, d_sae=64, hook_layer=1, features=[1])
    (tmp_path / "rules.yaml").write_text(RULES)
    sidecar = sidecar_factory({"packs": [str(pack)], "rules": [str(tmp_path / "rules.yaml")]})

    assert _fired(sidecar.target, good_batch(1, conversation="plain")) == ["always"]
    tenant = good_batch(2, conversation="evals")
    tenant.sequences[0].attributes["tenant"] = "evals"
    assert _fired(sidecar.target, tenant) == []
    staging = good_batch(3, conversation="staging")
    staging.model = "staging-llm"
    assert _fired(sidecar.target, staging) == []


def test_capture_client_sends_attributes(tmp_path, sidecar_factory):
    pack = build_pack_with_cli(tmp_path, d_in=64, d_sae=64, hook_layer=1, features=[1])
    (tmp_path / "rules.yaml").write_text(RULES)
    sidecar = sidecar_factory({"packs": [str(pack)], "rules": [str(tmp_path / "rules.yaml")]})
    client = CaptureClient(sidecar.target, metrics_registry=None)
    model = build_tiny_llama(hidden=64)
    client.attach(model, layers=[1])
    with torch.no_grad():
        with client.conversation("customer", attributes={"tenant": "acme"}):
            model(torch.tensor([[1, 2]]))
        with client.conversation("red-team-run", attributes={"tenant": "red-team"}):
            model(torch.tensor([[1, 2]]))
    assert client.flush(30)
    client.close(timeout=5)
    assert sorted(a.conversation_id for a in client.alerts) == ["customer"]
