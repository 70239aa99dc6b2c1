"""The server decodes and checks a batch's activations as it arrives (`decode_layers`, on the
event loop) and hands them to validation on the worker: validation must then give exactly
what it gives without them, for good batches and for every kind of bad layer."""

from __future__ import annotations

import pytest
import torch

from monitor.sidecar.config import Limits
from monitor.sidecar.validate import (
    BatchRejected,
    EncoderCatalog,
    decode_layers,
    validate_batch,
)
from monitor.wire import encode_tensor, pb

D_MODEL = 8
CATALOG = EncoderCatalog(d_model_of={"layers.1": D_MODEL, "layers.2": D_MODEL}, columns_of={})
REQUIRED = {("p", "layers.1")}


def _batch(*layers: pb.Tensor, rows: int = 2) -> pb.StepBatch:
    batch = pb.StepBatch(seq_no=7, model="m")
    batch.sequences.append(pb.Sequence(conversation_id="c", rows=rows, position=0))
    for i, tensor in enumerate(layers):
        batch.layers.append(pb.Layer(hook_point=f"layers.{i + 1}", activations=tensor))
    return batch


def _good(dtype: torch.dtype = torch.bfloat16, rows: int = 2) -> pb.Tensor:
    return encode_tensor(torch.randn(rows, D_MODEL, generator=torch.Generator()).to(dtype))


def _with(value: float, dtype: torch.dtype = torch.bfloat16) -> pb.Tensor:
    tensor = torch.randn(2, D_MODEL).to(dtype)
    tensor[1, 3] = value
    return encode_tensor(tensor)


def _changed(**fields: object) -> pb.Tensor:
    tensor = _good()
    for name, value in fields.items():
        if name == "shape":
            tensor.ClearField("shape")
            tensor.shape.extend(value)  # type: ignore[arg-type]
        else:
            setattr(tensor, name, value)
    return tensor


def _validated(batch: pb.StepBatch, decoded=()):  # type: ignore[no-untyped-def]
    try:
        return validate_batch(batch, CATALOG, REQUIRED, Limits(), decoded=decoded)
    except BatchRejected as rejected:
        return rejected


BAD_LAYERS = {
    "nan": _with(float("nan")),
    "inf": _with(float("inf")),
    "minus_inf_fp16": _with(float("-inf"), torch.float16),
    "nan_fp32": _with(float("nan"), torch.float32),
    "short_data": _changed(data=b"\x00" * 10),
    "unknown_dtype": _changed(dtype="int8"),
    "three_dims": _changed(shape=[2, D_MODEL, 1]),
    "wrong_width": _changed(shape=[4, D_MODEL // 2]),
    "wrong_rows": _changed(shape=[1, 2 * D_MODEL]),
}


# Bad layers with the right element count: decoded ahead, refused later by the shape checks.
DECODED_AHEAD = {"wrong_width", "wrong_rows"}


@pytest.mark.parametrize("name", sorted(BAD_LAYERS))
def test_a_bad_layer_is_refused_the_same_with_or_without_decoding_ahead(name: str) -> None:
    batch = _batch(_good(), BAD_LAYERS[name])
    decoded = decode_layers(batch)
    assert len(decoded) == 2 and decoded[0] is not None
    # Only a layer that decodes and is finite comes back; the rest validation decodes again.
    assert (decoded[1] is not None) == (name in DECODED_AHEAD), name
    without = _validated(batch)
    with_decoded = _validated(batch, decoded)
    assert isinstance(without, BatchRejected), name
    assert with_decoded == without  # reason, field and message


@pytest.mark.parametrize("name", ["nan", "inf", "minus_inf_fp16", "nan_fp32", "short_data"])
def test_layers_that_fail_decoding_or_the_finite_check_come_back_empty(name: str) -> None:
    assert decode_layers(_batch(BAD_LAYERS[name])) == (None,)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_good_layers_validate_to_the_same_tensors(dtype: torch.dtype) -> None:
    batch = _batch(_good(dtype), _good(dtype))
    decoded = decode_layers(batch)
    without, with_decoded = _validated(batch), _validated(batch, decoded)
    assert not isinstance(without, BatchRejected) and not isinstance(with_decoded, BatchRejected)
    assert with_decoded.activations.keys() == without.activations.keys() == {"layers.1", "layers.2"}
    for hook_point, tensor in without.activations.items():
        assert with_decoded.activations[hook_point].dtype == tensor.dtype == dtype
        assert torch.equal(with_decoded.activations[hook_point], tensor)
    # What validation hands on is the tensor decoded ahead, not a second decode.
    assert with_decoded.activations["layers.1"] is decoded[0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_widened_layers_are_float32_of_the_same_values(dtype: torch.dtype) -> None:
    """`widen` (large messages, packs on the CPU): each layer comes back float32, exactly
    the values the encoder's own conversion gives, and validation hands it on as is."""
    batch = _batch(_good(dtype, rows=3), _good(dtype, rows=3), rows=3)
    narrow, wide = decode_layers(batch), decode_layers(batch, widen=True)
    for kept, widened in zip(narrow, wide, strict=True):
        assert kept is not None and widened is not None
        assert kept.dtype == dtype and widened.dtype == torch.float32
        assert torch.equal(widened, kept.float())
    validated = _validated(batch, wide)
    assert not isinstance(validated, BatchRejected)
    assert validated.activations["layers.1"] is wide[0]


@pytest.mark.parametrize("name", sorted(BAD_LAYERS))
def test_widening_refuses_the_same_bad_layers(name: str) -> None:
    batch = _batch(_good(), BAD_LAYERS[name])
    narrow, wide = decode_layers(batch), decode_layers(batch, widen=True)
    assert [t is None for t in wide] == [t is None for t in narrow]
    assert _validated(batch, wide) == _validated(batch)


def test_decoded_layers_of_another_batch_shape_are_ignored() -> None:
    batch = _batch(_good(), _good())
    assert _validated(batch, decoded=(None,)).activations.keys() == {"layers.1", "layers.2"}


def test_a_bug_in_decoding_ahead_leaves_the_layer_to_the_worker(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """`decode_layers` runs on the event loop, outside the worker's guard against our own bugs:
    an unexpected exception there must not end the stream. The layer comes back None, the
    batch is read on, and validation on the worker decodes again, where the same bug raises
    inside the guard (`SafetyMonitorService._run_many`: an internal BatchError)."""
    import asyncio

    from monitor.sidecar import streams, validate
    from monitor.sidecar.service import _read_into

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug in decoding")

    batch = _batch(_good(), _good())
    # The finite check: both the fast decode and the general one run it.
    monkeypatch.setattr(validate, "_finite_bits", broken)
    assert decode_layers(batch) == (None, None)

    async def read() -> list:
        async def requests():  # type: ignore[no-untyped-def]
            yield batch.SerializeToString()

        arrived: asyncio.Queue = asyncio.Queue()
        await _read_into(requests(), arrived, streams.StreamBudget(4, 1 << 20))
        return [arrived.get_nowait() for _ in range(arrived.qsize())]

    (parsed, _, decoded), end = asyncio.run(read())  # no exception: the stream goes on
    assert parsed.seq_no == 7 and decoded == (None, None) and end is None
    with pytest.raises(RuntimeError, match="a bug in decoding"):
        validate_batch(batch, CATALOG, REQUIRED, Limits(), decoded=decoded)
    monkeypatch.undo()  # without the bug, validation decodes the layers itself
    assert _validated(batch, decoded).activations.keys() == {"layers.1", "layers.2"}
