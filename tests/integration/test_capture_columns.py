"""The capture relay negotiates the sequence format with the sidecar it reaches: the columnar
format where GetStatus offers it, `Sequence` messages with a sidecar older than it. Either
way the sidecar sees every token exactly once (the counting rules of test_capture_serving)."""

from __future__ import annotations

import pytest

from monitor.capture import CaptureClient
from monitor.fixtures import build_tiny_llama
from monitor.sidecar.config import parse_config
from monitor.sidecar.process import SidecarThread
from monitor.sidecar.service import SafetyMonitorService
from monitor.wire import pb
from tests.integration.test_capture_serving import (
    HIDDEN,
    generate,
    seen_tokens,
    sidecar_config,
    tokens,
    wait_connected,
)


@pytest.fixture
def recording_sidecar(tmp_path):
    """A sidecar in this process whose pipeline records the format of every batch."""
    raw = {**sidecar_config(tmp_path), "metrics_port": 0}
    sidecar = SidecarThread(parse_config(raw, tmp_path, "test"))
    formats: list[str] = []
    process_many = sidecar.sidecar.pipeline.process_many

    def recorded(batches, *args, **kwargs):
        formats.extend("columns" if b.HasField("columns") else "sequences" for b in batches)
        return process_many(batches, *args, **kwargs)

    sidecar.sidecar.pipeline.process_many = recorded  # type: ignore[method-assign]
    running = sidecar.start()
    yield f"127.0.0.1:{running.port}", formats
    sidecar.stop()


def _run_two_conversations(target: str) -> CaptureClient:
    model = build_tiny_llama(hidden=HIDDEN)
    client = CaptureClient(target, model_name="tiny", metrics_registry=None)
    client.attach(model, layers=[1])
    wait_connected(client)
    ids = tokens([5, 6, 7, 8], [1, 2, 3, 4])
    with client.conversation(["first", "second"]):
        generate(model, input_ids=ids, max_new_tokens=6, min_new_tokens=6)
    with client.conversation("third"):
        generate(model, tokens([3, 4]), max_new_tokens=3, min_new_tokens=3)
    assert client.flush(30)
    return client


def test_relay_sends_columns_to_a_sidecar_that_offers_them(recording_sidecar):
    target, formats = recording_sidecar
    client = _run_two_conversations(target)
    try:
        assert seen_tokens(client, "first") == seen_tokens(client, "second") == 4 + 6 - 1
        assert seen_tokens(client, "third") == 2 + 3 - 1
        assert client.stats.batches_rejected == 0
        assert formats and set(formats) == {"columns"}
    finally:
        client.close(timeout=10)


@pytest.fixture
def older_status(monkeypatch):
    """GetStatus as a sidecar older than the columnar format answers it: no
    sequence_formats (the field did not exist). Set before the sidecar registers its
    servicer, so request this fixture before `recording_sidecar`."""
    status = SafetyMonitorService.GetStatus

    async def old_status(self, request, context):
        response = await status(self, request, context)
        response.ClearField("sequence_formats")
        response.ClearField("conversation_slots")
        return response

    monkeypatch.setattr(SafetyMonitorService, "GetStatus", old_status)


def test_relay_falls_back_to_sequences_for_an_older_sidecar(older_status, recording_sidecar):
    target, formats = recording_sidecar
    client = _run_two_conversations(target)
    try:
        assert seen_tokens(client, "first") == seen_tokens(client, "second") == 4 + 6 - 1
        assert seen_tokens(client, "third") == 2 + 3 - 1
        assert client.stats.batches_rejected == 0
        assert formats and set(formats) == {"sequences"}
    finally:
        client.close(timeout=10)


def test_get_status_lists_the_formats(recording_sidecar):
    import grpc

    from monitor.wire import pb_grpc

    target, _ = recording_sidecar
    with grpc.insecure_channel(target) as channel:
        status = pb_grpc.SafetyMonitorStub(channel).GetStatus(pb.StatusRequest(), timeout=10)
    assert list(status.sequence_formats) == ["sequences", "columns"]
    assert status.conversation_slots == 1024
