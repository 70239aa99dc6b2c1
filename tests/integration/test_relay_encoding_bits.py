"""Local encoding in the relay sends, byte for byte, what local encoding in the layer hook
sends, also where the row count of the pack's GEMM could differ between the two: MKL's
result for a row depends on how many rows are multiplied together (for a 512 x 256 pack, a
2-row product and the same rows inside a 4-row one differ in the last bits). So the hook
encodes only the rows it sends (a padded batch's real tokens), and a lingering relay encodes
each step on its own before merging. The real hooks, ring and relay process, and a recording
gRPC server that keeps every StepBatch, so the bytes on the wire can be compared."""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
import pytest
import torch

from monitor.capture import CaptureClient
from monitor.capture.steps import CapturedStep, Tagging
from monitor.features import load_pack, save_pack
from monitor.features.build import build_pack_from_sae, load_sae
from monitor.fixtures import build_tiny_llama, wait_for, write_layer_sae
from monitor.wire import pb, pb_grpc
from monitor.wire.tensors import decode_tensor

HIDDEN = 512  # with 256 features: a shape whose GEMM rounds differently by row count


class _Recorder(pb_grpc.SafetyMonitorServicer):
    """Acks and keeps every batch. GetStatus offers nothing: `Sequence` messages."""

    def __init__(self) -> None:
        self.batches: list[pb.StepBatch] = []
        self.lock = threading.Lock()

    def GetStatus(self, request, context):
        return pb.StatusResponse()

    def Monitor(self, requests, context):
        for batch in requests:
            with self.lock:
                self.batches.append(batch)
            rows = sum(sequence.rows for sequence in batch.sequences)
            yield pb.MonitorEvent(ack=pb.Ack(seq_no=batch.seq_no, rows=rows))

    def take(self) -> list[pb.StepBatch]:
        with self.lock:
            taken, self.batches = self.batches, []
        return taken


@pytest.fixture(scope="module")
def recorder():
    servicer = _Recorder()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_SafetyMonitorServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


@pytest.fixture(scope="module")
def pack_path(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("relay-bits")
    sae = load_sae(write_layer_sae(workdir / "sae", HIDDEN, 1024, 1, seed=3))
    path = workdir / "wide.pack.safetensors"
    save_pack(build_pack_from_sae(sae, list(range(0, 1024, 4)), name="wide"), path)
    return path


@pytest.fixture(autouse=True)
def _one_torch_thread():
    # The relay encodes with one torch thread (relay/encode.py); MKL's rounding can also
    # depend on the thread count, so the hook's side runs with one too (README, Local
    # encoding).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _client(target: str, pack, encode_in: str, **options) -> CaptureClient:
    client = CaptureClient(
        target, encode_locally=pack, encode_in=encode_in, metrics_registry=None, **options
    )
    wait_for(lambda: client.connected, timeout=30)
    if encode_in == "relay":  # until the relay has loaded the pack, activations go unencoded
        wait_for(lambda: client.relay_encoder == "ready", timeout=60)
    return client


def _rows(batches: list[pb.StepBatch]) -> dict[tuple[str, int], tuple]:
    """(conversation, position) -> that token's bytes on the wire: each feature block's row
    and each layer's row, by hook point."""
    rows = {}
    for batch in batches:
        tensors = [(f"features:{b.hook_point}:{b.pack_sha256}", b.values) for b in batch.features]
        tensors += [(f"layer:{layer.hook_point}", layer.activations) for layer in batch.layers]
        decoded = [(name, decode_tensor(t, name)) for name, t in tensors]
        start = 0
        for sequence in batch.sequences:
            for offset in range(sequence.rows):
                rows[(sequence.conversation_id, sequence.position + offset)] = tuple(
                    (name, values[start + offset].numpy().tobytes()) for name, values in decoded
                )
            start += sequence.rows
    return rows


def test_a_padded_batch_encoded_in_the_relay_is_what_the_hook_sends(recorder, pack_path):
    servicer, target = recorder
    model = build_tiny_llama(hidden=HIDDEN, num_attention_heads=8, num_key_value_heads=4)
    sent = {}
    for encode_in in ("hook", "relay"):
        client = _client(target, str(pack_path), encode_in)
        try:
            client.attach(model, layers=[1, 2])
            assert client.encoding_in == encode_in
            servicer.take()
            # 3 of 4 rows, 2 of 4, 3 of 5 real: prefills whose GEMM would round
            # differently with the padding rows in it.
            for n, ids in enumerate(
                ([[1, 2], [0, 3]], [[0, 1], [0, 3]], [[0, 0, 1, 2, 3]]),
            ):
                ids = torch.tensor(ids)
                with client.conversation([f"pad{n}-{j}" for j in range(len(ids))]):
                    model.generate(
                        input_ids=ids,
                        attention_mask=(ids != 0).long(),
                        max_new_tokens=2,
                        min_new_tokens=2,
                        do_sample=False,
                        pad_token_id=0,
                    )
            ids = torch.tensor([[1, 2, 3, 4], [0, 0, 7, 8], [0, 5, 6, 9]])
            with client.conversation(["pad-a", "pad-b", "pad-c"]), torch.no_grad():
                model(input_ids=ids, attention_mask=(ids != 0).long())
            assert client.flush(30)
            assert client.stats.batches_acked == client.stats.steps_captured == 7
            sent[encode_in] = _rows(servicer.take())
        finally:
            client.close(timeout=5)
    assert len(sent["hook"]) == (3 + 2) + (2 + 2) + (3 + 1) + 9
    for token in sent["hook"].values():
        assert [name.split(":")[0] for name, _ in token] == ["features", "layer"]
    assert sent["relay"] == sent["hook"]


def test_a_lingering_relay_encodes_each_step_as_the_hook_would(recorder, pack_path):
    """Steps published within the linger: each one's feature values are its own rows
    encoded alone, as the hook encodes them (and as the hook's steps, which carry feature
    blocks, go: one per message)."""
    servicer, target = recorder
    pack = load_pack(pack_path)
    encoder = pack.hook_points["layers.1"].encoder
    client = _client(target, str(pack_path), "relay", linger_ms=50)
    try:
        servicer.take()
        ids = ("l-a", "l-b")
        tagging = Tagging(ids, ("assistant",) * 2, ("",) * 2, key=("linger",))
        generator = torch.Generator().manual_seed(0)
        expected = {}
        for position in range(6):
            hidden = torch.randn(2, HIDDEN, generator=generator)
            values = encoder.encode(hidden)  # what the hook sends for this step
            for row, cid in enumerate(ids):
                expected[(cid, position)] = values[row].numpy().tobytes()
            client.submit(CapturedStep({"layers.1": hidden}, tagging, [1, 1], [position] * 2))
        assert client.flush(30)
        assert client.stats.batches_acked == 6
        got = _rows(servicer.take())
        assert {key: token[0][1] for key, token in got.items()} == expected
    finally:
        client.close(timeout=5)
