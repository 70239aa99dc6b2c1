"""The wire protocol: committed stubs match the .proto, and the tensor codec round-trips."""

from __future__ import annotations

import filecmp

import pytest
import torch

from monitor.wire import TensorDecodeError, decode_tensor, encode_tensor, pb
from monitor.wire.codegen import PACKAGE_DIR, generate


def test_committed_stubs_are_not_stale(tmp_path):
    generated = generate(tmp_path)
    assert generated, "protoc generated nothing"
    for path in generated:
        committed = PACKAGE_DIR / path.relative_to(tmp_path)
        assert committed.exists(), f"{committed} missing: run `make proto`"
        assert filecmp.cmp(path, committed, shallow=False), f"{committed} is stale: `make proto`"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_tensor_round_trip(dtype):
    tensor = torch.randn(5, 7).to(dtype)
    message = encode_tensor(tensor)
    assert message.dtype == {torch.float32: "FP32", torch.float16: "FP16"}.get(dtype, "BF16")
    assert list(message.shape) == [5, 7]
    assert len(message.data) == 35 * tensor.element_size()
    assert torch.equal(decode_tensor(message, "t"), tensor)


def test_unusual_dtypes_are_sent_as_fp32():
    tensor = torch.randn(3, 2, dtype=torch.float64)
    message = encode_tensor(tensor)
    assert message.dtype == "FP32"
    torch.testing.assert_close(decode_tensor(message, "t"), tensor.float())


def test_bytes_are_little_endian_row_major():
    message = encode_tensor(torch.tensor([[1.0, 2.0]]))
    assert message.data == b"\x00\x00\x80\x3f\x00\x00\x00\x40"


@pytest.mark.parametrize(
    ("message", "reason", "text"),
    [
        (pb.Tensor(dtype="FP64", shape=[1], data=b"\0" * 8), "unknown_dtype", "FP64"),
        (pb.Tensor(dtype="FP32", shape=[2, 2], data=b"\0" * 12), "bad_data_length", "needs 16"),
        (pb.Tensor(dtype="FP32", shape=[-1, 2], data=b""), "bad_shape", "negative"),
    ],
)
def test_decode_errors_name_the_field(message, reason, text):
    with pytest.raises(TensorDecodeError) as raised:
        decode_tensor(message, "layers[3].activations")
    assert raised.value.reason == reason
    assert str(raised.value).startswith("layers[3].activations.")
    assert text in str(raised.value)


def test_decode_tensor_with_bytes_gives_the_bytes_the_tensor_views():
    from monitor.wire import decode_tensor_with_bytes, encode_tensor

    tensor = torch.arange(12, dtype=torch.float32).reshape(3, 4).to(torch.bfloat16)
    message = encode_tensor(tensor)
    decoded, data = decode_tensor_with_bytes(message, "t")
    assert torch.equal(decoded, tensor)
    assert data == message.data
    assert decoded.data_ptr() == torch.frombuffer(data, dtype=torch.uint8).data_ptr()
    empty, nothing = decode_tensor_with_bytes(encode_tensor(tensor[:0]), "t")
    assert empty.shape == (0, 4) and nothing == b""
