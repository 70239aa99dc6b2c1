"""Every kind of bad StepBatch, sent to a running sidecar on one stream: each gets a BatchError
naming the field and the problem, the stream stays open, the good batches around them are
processed, and the rejection is counted by reason."""

from __future__ import annotations

import math

import grpc
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from monitor.wire import encode_tensor, pb, pb_grpc
from tests.conftest import build_pack_with_cli

D_MODEL = 32
HOOK = "layers.1"


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory):
    from monitor.fixtures import start_sidecar

    workdir = tmp_path_factory.mktemp("bad-batches")
    pack = build_pack_with_cli(workdir, d_in=D_MODEL, d_sae=64, hook_layer=1, features=[1, 2, 3])
    rules = workdir / "rules.yaml"
    rules.write_text(
        "features: {one: bars/1}\n"
        "rules:\n"
        "  - {rule: always, category: misuse, severity: info, condition: one > -1}\n"
    )
    process = start_sidecar(
        {
            "packs": [str(pack)],
            "rules": [str(rules)],
            "limits": {"max_rows_per_batch": 100, "max_conversation_id_length": 40},
        },
        workdir,
    )
    yield process
    process.stop()


def good_batch(seq_no: int, conversation: str = "ok", rows: int = 2, position: int = 0):
    batch = pb.StepBatch(seq_no=seq_no, model="m")
    batch.layers.append(
        pb.Layer(hook_point=HOOK, activations=encode_tensor(torch.randn(rows, D_MODEL)))
    )
    batch.sequences.append(pb.Sequence(conversation_id=conversation, rows=rows, position=position))
    return batch


def _with(mutate):
    def build(seq_no: int):
        batch = good_batch(seq_no, conversation=f"bad-{seq_no}")
        mutate(batch)
        return batch

    return build


def _set_data(batch, tensor):
    batch.layers[0].activations.CopyFrom(encode_tensor(tensor))


def _nan(batch):
    tensor = torch.randn(2, D_MODEL)
    tensor[1, 5] = math.nan
    _set_data(batch, tensor)


def _inf_bf16(batch):
    tensor = torch.randn(2, D_MODEL).bfloat16()
    tensor[0, 0] = math.inf
    _set_data(batch, tensor)


def _too_many_rows(batch):
    _set_data(batch, torch.randn(101, D_MODEL))
    batch.sequences[0].rows = 101


def _extra_layer(name):
    def mutate(batch):
        batch.layers.append(
            pb.Layer(hook_point=name, activations=encode_tensor(torch.randn(2, D_MODEL)))
        )

    return mutate


