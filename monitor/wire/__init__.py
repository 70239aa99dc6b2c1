"""The wire protocol: generated gRPC stubs and the tensor codec shared by capture and sidecar."""

from monitor.wire.safety_monitor.v1 import monitor_pb2 as pb
from monitor.wire.safety_monitor.v1 import monitor_pb2_grpc as pb_grpc
from monitor.wire.tensors import WIRE_DTYPES, TensorDecodeError, decode_tensor, encode_tensor

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SafetyMonitor"].full_name

__all__ = [
    "SERVICE_NAME",
    "WIRE_DTYPES",
    "TensorDecodeError",
    "decode_tensor",
    "encode_tensor",
    "pb",
    "pb_grpc",
]
