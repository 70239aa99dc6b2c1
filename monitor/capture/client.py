"""CaptureClient: the one object a serving process holds.

Forward hooks copy the chosen layers' residual stream off the model's device and close one
CapturedStep per forward pass, which is copied onto a shared-memory ring; a relay process the
client starts (`relay/`) owns the gRPC stream, so no gRPC thread competes with the model for
the GIL. The forward pass never waits on the network: when the ring is full the step is
dropped whole (`on_full="drop"`, fail-open, the default) or the forward waits up to
`block_timeout` (`on_full="block"`, for deployments that must not serve unmonitored tokens).
On a GPU the copy off the device is asynchronous and the step goes onto the ring from a
background thread once the copy is done.
"""

from __future__ import annotations

import contextlib
import contextvars
import queue
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import structlog
import torch
from prometheus_client.registry import REGISTRY, CollectorRegistry
from torch import nn

from monitor.capture.channel.frames import FrameTooLarge
from monitor.capture.channel.protocol import SenderSettings, TransportSecurity
from monitor.capture.channel.ring import LOST_REASONS
from monitor.capture.hooks import (
    ConversationContext,
    PositionLedger,
    StepAssembler,
    register_hooks,
)
from monitor.capture.layers import select_layers
from monitor.capture.link import RelayLink
from monitor.capture.metrics import register_client
from monitor.capture.steps import CapturedStep, CaptureStats, Tagging
from monitor.limits import MAX_LINGER_MS
from monitor.wire import pb

log = structlog.get_logger("safety_monitor.capture")

OnFull = Literal["drop", "block"]
# Where local encoding runs: "hook" (the layer hook, on the model's device and thread),
# "relay" (the capture relay process, from the activations on the ring), "auto" (the relay
# for a model on the CPU, the hook for one on a GPU).
EncodeIn = Literal["auto", "hook", "relay"]
ENCODE_PLACES = ("auto", "hook", "relay")
_KEEP_ALERTS = 10_000
_MAX_LAST_TOKENS = 100_000


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
    actions: tuple[str, ...] = ()  # the rule's actions; "block" asks the engine to stop it


