"""Capture client: runs inside the serving process.

Forward hooks on the chosen decoder layers copy the residual stream off the model's device;
when the deepest hooked layer has run, the step's tensors become one queued StepBatch. A
background thread owns the gRPC stream, serialises, sends and reads acks and alerts, so the
forward pass never waits on the network. When the queue is full the step is dropped whole
(`on_full="drop"`, fail-open, the default) or the forward waits up to `block_timeout`
(`on_full="block"`, for deployments that must not serve unmonitored tokens).
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import queue
import random
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import grpc
import structlog
import torch
from torch import nn

from monitor.capture.layers import select_layers
from monitor.wire import encode_tensor, pb, pb_grpc

log = structlog.get_logger("safety_monitor.capture")

OnFull = Literal["drop", "block"]


@dataclass(frozen=True)
class ReceivedAlert:
    """An alert the sidecar raised for tokens this client sent."""

    rule: str
    category: str
    severity: str
    conversation_id: str
    request_id: str
    position: int
    value: float
    message: str
    labels: dict[str, str]
    seq_no: int


@dataclass(frozen=True)
class SequenceTag:
    conversation_id: str
    rows: int
    position: int
    role: str
    request_id: str


@dataclass
class CapturedStep:
    """One forward pass: every hooked layer's [rows, d_model] plus who the rows belong to."""

    layers: dict[str, torch.Tensor]
    sequences: list[SequenceTag]
    ready: torch.cuda.Event | None = None  # set when the device->host copy is asynchronous

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.sequences)


@dataclass
class CaptureStats:
    steps_captured: int = 0
    batches_sent: int = 0
    batches_acked: int = 0
    batches_rejected: int = 0
    rows_acked: int = 0
    reconnects: int = 0
    dropped: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class _ConversationContext:
    conversation_ids: tuple[str, ...]
    role: str
    request_id: str