BAD_BATCHES = {
    "unknown dtype": (
        _with(lambda b: setattr(b.layers[0].activations, "dtype", "INT8")),
        "unknown_dtype",
        "layers[0].activations.dtype",
        "unknown dtype 'INT8'",
    ),
    "data length": (
        _with(lambda b: setattr(b.layers[0].activations, "data", b"\0" * 10)),
        "bad_data_length",
        "layers[0].activations.data",
        "10 bytes",
    ),
    "d_model": (
        _with(lambda b: _set_data(b, torch.randn(2, D_MODEL + 1))),
        "d_model_mismatch",
        "layers[0].activations.shape",
        f"width {D_MODEL + 1} does not match the pack's {D_MODEL}",
    ),
    "rows do not add up": (
        _with(lambda b: setattr(b.sequences[0], "rows", 3)),
        "row_count_mismatch",
        "layers[0].activations.shape",
        "but the sequences add up to 3",
    ),
    "3-d tensor": (
        _with(lambda b: _set_data(b, torch.randn(1, 2, D_MODEL))),
        "bad_shape",
        "layers[0].activations.shape",
        "expected [rows, width]",
    ),
    "NaN": (_with(_nan), "non_finite", "layers[0].activations.data", "NaN or Inf in row 1"),
    "Inf in BF16": (
        _with(_inf_bf16),
        "non_finite",
        "layers[0].activations.data",
        "NaN or Inf in row 0",
    ),
    "unknown hook point": (
        _with(_extra_layer("layers.7")),
        "unknown_hook_point",
        "layers[1].hook_point",
        "no loaded pack reads 'layers.7'",
    ),
    "duplicate hook point": (
        _with(_extra_layer(HOOK)),
        "duplicate_hook_point",
        "layers[1].hook_point",
        "appears more than once",
    ),
    "no layers": (
        _with(lambda b: b.ClearField("layers")),
        "no_layers",
        "layers",
        "no layers",
    ),
    "empty conversation id": (
        _with(lambda b: setattr(b.sequences[0], "conversation_id", "")),
        "bad_conversation_id",
        "sequences[0].conversation_id",
        "empty",
    ),
    "over-long conversation id": (
        _with(lambda b: setattr(b.sequences[0], "conversation_id", "x" * 41)),
        "bad_conversation_id",
        "sequences[0].conversation_id",
        "41 characters exceed the limit of 40",
    ),
    "too many rows": (
        _with(_too_many_rows),
        "too_many_rows",
        "sequences",
        "101 rows exceed the limit of 100",
    ),
    "no sequences": (
        _with(lambda b: b.ClearField("sequences")),
        "no_sequences",
        "sequences",
        "no sequences",
    ),
    "position past 64 bits": (
        _with(lambda b: setattr(b.sequences[0], "position", 2**63)),
        "bad_position",
        "sequences[0].position",
        "past the largest supported position",
    ),
    "token texts": (
        _with(lambda b: b.sequences[0].tokens.extend(["a"])),
        "bad_tokens",
        "sequences[0].tokens",
        "1 token texts for 2 rows",
    ),
}


def run_stream(target: str, batches: list[pb.StepBatch], timeout: float = 30.0):
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.SafetyMonitorStub(channel)
        return list(stub.Monitor(iter(batches), timeout=timeout))


def test_each_bad_batch_is_rejected_and_the_stream_goes_on(sidecar):
    batches, expected = [], {}
    seq_no = 0
    for name, (build, reason, field, text) in BAD_BATCHES.items():
        seq_no += 1
        batches.append(good_batch(seq_no, conversation="ok", rows=2, position=2 * (seq_no - 1)))
        seq_no += 1
        batches.append(build(seq_no))
        expected[seq_no] = (name, reason, field, text)
    seq_no += 1
    batches.append(good_batch(seq_no, conversation="ok", rows=2, position=2 * len(BAD_BATCHES)))
    before = sidecar.metrics()

    events = run_stream(sidecar.target, batches)

    errors = {e.error.seq_no: e.error for e in events if e.HasField("error")}
    acks = {e.ack.seq_no for e in events if e.HasField("ack")}
    assert set(errors) == set(expected)
    assert acks == {b.seq_no for b in batches} - set(expected)
    for seq, (name, reason, field, text) in expected.items():
        error = errors[seq]
        assert (error.reason, error.field) == (reason, field), name
        assert text in error.message, (name, error.message)
        assert error.message.startswith(field), (name, error.message)
    after = sidecar.metrics()
    for reason in {r for _, r, _, _ in expected.values()}:
        key = ("safety_monitor_batches_rejected_total", (("reason", reason),))
        count = sum(1 for _, r, _, _ in expected.values() if r == reason)
        assert after.get(key, 0) - before.get(key, 0) == count, reason
    tokens = ("safety_monitor_tokens_total", ())
    assert after[tokens] - before.get(tokens, 0) == 2 * (len(BAD_BATCHES) + 1)


def test_duplicate_conversation_in_one_batch(sidecar):
    batch = good_batch(1, conversation="dup")
    batch.sequences.append(pb.Sequence(conversation_id="dup", rows=0, position=2))
    events = run_stream(sidecar.target, [batch])
    assert [e.error.reason for e in events] == ["duplicate_conversation"]
    assert events[0].error.field == "sequences[1].conversation_id"


