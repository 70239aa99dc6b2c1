"""The wire protocol: generated gRPC stubs and the tensor codec shared by capture and sidecar.

The codec (which needs torch) is imported on first use, so the capture relay process, which
only moves bytes, starts without torch."""

from typing import Any

from monitor.wire.safety_monitor.v1 import monitor_pb2 as pb
from monitor.wire.safety_monitor.v1 import monitor_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SafetyMonitor"].full_name

_CODEC = (
    "WIRE_DTYPES",
    "TensorDecodeError",
    "decode_tensor",
    "decode_tensor_with_bytes",
    "encode_tensor",
)

__all__ = ["SERVICE_NAME", "pb", "pb_grpc", *_CODEC]


def __getattr__(name: str) -> Any:
    if name in _CODEC:
        from monitor.wire import tensors

        return getattr(tensors, name)
    raise AttributeError(f"module 'monitor.wire' has no attribute {name!r}")