class CaptureClient:
    """Stream a transformers model's residual-stream activations to a safety-monitor sidecar."""

    def __init__(
        self,
        target: str,
        *,
        model_name: str = "",
        queue_size: int = 256,
        on_full: OnFull = "drop",
        block_timeout: float = 1.0,
        on_alert: Callable[[ReceivedAlert], None] | None = None,
        max_message_bytes: int = 64 * 1024 * 1024,
        reconnect_backoff: tuple[float, float] = (0.1, 5.0),
    ) -> None:
        if on_full not in ("drop", "block"):
            raise ValueError(f"on_full: expected 'drop' or 'block', got {on_full!r}")
        self.target = target
        self.model_name = model_name
        self.on_full = on_full
        self.block_timeout = block_timeout
        self.on_alert = on_alert
        self.max_message_bytes = max_message_bytes
        self.reconnect_backoff = reconnect_backoff
        self.stats = CaptureStats()
        self._queue: queue.Queue[CapturedStep] = queue.Queue(maxsize=queue_size)
        self._context: contextvars.ContextVar[_ConversationContext | None] = contextvars.ContextVar(
            f"safety_monitor_conversation_{id(self)}", default=None
        )
        self._positions: dict[str, int] = {}
        self._pending = threading.local()
        self._lock = threading.Lock()
        self._progress = threading.Condition(self._lock)
        self._outstanding = 0  # steps queued or in flight, not yet acked / rejected / dropped
        self._inflight: dict[int, int] = {}  # seq_no -> rows
        self._alerts: list[ReceivedAlert] = []
        self._seq_no = itertools.count(1)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._stopping = threading.Event()
        self._sender = threading.Thread(target=self._send_loop, name="safety-monitor-capture")
        self._sender.daemon = True
        self._sender.start()

    # ---- attaching ------------------------------------------------------------------------

    def attach(
        self, model: nn.Module, layers: Sequence[int], layer_path: str | None = None
    ) -> CaptureClient:
        """Hook decoder layers by index (`layers.<i>` hook points). Returns self."""
        if self._handles:
            raise RuntimeError("already attached; call detach() first")
        selected = select_layers(model, list(layers), layer_path)
        last = list(selected)[-1] if len(selected) == 1 else _deepest(selected)
        for hook_point, module in selected.items():
            hook = self._make_hook(hook_point, finalize=hook_point == last)
            self._handles.append(module.register_forward_hook(hook))
        log.info("capture attached", hook_points=list(selected), target=self.target)
        return self

    def detach(self) -> None:
        """Remove every hook; the model runs exactly as if never attached."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @contextlib.contextmanager
    def conversation(
        self,
        conversation_ids: str | Sequence[str],
        *,
        role: str = "assistant",
        request_id: str = "",
    ) -> Iterator[None]:
        """Tag forward passes in this block: one id for a batch of one, or one id per batch row."""
        ids = (conversation_ids,) if isinstance(conversation_ids, str) else tuple(conversation_ids)
        if not ids or not all(isinstance(i, str) and i for i in ids):
            raise ValueError("conversation ids must be non-empty strings")
        token = self._context.set(_ConversationContext(ids, role, request_id))
        try:
            yield
        finally:
            self._context.reset(token)

    # ---- results --------------------------------------------------------------------------

    @property
    def alerts(self) -> list[ReceivedAlert]:
        with self._lock:
            return list(self._alerts)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every captured step is acknowledged, rejected or dropped."""
        with self._progress:
            return self._progress.wait_for(lambda: self._outstanding == 0, timeout=timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Detach, flush what is queued (up to `timeout`), and stop the sender thread."""
        self.detach()
        self.flush(timeout)
        self._stopping.set()
        self._sender.join(timeout)

    def __enter__(self) -> CaptureClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the forward-pass side --------------------------------------------------------------

    def _make_hook(self, hook_point: str, finalize: bool):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: object, output: object) -> None:
            # Nothing here may raise into the model: a monitoring bug must not break serving.
            try:
                self._capture(hook_point, output, finalize)
            except Exception:
                self._drop("hook_error")
                log.exception("capture hook failed", hook_point=hook_point)

        return hook

    def _capture(self, hook_point: str, output: object, finalize: bool) -> None:
        context = self._context.get()
        if context is None:
            if finalize:
                self._drop("untagged")
            return
        hidden = output[0] if isinstance(output, tuple) else output
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
            raise TypeError(f"{hook_point}: expected a [batch, seq, d_model] tensor output")
        pending: dict[str, torch.Tensor] = self._pending.__dict__.setdefault("layers", {})
        pending[hook_point] = _to_host(hidden.detach().flatten(0, 1))
        if finalize:
            layers = dict(pending)
            pending.clear()
            self._finish_step(context, layers, batch=hidden.shape[0], seq=hidden.shape[1])

    def _finish_step(
        self,
        context: _ConversationContext,
        layers: dict[str, torch.Tensor],
        batch: int,
        seq: int,
    ) -> None:
        ids = context.conversation_ids
        if len(ids) != batch:
            self._drop("batch_mismatch")
            log.warning("conversation ids do not match the batch", ids=len(ids), batch=batch)
            return
        with self._lock:
            tags = []
            for conversation_id in ids:
                position = self._positions.get(conversation_id, 0)
                self._positions[conversation_id] = position + seq
                tags.append(
                    SequenceTag(conversation_id, seq, position, context.role, context.request_id)
                )
        ready = None
        if any(t.device.type == "cuda" for t in layers.values()):
            ready = torch.cuda.Event()
            ready.record()
        self._enqueue(CapturedStep(layers, tags, ready))

    def _enqueue(self, step: CapturedStep) -> None:
        with self._lock:
            self._outstanding += 1
            self.stats.steps_captured += 1
        try:
            if self.on_full == "block":
                self._queue.put(step, timeout=self.block_timeout)
            else:
                self._queue.put_nowait(step)
        except queue.Full:
            self._resolve(dropped="queue_full")

    def _drop(self, reason: str) -> None:
        with self._lock:
            self.stats.dropped[reason] += 1

    def _resolve(self, dropped: str | None = None) -> None:
        with self._progress:
            self._outstanding -= 1
            if dropped:
                self.stats.dropped[dropped] += 1
            self._progress.notify_all()

    # ---- the sender thread ----------------------------------------------------------------

    def _send_loop(self) -> None:
        low, high = self.reconnect_backoff
        backoff = low
        while not self._stopping.is_set():
            connected = self._stream_once()
            if self._stopping.is_set():
                break
            backoff = low if connected else min(high, backoff * 2)
            with self._lock:
                self.stats.reconnects += 1
            # Jitter so a fleet of serving processes does not reconnect in lockstep.
            self._stopping.wait(backoff * random.uniform(0.5, 1.5))

    def _stream_once(self) -> bool:
        """Run one gRPC stream until it ends; True if it got connected."""
        options = [("grpc.max_send_message_length", self.max_message_bytes)]
        with grpc.insecure_channel(self.target, options=options) as channel:
            try:
                grpc.channel_ready_future(channel).result(timeout=1.0)
            except grpc.FutureTimeoutError:
                self._drop_queued_while_down()
                return False
            stub = pb_grpc.SafetyMonitorStub(channel)
            try:
                for event in stub.Monitor(self._requests()):
                    self._on_event(event)
            except grpc.RpcError as exc:
                log.warning("monitor stream broke", code=str(exc.code()), target=self.target)
            self._lose_inflight()
            return True

    def _requests(self) -> Iterator[pb.StepBatch]:
        while not (self._stopping.is_set() and self._queue.empty()):
            try:
                step = self._queue.get(timeout=0.05)
            except queue.Empty:
                continue
            seq_no = next(self._seq_no)
            with self._lock:
                self._inflight[seq_no] = step.rows
                self.stats.batches_sent += 1
            yield self._to_message(seq_no, step)

    def _to_message(self, seq_no: int, step: CapturedStep) -> pb.StepBatch:
        if step.ready is not None:
            step.ready.synchronize()
        batch = pb.StepBatch(seq_no=seq_no, model=self.model_name)
        batch.sent_at.GetCurrentTime()
        for hook_point, tensor in step.layers.items():
            batch.layers.append(pb.Layer(hook_point=hook_point, activations=encode_tensor(tensor)))
        for tag in step.sequences:
            batch.sequences.append(
                pb.Sequence(
                    conversation_id=tag.conversation_id,
                    request_id=tag.request_id,
                    rows=tag.rows,
                    position=tag.position,
                    role=tag.role,
                )
            )
        return batch

    def _on_event(self, event: pb.MonitorEvent) -> None:
        kind = event.WhichOneof("event")
        if kind == "alert":
            self._on_alert(event.alert)
        elif kind == "ack":
            self._settle(event.ack.seq_no, rejected=False)
        elif kind == "error":
            log.warning(
                "batch rejected by sidecar",
                seq_no=event.error.seq_no,
                reason=event.error.reason,
                error=event.error.message,
            )
            self._settle(event.error.seq_no, rejected=True)

    def _on_alert(self, alert: pb.Alert) -> None:
        received = ReceivedAlert(
            rule=alert.rule,
            category=alert.category,
            severity=alert.severity,
            conversation_id=alert.conversation_id,
            request_id=alert.request_id,
            position=alert.position,
            value=alert.value,
            message=alert.message,
            labels=dict(alert.labels),
            seq_no=alert.seq_no,
        )
        with self._lock:
            self._alerts.append(received)
        if self.on_alert is not None:
            try:
                self.on_alert(received)
            except Exception:
                log.exception("on_alert callback failed", rule=alert.rule)

    def _settle(self, seq_no: int, rejected: bool) -> None:
        with self._progress:
            rows = self._inflight.pop(seq_no, None)
            if rows is None:
                return
            if rejected:
                self.stats.batches_rejected += 1
            else:
                self.stats.batches_acked += 1
                self.stats.rows_acked += rows
            self._outstanding -= 1
            self._progress.notify_all()

    def _lose_inflight(self) -> None:
        with self._progress:
            lost = len(self._inflight)
            self._inflight.clear()
            self._outstanding -= lost
            if lost:
                self.stats.dropped["disconnected"] += lost
            self._progress.notify_all()

    def _drop_queued_while_down(self) -> None:
        """Sidecar unreachable: fail-open means the queue must not hold stale steps forever."""
        if self.on_full == "block":
            return
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return
            self._resolve(dropped="sidecar_unavailable")


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """Copy off the model's device without waiting for it (pinned buffer + non_blocking)."""
    if tensor.device.type == "cuda":
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        return host
    # A copy, because the serving code may reuse or modify the buffer after the hook returns.
    return tensor.clone()


def _deepest(selected: dict[str, nn.Module]) -> str:
    return max(selected, key=lambda name: int(name.rsplit(".", 1)[1]))
