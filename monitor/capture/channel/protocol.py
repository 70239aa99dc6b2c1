"""What the serving process and the relay process agree on: the relay's settings
(`RelayConfig`, sent as one JSON line on the relay's stdin, secrets included, hence not argv)
and the event pipe (`EventWriter` / `read_event`: alerts as length-prefixed MonitorEvent bytes
on the relay's stdout). Both processes import this module, so it imports no torch.
"""

from __future__ import annotations

import base64
import json
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

import grpc

from monitor.wire import pb

EVENT_LENGTH = struct.Struct("<I")


@dataclass(frozen=True)
class TransportSecurity:
    """PEM bytes for TLS (ca: the server's CA; cert + key: a client certificate for mutual
    TLS) and a bearer token sent as `authorization` metadata."""

    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None
    token: str | None = None


@dataclass(frozen=True)
class SenderSettings:
    """Where and how the relay streams: the sidecar's target, the model name sent with each batch,
    message size, reconnect backoff (low, high), connect timeout, fail-closed and TLS/token.

    `linger_ms` > 0: after taking a step the relay keeps taking the steps published within
    that many milliseconds and sends them as one StepBatch (relay/coalesce.py): less CPU per
    step for the relay and the sidecar, alerts later by up to that much. It does not linger
    while the serving process waits for verdicts (`RelayLink.hurry`), and it ends the linger
    early once about half of `queue_size` (the client's bound on waiting steps) or of the
    ring's bytes wait, so a linger drops no step that no linger would. The sidecar rejects a
    message as a whole: a rejected merged message loses every step it holds (the relay keeps
    merged messages under the sidecar's advertised limits and sends a step with a NaN or an
    infinity alone, so the rejects it can foresee hit one step only).

    `encode_pack` (a feature pack's path, with its sha256 and the hook points it covers):
    the relay encodes the activations of those hook points with the pack and sends feature
    values instead (local encoding off the model's thread: relay/encode.py). Empty: it
    sends what the frames hold.
    """

    target: str
    model_name: str
    max_message_bytes: int
    reconnect_backoff: tuple[float, float]
    connect_timeout: float
    fail_closed: bool
    security: TransportSecurity = TransportSecurity()
    linger_ms: float = 0.0
    queue_size: int = 256  # the client's bound on steps waiting on the ring
    encode_pack: str = ""
    encode_pack_sha256: str = ""
    encode_hook_points: tuple[str, ...] = ()

    def channel(self) -> grpc.Channel:
        """A gRPC channel to the target, with TLS when a CA or client certificate is set."""
        options = [("grpc.max_send_message_length", self.max_message_bytes)]
        tls = self.security
        if tls.ca is None and tls.cert is None:
            return grpc.insecure_channel(self.target, options=options)
        credentials = grpc.ssl_channel_credentials(tls.ca, tls.key, tls.cert)
        return grpc.secure_channel(self.target, credentials, options=options)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The `authorization` metadata for every call (empty without a token)."""
        token = self.security.token
        return (("authorization", f"Bearer {token}"),) if token else ()


@dataclass(frozen=True)
class RelayConfig:
    """Everything the relay needs, as the client sends it."""

    settings: SenderSettings
    ring_fd: int
    ring_capacity: int
    doorbell_fd: int | None = None
    log_level: str = "warning"
    wakeup_fd: int | None = None  # the eventfd the producer writes when the relay waits

    def to_json(self) -> bytes:
        """The settings as one JSON line for the relay's stdin (PEM bytes in base64)."""
        s, tls = self.settings, self.settings.security
        document = {
            "target": s.target,
            "model_name": s.model_name,
            "max_message_bytes": s.max_message_bytes,
            "reconnect_backoff": list(s.reconnect_backoff),
            "connect_timeout": s.connect_timeout,
            "fail_closed": s.fail_closed,
            "linger_ms": s.linger_ms,
            "queue_size": s.queue_size,
            "encode_pack": s.encode_pack,
            "encode_pack_sha256": s.encode_pack_sha256,
            "encode_hook_points": list(s.encode_hook_points),
            "tls": {name: _b64(getattr(tls, name)) for name in ("ca", "cert", "key")},
            "token": tls.token,
            "ring_fd": self.ring_fd,
            "ring_capacity": self.ring_capacity,
            "doorbell_fd": self.doorbell_fd,
            "log_level": self.log_level,
            "wakeup_fd": self.wakeup_fd,
        }
        return json.dumps(document).encode() + b"\n"

    @classmethod
    def from_json(cls, line: bytes) -> RelayConfig:
        """The relay's side of `to_json`."""
        d = json.loads(line)
        tls = {name: _unb64(value) for name, value in d["tls"].items()}
        settings = SenderSettings(
            target=d["target"],
            model_name=d["model_name"],
            max_message_bytes=d["max_message_bytes"],
            reconnect_backoff=tuple(d["reconnect_backoff"]),
            connect_timeout=d["connect_timeout"],
            fail_closed=d["fail_closed"],
            security=TransportSecurity(token=d["token"], **tls),
            linger_ms=float(d.get("linger_ms", 0.0)),
            queue_size=int(d.get("queue_size", 256)),
            encode_pack=d.get("encode_pack", ""),
            encode_pack_sha256=d.get("encode_pack_sha256", ""),
            encode_hook_points=tuple(d.get("encode_hook_points", ())),
        )
        return cls(
            settings,
            d["ring_fd"],
            d["ring_capacity"],
            d["doorbell_fd"],
            d["log_level"],
            d.get("wakeup_fd"),
        )


def _b64(value: bytes | None) -> str | None:
    return None if value is None else base64.b64encode(value).decode()


def _unb64(value: str | None) -> bytes | None:
    return None if value is None else base64.b64decode(value)


class EventWriter:
    """Alerts to the serving process: length-prefixed MonitorEvent bytes on stdout."""

    def __init__(self, stream: BinaryIO, written: Callable[[], None]) -> None:
        self.stream = stream
        self.written = written  # counts the alert; the client's flush waits for its delivery
        self._lock = threading.Lock()

    def __call__(self, event: pb.MonitorEvent) -> None:
        if event.WhichOneof("event") != "alert":
            return  # acks and errors are counted in the ring header; errors are logged here
        payload = event.SerializeToString()
        with self._lock:
            try:
                self.stream.write(EVENT_LENGTH.pack(len(payload)) + payload)
                self.stream.flush()
            except (BrokenPipeError, ValueError):
                return  # the serving process is gone; stdin's EOF stops us next
            self.written()


def read_event(stream: BinaryIO) -> pb.MonitorEvent | None:
    """The client's side of EventWriter; None at end of stream."""
    header = stream.read(EVENT_LENGTH.size)
    if len(header) < EVENT_LENGTH.size:
        return None
    (length,) = EVENT_LENGTH.unpack(header)
    payload = stream.read(length)
    if len(payload) < length:
        return None
    return pb.MonitorEvent.FromString(payload)