class CaptureClient:
    """Stream a transformers model's residual-stream activations to a safety-monitor sidecar.

    The model's thread only copies each step into a shared-memory ring; a relay process
    started by the client does the gRPC. Alerts come back on the stream (`alerts`,
    `iter_alerts`, or the `on_alert` callback); what was sent, acked or dropped is in `stats`.

        from monitor.capture import CaptureClient

        client = CaptureClient("127.0.0.1:50051", model_name="llama-3-8b", tokenizer=tokenizer)
        client.attach(model, layers=[12, 20])        # hook points layers.12, layers.20
        with client.conversation("conv-42"):         # tag what the model computes next
            model.generate(input_ids, max_new_tokens=64)
        client.end_conversation("conv-42")           # the sidecar frees its state
        client.flush(timeout=10)
        for alert in client.alerts:
            print(alert.rule, alert.severity, alert.position)
        client.close()
    """

    def __init__(
        self,
        target: str,
        *,
        model_name: str = "",
        queue_size: int = 256,
        on_full: OnFull = "drop",
        block_timeout: float = 1.0,
        on_alert: Callable[[ReceivedAlert], None] | None = None,
        tokenizer: Any = None,
        encode_locally: Any = None,
        max_message_bytes: int = 64 * 1024 * 1024,
        buffer_bytes: int = 64 * 1024 * 1024,
        reconnect_backoff: tuple[float, float] = (0.1, 5.0),
        connect_timeout: float = 1.0,
        max_tracked_conversations: int = 100_000,
        metrics_registry: CollectorRegistry | None = REGISTRY,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        token: str | None = None,
        linger_ms: float = 0.0,
        encode_in: EncodeIn = "auto",
    ) -> None:
        """`tokenizer` (optional) adds token text for the audit trail; `encode_locally` (a
        FeaturePack or a pack path) encodes before sending and sends only feature values;
        `metrics_registry=None` registers no client metrics. `tls_ca` (PEM file of the sidecar's
        CA) turns on TLS, `tls_cert` + `tls_key` add a client certificate for mutual TLS, and
        `token` is sent as `authorization: Bearer <token>`. `queue_size` bounds the steps
        waiting to be sent and `buffer_bytes` their bytes (the shared ring; a single step
        larger than that is dropped as `too_large`). `linger_ms` > 0 lets the relay send the
        steps published within that many milliseconds as one message (less CPU per step for
        the relay and the sidecar; alerts later by up to that much); `flush` and
        `wait_settled` make it send at once. The sidecar rejects a message as a whole, so a
        rejected merged message loses every step it holds (see README, "Relay linger").

        `encode_in` says where local encoding runs: "hook" (in the layer hook, on the model's
        device and thread), "relay" (in the capture relay process, on another core, from the
        activations on the ring; needs `encode_locally` as a pack path, which the relay loads
        as it starts: until it is loaded, `relay_encoder` says "loading" and the activations
        go unencoded, for the sidecar to encode) or "auto" (the default: the relay on a host
        without CUDA given a pack path, whose model's thread then does not run the pack's
        GEMM; else the hook, on a GPU encoding on its device and copying only feature values
        off it). The values are the same, bit for bit under the conditions README's "Local
        encoding" gives (the same rows per GEMM and torch thread count)."""
        if on_full not in ("drop", "block"):
            raise ValueError(f"on_full: expected 'drop' or 'block', got {on_full!r}")
        if isinstance(linger_ms, bool) or not 0 <= linger_ms <= MAX_LINGER_MS:
            raise ValueError(f"linger_ms: expected 0..{MAX_LINGER_MS}, got {linger_ms!r}")
        self.target = target
        self.on_full = on_full
        self.block_timeout = block_timeout
        self.on_alert = on_alert
        self.tokenizer = tokenizer
        if encode_in not in ENCODE_PLACES:
            raise ValueError(f"encode_in: expected one of {ENCODE_PLACES}, got {encode_in!r}")
        self.encode_in = encode_in
        self.pack = _load_pack(encode_locally)
        # The pack's file, for the relay to encode from (relay/encode.py): only a pack given
        # by path can be loaded there. The relay loads it as it starts, before `attach` knows
        # the model's device, so "auto" asks for it only on a host without CUDA, where the
        # model is on the CPU (a relay on a GPU host would hold torch and the pack unused).
        self._relay_pack = ""
        if self.pack is not None and (
            encode_in == "relay" or (encode_in == "auto" and not _has_cuda_devices())
        ):
            if isinstance(encode_locally, str | Path):
                self._relay_pack = str(Path(encode_locally).resolve())
            elif encode_in == "relay":
                raise ValueError(
                    "encode_in='relay': pass encode_locally as the pack's path (the relay "
                    "process loads the pack from its file), or use encode_in='hook'"
                )
        # Where this client's local encoding runs once attached: "hook", "relay" or None.
        self.encoding_in: str | None = None
        # hook point -> (its encoder, its feature block's key), set at attach: what the layer
        # hook needs per step, looked up once rather than through the pack every step.
        self._local_encoders: dict[str, tuple[Any, tuple[str, str, str]]] = {}
        self._captured = 0
        self._dropped: Counter[str] = Counter()  # drops decided in this process
        self._ledger = PositionLedger(max_tracked_conversations)
        self._context: contextvars.ContextVar[ConversationContext | None] = contextvars.ContextVar(
            f"safety_monitor_conversation_{id(self)}", default=None
        )
        self._lock = threading.Lock()
        self._alerts: deque[ReceivedAlert] = deque(maxlen=_KEEP_ALERTS)
        self._last_token: OrderedDict[str, int] = OrderedDict()  # under _publish_lock
        self._publish_lock = threading.Lock()
        self._copies: queue.Queue[CapturedStep] | None = None  # GPU steps awaiting their copy
        self._copies_pending = 0
        self._alert_queue: queue.Queue[ReceivedAlert] = queue.Queue(maxsize=_KEEP_ALERTS)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        # Zero-row tensors of the shapes last sent, for end-of-conversation messages.
        self._empty_layers: dict[str, torch.Tensor] = {}
        self._empty_features: dict[tuple[str, str, str], torch.Tensor] = {}
        self._last_tagging: Tagging | None = None
        settings = SenderSettings(
            target=target,
            model_name=model_name,
            max_message_bytes=max_message_bytes,
            reconnect_backoff=reconnect_backoff,
            connect_timeout=connect_timeout,
            fail_closed=on_full == "block",
            security=TransportSecurity(
                ca=_read(tls_ca), cert=_read(tls_cert), key=_read(tls_key), token=token
            ),
            linger_ms=float(linger_ms),
            queue_size=queue_size,
            encode_pack=self._relay_pack,
            encode_pack_sha256=self.pack.sha256 if self._relay_pack else "",
            encode_hook_points=tuple(self.pack.hook_points) if self._relay_pack else (),
        )
        self._link = RelayLink(settings, buffer_bytes, queue_size, self._on_event)
        self._link.start()
        register_client(self, metrics_registry)

    # ---- attaching ------------------------------------------------------------------------

    def attach(
        self, model: nn.Module, layers: Sequence[int], layer_path: str | None = None
    ) -> CaptureClient:
        """Hook decoder layers by index (hook points `layers.<i>`). Returns self."""
        if self._handles:
            raise RuntimeError("already attached; call detach() first")
        if any(p.device.type == "meta" for p in model.parameters()):
            raise ValueError("the model has parameters on the meta device; load its weights first")
        selected = select_layers(model, list(layers), layer_path)
        self.encoding_in = None
        if self.pack is not None:
            device = next(model.parameters()).device
            if self._relay_pack and (self.encode_in == "relay" or device.type == "cpu"):
                # The hooks send activations (the ring's cheap path); the relay encodes them.
                self.encoding_in = "relay"
            else:  # in the hook, on the model's own device
                self.encoding_in = "hook"
                self.pack = self.pack.to(device)
                self._local_encoders = {
                    hook_point: (entry.encoder, (self.pack.name, self.pack.sha256, hook_point))
                    for hook_point, entry in self.pack.hook_points.items()
                }
        assembler = StepAssembler(
            list(selected),
            self._ledger,
            emit=self._enqueue,
            drop=self._count_drop,
            want_token_ids=self.tokenizer is not None,
            local_encoder=self._encode_locally if self.encoding_in == "hook" else None,
            dropping=self._dropping if self.on_full == "drop" else None,
            unsent=self._unsent,
        )
        self._handles = register_hooks(
            model, selected, assembler, self._context.get, self._on_hook_error
        )
        log.info(
            "capture attached",
            hook_points=list(selected),
            target=self.target,
            local_encoding=self.encoding_in,
        )
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
        role: str | Sequence[str] = "assistant",
        request_id: str | Sequence[str] = "",
        start_position: int | None = None,
        attributes: Mapping[str, str] | None = None,
        turn_end: bool | Sequence[bool] = False,
        prompt_role: str | Sequence[str] | None = None,
    ) -> Iterator[None]:
        """Tag forward passes in this block: one id for the whole batch, or one per batch row
        (batched servers mixing requests). With n rows per id (num_return_sequences, beams) the
        rows become '<id>/0' ... '<id>/<n-1>'. `start_position` is the conversation position of
        the block's first token: when a server re-runs the chat history, tokens already sent
        are skipped so positions stay correct across turns. `attributes` (tenant, ...) travel
        with every row; rule `exceptions` match on them.

        Turn ends (the last token of one role's message; rules with `at: turn_end` are checked
        only there): `turn_end=True` (or one flag per id, as `role`) marks the last row of
        every forward pass in the block, for a pass that holds a whole message or its last
        chunk. `prompt_role` is for `model.generate()`: the block's first forward pass (the
        prefill) is the prompt, its rows take `prompt_role` and its last row ends the
        prompt's turn; the later passes (generated tokens) take `role`. A prompt prefilled
        in several passes (generation_config.prefill_chunk_size) must not use it: only its
        first pass would be taken as the prompt. `prompt_role` with a `turn_end` flag set is
        a ValueError: `turn_end` marks every pass of the block, and so would mark every
        generated token as an answer's end; the answer's end is one more pass over its last
        token in a block of its own, with `turn_end=True` (README: Turn ends)."""
        ids = _as_tuple(conversation_ids)
        if not ids or not all(isinstance(i, str) and i for i in ids):
            raise ValueError("conversation ids must be non-empty strings")
        if start_position is not None and start_position < 0:
            raise ValueError("start_position must be >= 0")
        # A server may open a block per forward pass: unmarked ones skip the flag handling.
        turn_ends = () if turn_end is False else _flags(turn_end, len(ids))
        prompt_roles: tuple[str, ...] = ()
        if prompt_role is not None:
            prompt_roles = _as_tuple(prompt_role)
            if not all(isinstance(r, str) and r for r in prompt_roles):
                raise ValueError("prompt_role must be a non-empty string (or one per id)")
            if any(turn_ends):
                # Every pass after the prefill would end a turn: an `at: turn_end` rule on the
                # answer's role would turn into a per-token rule without a word.
                raise ValueError(
                    "turn_end together with prompt_role would mark every generated token as "
                    "a turn end: the prompt's end is marked already; end the answer's turn "
                    "with one more pass over its last token in a block of its own, "
                    "conversation(ids, turn_end=True) (README: Turn ends, the answer's end)"
                )
        context = ConversationContext(
            ids,
            _as_tuple(role),
            _as_tuple(request_id),
            start_position,
            dict(attributes or {}),
            turn_ends=turn_ends if any(turn_ends) else (),
            prompt_roles=prompt_roles,
        )
        token = self._context.set(context)
        try:
            yield
        finally:
            self._context.reset(token)

    def end_conversation(self, conversation_id: str) -> None:
        """Tell the sidecar the conversation is over (its rule state is freed) and forget it."""
        positions = self._ledger.forget(conversation_id)  # with its '<id>/<j>' sequences
        if not positions:
            return
        if not (self._empty_layers or self._empty_features):
            # No step was ever assembled (each went through the hooks' early exit while the
            # sidecar was down), so there are no shapes for an end message. While it is still
            # down, the end is counted as an assembled one would be (captured, then dropped);
            # once it is back, it never saw these conversations: there is nothing to end.
            if self.on_full == "drop" and self._link.unreachable:
                self._unsent()
            return
        ids = tuple(positions)
        step = CapturedStep(
            layers=dict(self._empty_layers),
            tagging=Tagging(ids, ("",) * len(ids), ("",) * len(ids), end=True),
            rows=[0] * len(ids),
            positions=list(positions.values()),
            features=dict(self._empty_features),
        )
        self._enqueue(step)

    def submit(self, step: CapturedStep) -> None:
        """Send a step assembled outside this client's hooks (engine integrations such as
        vLLM, which split one flattened forward pass into per-request rows themselves).
        Counted, dropped and sent exactly like a hooked step; never raises into the caller."""
        try:
            self._enqueue(step)
        except Exception as exc:
            self._on_hook_error("submit", exc)

    def submit_again(self, step: CapturedStep, positions: list[int]) -> None:
        """`submit(dataclasses.replace(step, positions=positions))` for a step submitted
        before whose next step differs only in its positions (vLLM's decode runs: the same
        requests, tagging, rows and persistent views, one token further). Counted, dropped and
        sent exactly as that; when the ring's last frame was laid out for `step`, written
        with no new step object (`FrameWriter.write_again`). `step` must not have changed
        since. Never raises into the caller."""
        try:
            if (
                step.ready is not None  # a device copy per step: the full path
                or self.tokenizer is not None
                or step.tagging is not self._last_tagging
            ):
                self._enqueue(replace(step, positions=positions))
                return
            with self._lock:
                self._captured += 1
            if self.on_full == "drop" and self._link.unreachable:
                self._count_drop("sidecar_unavailable")  # as `_publish` would
                return
            if not self._link.publish_again(step, positions):
                # No room or another layout: `_publish` writes it in full, waits for room
                # (fail-closed) or counts the drop, as for any step.
                self._publish(replace(step, positions=positions))
        except Exception as exc:
            self._on_hook_error("submit", exc)

    def count_drop(self, reason: str) -> None:
        """Count a step an integration dropped before it reached the client."""
        self._count_drop(reason)

    # ---- results --------------------------------------------------------------------------

    @property
    def alerts(self) -> list[ReceivedAlert]:
        """The most recent alerts (up to 10,000)."""
        with self._lock:
            return list(self._alerts)

    def iter_alerts(self, timeout: float | None = None) -> Iterator[ReceivedAlert]:
        """Yield alerts as they arrive; stops after `timeout` seconds without one."""
        while True:
            try:
                yield self._alert_queue.get(timeout=timeout)
            except queue.Empty:
                return

    @property
    def stats(self) -> CaptureStats:
        """A snapshot of this client's counters (they only grow)."""
        relay = self._link.counters()
        with self._lock:
            dropped = self._dropped.copy()
            captured = self._captured
        for reason in (*LOST_REASONS.values(), "relay_exited", "client_closed"):
            dropped[reason] += relay[reason]
        return CaptureStats(
            steps_captured=captured,
            batches_sent=relay["sent"],
            batches_acked=relay["acked"],
            batches_rejected=relay["rejected"],
            rows_acked=relay["rows_acked"],
            reconnects=relay["reconnects"],
            dropped=+dropped,
            messages_sent=relay["messages"],
        )

    @property
    def queue_depth(self) -> int:
        """Steps waiting to be sent (on the ring or still being copied off the GPU)."""
        return self._link.queue_depth + self._copies_pending

    @property
    def relay_encoder(self) -> str | None:
        """Local encoding in the relay: None when not asked for (`encode_in`), else
        "loading" (activations go unencoded meanwhile), "ready" or "failed" (the relay
        could not use the pack: activations go unencoded; its log says why)."""
        if not self._relay_pack:
            return None
        return ("loading", "ready", "failed")[self._link.encoder_state]

    @property
    def connected(self) -> bool:
        """The relay has a live stream to the sidecar."""
        return self._link.connected

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every captured step is acknowledged, rejected or dropped."""
        deadline = time.monotonic() + timeout
        if not self._unflushed():
            return True
        with self._link.hurry():  # the relay sends at once, whatever its linger
            while self._unflushed():
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.002)
        return True

    def _unflushed(self) -> int:
        return self._copies_pending or self._link.unsettled() or self._link.alerts_pending()

    def wait_settled(self, max_unsettled: int, timeout: float) -> bool:
        """Wait until at most `max_unsettled` captured steps await the sidecar's verdict and
        every alert received so far was handled (guard mode: an engine holds a step's tokens
        back until then). False at `timeout`, or at once while the sidecar is unreachable:
        the caller carries on (fail-open)."""
        deadline = time.monotonic() + timeout

        def unsettled() -> bool:
            return bool(
                self._copies_pending + self._link.unsettled() > max_unsettled
                or self._link.alerts_pending()
            )

        if not unsettled():
            return True
        with self._link.hurry():  # a lingering relay would hold back what we wait for
            while unsettled():
                if self._link.unreachable or time.monotonic() >= deadline:
                    return False
                time.sleep(0.0002)
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Detach, flush what is queued (up to `timeout`), and stop the relay process."""
        self.detach()
        self.flush(timeout)
        if self._copies is not None:
            self._copies.put(None)  # type: ignore[arg-type]
        self._link.close(timeout)

    def __enter__(self) -> CaptureClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- internals ------------------------------------------------------------------------

    def _enqueue(self, step: CapturedStep) -> None:
        if step.tagging is not self._last_tagging:  # a new block: its first step
            self._last_tagging = step.tagging
            self._note_shapes(step)
        with self._lock:
            self._captured += 1
        if step.ready is not None:
            self._await_copy(step)
        else:
            self._publish(step)

    def _note_shapes(self, step: CapturedStep) -> None:
        # Zero-row tensors of the shapes sent, so an end-of-conversation message can carry the
        # same hook points and feature blocks as the conversation's steps.
        for hook_point, tensor in step.layers.items():
            if hook_point not in self._empty_layers:
                self._empty_layers[hook_point] = torch.empty(
                    0, tensor.shape[-1], dtype=tensor.dtype
                )
        for key, values in step.features.items():
            if key not in self._empty_features:
                self._empty_features[key] = torch.empty(0, values.shape[-1])

    def _publish(self, step: CapturedStep) -> None:
        """Onto the ring; when it is full, drop the step or (fail-closed) wait for room."""
        if self.on_full == "drop" and self._link.unreachable:
            # Fail-open with the sidecar known to be down: the relay would only discard the
            # step, so skip copying it (the cheapest path for the model while it is down).
            self._count_drop("sidecar_unavailable")
            return
        texts = None
        if self.tokenizer is not None:
            with self._publish_lock:
                texts = self._token_texts(step)
        deadline = None
        while True:
            try:
                if self._link.publish(step, texts):
                    return
            except FrameTooLarge as exc:
                self._count_drop("too_large")
                log.error("captured step dropped", error=str(exc))
                return
            if self.on_full != "block":
                break
            now = time.monotonic()
            deadline = deadline or now + self.block_timeout
            if now >= deadline:
                break
            time.sleep(0.0005)
        self._count_drop("queue_full")

    def _token_texts(self, step: CapturedStep) -> list[list[str]] | None:
        if step.token_ids is None:
            return None
        ids = step.token_ids
        conversation_ids = step.tagging.conversation_ids
        if ids.shape[0] != len(conversation_ids):
            return None
        texts = []
        for row, conversation_id in enumerate(conversation_ids):
            row_ids = ids[row] if step.valid is None else ids[row][step.valid[row]]
            texts.append(self._decode_tokens(conversation_id, row_ids.tolist()))
        return texts

    def _await_copy(self, step: CapturedStep) -> None:
        """GPU steps: publish from a background thread once the device->host copy is done,
        so the forward pass never waits on it."""
        with self._lock:
            if self._copies is None:
                self._copies = queue.Queue()
                threading.Thread(
                    target=self._publish_copies, name="safety-monitor-copies", daemon=True
                ).start()
            self._copies_pending += 1
        self._copies.put(step)

    def _publish_copies(self) -> None:
        assert self._copies is not None
        while (step := self._copies.get()) is not None:
            try:
                step.ready.synchronize()  # type: ignore[union-attr]
                self._publish(step)
            except Exception as exc:
                self._on_hook_error("copy", exc)
            finally:
                with self._lock:
                    self._copies_pending -= 1

    def _dropping(self) -> bool:
        # Fail-open with the sidecar known to be down: `_publish` would drop the step, so the
        # hooks skip assembling it (copies, encodes, the step object): the cheapest path for
        # the model while the sidecar is down.
        return self._link.unreachable

    def _unsent(self) -> None:
        # A step the hooks did not assemble (`_dropping`): counted as `_enqueue` and
        # `_publish` count a step they drop for the same reason.
        with self._lock:
            self._captured += 1
            self._dropped["sidecar_unavailable"] += 1

    def _count_drop(self, reason: str) -> None:
        with self._lock:
            self._dropped[reason] += 1

    def _on_hook_error(self, where: str, exc: BaseException) -> None:
        # Nothing may raise into the model: a monitoring bug must not break serving.
        self._count_drop("hook_error")
        log.error("capture hook failed", where=where, error=f"{type(exc).__name__}: {exc}")

    def _encode_locally(
        self, hook_point: str, hidden: torch.Tensor
    ) -> dict[tuple[str, str, str], torch.Tensor]:
        # The model's thread, every step: `pack.encode` without the pack's per-call lookups.
        local = self._local_encoders.get(hook_point)
        if local is None:  # a hook point the pack does not cover goes as activations
            return {}
        encoder, key = local
        return {key: encoder.encode(hidden.reshape(-1, hidden.shape[-1]))}

    def _decode_tokens(self, conversation_id: str, ids: list[int]) -> list[str]:
        """Token texts that join back into the decoded text, spaces included."""
        previous = self._last_token.pop(conversation_id, None)
        texts = token_texts(self.tokenizer, ids, previous)
        if ids:
            self._last_token[conversation_id] = ids[-1]
            if len(self._last_token) > _MAX_LAST_TOKENS:
                self._last_token.popitem(last=False)
        return texts

    def _on_event(self, event: pb.MonitorEvent) -> None:
        if event.WhichOneof("event") != "alert":
            return
        alert = event.alert
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
            actions=tuple(alert.actions),
        )
        with self._lock:
            self._alerts.append(received)
        with contextlib.suppress(queue.Full):
            self._alert_queue.put_nowait(received)
        if self.on_alert is not None:
            try:
                self.on_alert(received)
            except Exception:
                log.exception("on_alert callback failed", rule=alert.rule)