def test_alerts_precede_their_ack(sidecar):
    events = run_stream(sidecar.target, [good_batch(1, conversation="order", rows=3)])
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds == ["alert", "ack"]
    assert events[0].alert.position == 0 and events[1].ack.alerts == 1


def test_a_burst_read_ahead_is_processed_whole_and_in_order(sidecar):
    """The sidecar reads batches ahead of the one it is processing (at most a few waiting);
    a client that sends far more than that at once and half-closes still gets every batch
    processed, in order, before the stream ends."""
    from monitor.sidecar.grouping import READ_AHEAD

    count = 5 * READ_AHEAD
    batches = [
        good_batch(n, conversation=f"burst-{n % 3}", position=2 * ((n - 1) // 3))
        for n in range(1, count + 1)
    ]
    events = run_stream(sidecar.target, batches)
    assert [e.ack.seq_no for e in events if e.HasField("ack")] == list(range(1, count + 1))
    # The rule fires as each conversation's first batch is processed: before that batch's ack.
    kinds = [(e.WhichOneof("event"), e.ack.seq_no or e.alert.seq_no) for e in events]
    assert kinds[:6] == [
        ("alert", 1),
        ("ack", 1),
        ("alert", 2),
        ("ack", 2),
        ("alert", 3),
        ("ack", 3),
    ]
    assert not any(e.HasField("error") for e in events)


def test_oversize_message_is_refused_by_grpc_limit(tmp_path, sidecar_factory):
    """Past max_message_bytes gRPC itself refuses the message (RESOURCE_EXHAUSTED) before our
    code sees it; the sidecar keeps serving other streams."""
    pack = build_pack_with_cli(tmp_path, d_in=D_MODEL, d_sae=64, hook_layer=1, features=[1])
    small = sidecar_factory({"packs": [str(pack)], "limits": {"max_message_bytes": 4096}})
    with pytest.raises(grpc.RpcError) as raised:
        run_stream(small.target, [good_batch(1, rows=64)])
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    events = run_stream(small.target, [good_batch(2, rows=2)])
    assert [e.WhichOneof("event") for e in events] == ["ack"]


@settings(max_examples=200, deadline=None)
@given(
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
    rows=st.integers(1, 9),
    width=st.integers(1, 40),
    bad=st.sampled_from([math.nan, math.inf, -math.inf, None]),
    where=st.floats(0, 1, exclude_max=True),
    scale=st.sampled_from([1.0, 1e-30, 1e4]),
)
def test_the_fast_finite_check_agrees_with_isfinite(dtype, rows, width, bad, where, scale):
    """The min/max shortcut the validator uses must say exactly what isfinite says, wherever
    the NaN or Inf lies, in every wire dtype, at any magnitude."""
    from monitor.sidecar.validate import _all_finite

    tensor = (torch.randn(rows, width, generator=torch.Generator().manual_seed(rows)) * scale).to(
        dtype
    )
    if bad is not None:
        tensor.view(-1)[int(where * tensor.numel())] = bad
    assert _all_finite(tensor) == bool(torch.isfinite(tensor).all())
    assert _all_finite(tensor[:0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_finite_check_agrees_with_isfinite_on_every_16_bit_value(dtype):
    """The finite check of 16-bit floats, on each of the 65,536 bit patterns (as the one
    value that may be bad among finite ones) and on all the finite ones together."""
    from monitor.sidecar.validate import _all_finite

    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    every = bits.view(dtype)
    finite = torch.isfinite(every.float())
    assert _all_finite(every[finite].reshape(1, -1))
    assert not _all_finite(every)
    base = every[finite][:7].view(torch.int16)
    for i, expected in enumerate(finite.tolist()):
        row = torch.cat([base, bits[i : i + 1]]).view(dtype).reshape(2, 4)
        assert _all_finite(row) == expected, hex(int(bits[i]) & 0xFFFF)
