"""The background sender: owns the gRPC stream, turns CapturedSteps into StepBatches, reads
acks, alerts and batch errors, and reconnects with exponential backoff and jitter."""

from __future__ import annotations

import itertools
import queue
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import structlog
import torch

from monitor.capture.steps import CapturedStep, CaptureStats
from monitor.wire import encode_tensor, pb, pb_grpc

log = structlog.get_logger("safety_monitor.capture")

TokenDecoder = Callable[[str, list[int]], list[str]]  # (conversation id, token ids) -> texts


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
    target: str
    model_name: str
    max_message_bytes: int
    reconnect_backoff: tuple[float, float]
    connect_timeout: float
    fail_closed: bool
    security: TransportSecurity = TransportSecurity()

    def channel(self) -> grpc.Channel:
        options = [("grpc.max_send_message_length", self.max_message_bytes)]
        tls = self.security
        if tls.ca is None and tls.cert is None:
            return grpc.insecure_channel(self.target, options=options)
        credentials = grpc.ssl_channel_credentials(tls.ca, tls.key, tls.cert)
        return grpc.secure_channel(self.target, credentials, options=options)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        token = self.security.token
        return (("authorization", f"Bearer {token}"),) if token else ()


class Sender:
    """Consumes the step queue on its own thread; the model never waits for it."""

    def __init__(
        self,
        settings: SenderSettings,
        steps: queue.Queue[CapturedStep],
        stats: CaptureStats,
        progress: threading.Condition,
        on_event: Callable[[pb.MonitorEvent], None],
        decode_tokens: TokenDecoder | None,
    ) -> None:
        self.settings = settings
        self.steps = steps
        self.stats = stats
        self.progress = progress
        self.on_event = on_event
        self.decode_tokens = decode_tokens
        self.outstanding = 0  # steps queued or in flight; guarded by `progress`
        self.inflight: dict[int, int] = {}  # seq_no -> rows
        self.connected = False
        self._seq_no = itertools.count(1)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="safety-monitor-capture")
        self._thread.daemon = True

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float) -> None:
        self._stopping.set()
        self._thread.join(timeout)

    # ---- accounting (called from any thread) ------------------------------------------------

    def added(self) -> None:
        with self.progress:
            self.outstanding += 1
            self.stats.steps_captured += 1

    def resolve(self, dropped: str | None = None) -> None:
        with self.progress:
            self.outstanding -= 1
            if dropped:
                self.stats.dropped[dropped] += 1
            self.progress.notify_all()

    def settle(self, seq_no: int, rejected: bool) -> None:
        with self.progress:
            rows = self.inflight.pop(seq_no, None)
            if rows is None:
                return
            if rejected:
                self.stats.batches_rejected += 1
            else:
                self.stats.batches_acked += 1
                self.stats.rows_acked += rows
            self.outstanding -= 1
            self.progress.notify_all()

    # ---- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        low, high = self.settings.reconnect_backoff
        backoff = low
        while not self._stopping.is_set():
            was_connected = self._stream_once()
            if self._stopping.is_set():
                break
            backoff = low if was_connected else min(high, backoff * 2)
            with self.progress:
                self.stats.reconnects += 1
            # Jitter so a fleet of serving processes does not reconnect in lockstep.
            self._stopping.wait(backoff * random.uniform(0.5, 1.5))

    def _stream_once(self) -> bool:
        """Run one gRPC stream until it ends; True if it got connected."""
        with self.settings.channel() as channel:
            try:
                ready = grpc.channel_ready_future(channel)
                ready.result(timeout=self.settings.connect_timeout)
            except grpc.FutureTimeoutError:
                self._drop_queued_while_down()
                return False
            self.connected = True
            stub = pb_grpc.SafetyMonitorStub(channel)
            # gRPC pulls requests on its own thread and may still be inside the generator
            # when the call dies; `alive` (checked under the lock) keeps such a step from
            # being counted in flight on a stream that is already gone.
            alive = threading.Event()
            alive.set()
            try:
                for event in stub.Monitor(self._requests(alive), metadata=self.settings.metadata):
                    self._handle(event)
            except grpc.RpcError as exc:
                log.warning(
                    "monitor stream broke", code=str(exc.code()), target=self.settings.target
                )
            finally:
                self.connected = False
                with self.progress:
                    alive.clear()
                self._lose_inflight()
            return True

    def _requests(self, alive: threading.Event) -> Iterator[pb.StepBatch]:
        while alive.is_set() and not (self._stopping.is_set() and self.steps.empty()):
            try:
                step = self.steps.get(timeout=0.05)
            except queue.Empty:
                continue
            seq_no = next(self._seq_no)
            try:
                message = self.to_message(seq_no, step)
            except Exception:
                log.exception("could not serialise a captured step")
                self.resolve(dropped="serialise_error")
                continue
            with self.progress:
                if not alive.is_set():
                    self.outstanding -= 1
                    self.stats.dropped["disconnected"] += 1
                    self.progress.notify_all()
                    return
                self.inflight[seq_no] = step.rows
                self.stats.batches_sent += 1
            yield message

    def to_message(self, seq_no: int, step: CapturedStep) -> pb.StepBatch:
        if step.ready is not None:
            step.ready.synchronize()
        batch = pb.StepBatch(seq_no=seq_no, model=self.settings.model_name)
        batch.sent_at.GetCurrentTime()
        for hook_point, tensor in step.layers.items():
            rows = _select_rows(tensor, step.valid)
            batch.layers.append(pb.Layer(hook_point=hook_point, activations=encode_tensor(rows)))
        for (pack, sha, hook_point), values in step.features.items():
            batch.features.append(
                pb.FeatureBlock(
                    pack=pack,
                    pack_sha256=sha,
                    hook_point=hook_point,
                    values=encode_tensor(values.to("cpu", torch.float32)),
                )
            )
        texts = self._token_texts(step)
        for index, tag in enumerate(step.sequences):
            batch.sequences.append(
                pb.Sequence(
                    conversation_id=tag.conversation_id,
                    request_id=tag.request_id,
                    rows=tag.rows,
                    position=tag.position,
                    role=tag.role,
                    end=tag.end,
                    tokens=texts[index] if texts else (),
                    attributes=tag.attributes,
                )
            )
        return batch

    def _token_texts(self, step: CapturedStep) -> list[list[str]] | None:
        if self.decode_tokens is None or step.token_ids is None:
            return None
        ids = step.token_ids
        if ids.shape[0] != len(step.sequences):
            return None
        texts = []
        for row in range(ids.shape[0]):
            row_ids = ids[row] if step.valid is None else ids[row][step.valid[row]]
            texts.append(self.decode_tokens(step.sequences[row].conversation_id, row_ids.tolist()))
        return texts

    def _handle(self, event: pb.MonitorEvent) -> None:
        kind = event.WhichOneof("event")
        if kind == "ack":
            self.settle(event.ack.seq_no, rejected=False)
        elif kind == "error":
            log.warning(
                "batch rejected by sidecar",
                seq_no=event.error.seq_no,
                reason=event.error.reason,
                error=event.error.message,
            )
            self.settle(event.error.seq_no, rejected=True)
        self.on_event(event)

    def _lose_inflight(self) -> None:
        with self.progress:
            lost = len(self.inflight)
            self.inflight.clear()
            self.outstanding -= lost
            if lost:
                self.stats.dropped["disconnected"] += lost
            self.progress.notify_all()

    def _drop_queued_while_down(self) -> None:
        """Fail-open must not keep stale steps queued while the sidecar is unreachable; a
        fail-closed client keeps them (the model is blocked on the queue anyway)."""
        if self.settings.fail_closed:
            return
        while True:
            try:
                self.steps.get_nowait()
            except queue.Empty:
                return
            self.resolve(dropped="sidecar_unavailable")


def _select_rows(tensor: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """[batch, seq, d] -> [rows, d]: the real-token rows, sequences concatenated in order."""
    if tensor.dim() == 2:
        return tensor
    if valid is None:
        return tensor.reshape(-1, tensor.shape[-1])
    return tensor[valid]