def token_texts(tokenizer: Any, ids: list[int], previous: int | None = None) -> list[str]:
    """Each token's text as it reads in context. Decoding a token alone loses its leading
    space (SentencePiece's '▁', WordPiece's word boundaries); decoding it after its
    predecessor and taking the difference keeps it. Two batched decodes per row."""
    if not ids:
        return []
    context = [previous, *ids[:-1]]
    pairs = [[p, i] if p is not None else [i] for p, i in zip(context, ids, strict=True)]
    heads = [[p] if p is not None else [] for p in context]
    decode_many = getattr(tokenizer, "batch_decode", None)
    if decode_many is not None:
        pair_texts, head_texts = decode_many(pairs), decode_many(heads)
    else:
        pair_texts = [tokenizer.decode(p) for p in pairs]
        head_texts = [tokenizer.decode(h) for h in heads]
    return [
        pair[len(head) :] if pair.startswith(head) else tokenizer.decode([i])
        for pair, head, i in zip(pair_texts, head_texts, ids, strict=True)
    ]


def _read(path: str | Path | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


def _as_tuple(value: str | Sequence[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


def _flags(value: bool | Sequence[bool], ids: int) -> tuple[bool, ...]:
    """`turn_end` as a tuple of bools: one for every id, or one per id."""
    if isinstance(value, bool):
        return (value,)
    if isinstance(value, str | bytes) or len(value) not in (1, ids):
        raise ValueError(f"turn_end: expected a bool or {ids} bools (one per id), got {value!r}")
    return tuple(bool(flag) for flag in value)  # numpy and torch bools too


def _has_cuda_devices() -> bool:
    # `torch.cuda.device_count` asks NVML first, which does not initialise CUDA in this
    # process (`torch.cuda.is_available` would, and a serving process that forks its workers
    # afterwards could then not use CUDA in them).
    return torch.backends.cuda.is_built() and torch.cuda.device_count() > 0


def _load_pack(pack: Any):  # type: ignore[no-untyped-def]
    if pack is None:
        return None
    if isinstance(pack, str | Path):
        from monitor.features import load_pack

        return load_pack(pack)
    return pack
