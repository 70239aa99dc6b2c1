"""Tensor <-> wire bytes. Datatype names follow KServe v2 / Triton; bytes are little-endian,
row-major. Decoding is a zero-copy view of the message bytes: the sidecar converts to float32
anyway, so the view is only ever read."""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass

import torch

from monitor.wire.safety_monitor.v1 import monitor_pb2 as pb

WIRE_DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16,
    "FP16": torch.float16,
    "FP32": torch.float32,
}
_NAME_OF = {dtype: name for name, dtype in WIRE_DTYPES.items()}

if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
    raise ImportError("safety-monitor's wire codec assumes a little-endian host")

# torch.frombuffer warns on read-only buffers (protobuf bytes); we never write through the view.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


@dataclass(frozen=True)
class TensorDecodeError(Exception):
    """A tensor message that cannot be decoded; reason is a stable code for metrics."""

    reason: str
    field: str  # the offending field, e.g. "layers[0].activations.dtype"
    message: str

    def __str__(self) -> str:
        return self.message


def encode_tensor(tensor: torch.Tensor) -> pb.Tensor:
    """Serialise a CPU tensor. Dtypes outside the wire set are sent as FP32."""
    if tensor.dtype not in _NAME_OF:
        tensor = tensor.to(torch.float32)
    tensor = tensor.detach().contiguous()
    raw = tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
    return pb.Tensor(dtype=_NAME_OF[tensor.dtype], shape=list(tensor.shape), data=raw)


def decode_tensor(message: pb.Tensor, field: str) -> torch.Tensor:
    """View a Tensor message as a torch tensor, or raise TensorDecodeError naming `field`."""
    return decode_tensor_with_bytes(message, field)[0]


def decode_tensor_with_bytes(message: pb.Tensor, field: str) -> tuple[torch.Tensor, bytes]:
    """``decode_tensor``, and the bytes the tensor views: a check that reads them with numpy
    (the sidecar's finite check) needs no torch call, and a torch call costs several numpy
    ones when the caches are cold, as they are right after an encode."""
    dtype = WIRE_DTYPES.get(message.dtype)
    if dtype is None:
        raise TensorDecodeError(
            "unknown_dtype",
            f"{field}.dtype",
            f"{field}.dtype: unknown dtype {message.dtype!r} (expected one of "
            f"{', '.join(WIRE_DTYPES)})",
        )
    shape = message.shape[:]  # a list
    if min(shape, default=0) < 0:
        raise TensorDecodeError(
            "bad_shape", f"{field}.shape", f"{field}.shape: negative dimension in {shape}"
        )
    count = math.prod(shape)
    itemsize = dtype.itemsize
    # Read once: each read of a bytes field hands out a new copy (10 us for a decode step).
    data = message.data
    if len(data) != count * itemsize:
        raise TensorDecodeError(
            "bad_data_length",
            f"{field}.data",
            f"{field}.data: {len(data)} bytes, but {message.dtype} x {shape} needs "
            f"{count * itemsize}",
        )
    if count == 0:
        return torch.empty(shape, dtype=dtype), data
    return torch.frombuffer(data, dtype=dtype).view(shape), data
