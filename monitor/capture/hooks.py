"""The forward-pass side of capture: hooks that copy activations off the device and assemble
one CapturedStep per forward pass. Nothing here may block on the network or raise into the
model.

A pre-hook on the top-level model reads the attention mask of the current forward (a tiny
[batch, seq] tensor, read before the heavy kernels are launched) so padding rows are never sent;
a forward hook on each chosen layer starts the device->host copy of its output; the hook of the
deepest chosen layer closes the step.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from monitor.capture.steps import CapturedStep, Tagging


@dataclass
class ConversationContext:
    """The tagging in force for forward passes in a `conversation(...)` block."""

    conversation_ids: tuple[str, ...]
    roles: tuple[str, ...]
    request_ids: tuple[str, ...]
    # Absolute position of the first token of the block's first forward pass: tokens before
    # the conversation's counter were already sent (a server re-running the chat history).
    start_position: int | None = None
    attributes: dict[str, str] = field(default_factory=dict)
    started: bool = field(default=False)
    serial: int = field(default_factory=lambda: next(_context_serials))
    # batch size -> the rows' tagging, built on the block's first forward at that size
    taggings: dict[int, Tagging] = field(default_factory=dict)
    # One per conversation id (or one for all): every forward pass of the block ends a turn.
    turn_ends: tuple[bool, ...] = ()
    # With a prompt role, the block's first forward pass is a prompt (a generate()'s prefill):
    # its rows take these roles and its last row ends the prompt's turn. Empty: no prompt.
    prompt_roles: tuple[str, ...] = ()
    prompted: bool = field(default=False)  # the prompt's forward pass has been tagged


_context_serials = itertools.count()


@dataclass
class _Pending:
    valid: torch.Tensor | None = None  # None: every token of the forward is real
    token_ids: torch.Tensor | None = None
    layers: dict[str, torch.Tensor] = field(default_factory=dict)
    features: dict[tuple[str, str, str], torch.Tensor] = field(default_factory=dict)
    on_cuda: bool = False  # some copy off the device is still in flight
    # The rows `features` were encoded from when only the real tokens were (CPU activations
    # with padding): `valid` as it was then. None: encoded from every row of the forward.
    encoded_rows: torch.Tensor | None = None
    # Decided as the step begins: it will be dropped whatever it holds (fail-open, sidecar
    # unreachable), so its hooks copy and encode nothing (`StepAssembler.dropping`).
    unsent: bool = False


class PositionLedger:
    """Next token position per conversation id, capped (least recently used forgotten)."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._next: OrderedDict[str, int] = OrderedDict()
        # parent id -> its per-sequence ids; least recently linked forgotten past capacity
        self._children: OrderedDict[str, tuple[str, ...]] = OrderedDict()
        self._lock = threading.Lock()

    def advance_many(self, conversation_ids: Sequence[str], rows: Sequence[int]) -> list[int]:
        """Each conversation's position for its next `rows` tokens; moves the counters on."""
        positions = []
        with self._lock:
            for conversation_id, count in zip(conversation_ids, rows, strict=True):
                position = self._next.pop(conversation_id, 0)
                self._next[conversation_id] = position + count
                positions.append(position)
            while len(self._next) > self.capacity:
                self._next.popitem(last=False)
        return positions

    def advance(self, conversation_id: str, rows: int) -> int:
        """The conversation's position for its next `rows` tokens; moves its counter on."""
        return self.advance_many((conversation_id,), (rows,))[0]

    def peek(self, conversation_id: str) -> int:
        """The conversation's next position, without moving it."""
        with self._lock:
            return self._next.get(conversation_id, 0)

    def link(self, parent: str, children: tuple[str, ...]) -> None:
        """Remember that `parent` was expanded into per-sequence ids (`<id>/<j>`)."""
        with self._lock:
            self._children[parent] = children
            self._children.move_to_end(parent)
            while len(self._children) > self.capacity:
                self._children.popitem(last=False)

    def forget(self, conversation_id: str) -> dict[str, int]:
        """Drop a conversation and its per-sequence ids; returns their next positions.

        The link to the per-sequence ids is kept: a block's tagging is built once, so when
        `end_conversation(parent)` runs in the middle of a block, the block's next forward
        passes send `<id>/<j>` again, and a later end of the parent must end those too."""
        with self._lock:
            ids = (conversation_id, *self._children.get(conversation_id, ()))
            return {cid: self._next.pop(cid) for cid in ids if cid in self._next}

    def __len__(self) -> int:
        return len(self._next)


LocalEncoder = Callable[[str, torch.Tensor], dict[tuple[str, str, str], torch.Tensor]]


class StepAssembler:
    """Per-thread pending state of the forward in progress -> CapturedStep.

    This runs on the model's thread right after the model's own compute, with the caches
    cold: every torch call and Python object costs several times what a microbenchmark says,
    so a decode step (same tagging, every token real) takes a path with almost none.
    """

    def __init__(
        self,
        hook_points: list[str],
        ledger: PositionLedger,
        emit: Callable[[CapturedStep], None],
        drop: Callable[[str], None],
        want_token_ids: bool,
        local_encoder: LocalEncoder | None = None,
        dropping: Callable[[], bool] | None = None,
        unsent: Callable[[], None] | None = None,
    ) -> None:
        """`emit` takes each assembled step, `drop(reason)` counts one dropped before it was
        assembled. `dropping()`, asked as each forward pass begins, says the step will be
        dropped whatever it holds (the client's fail-open with the sidecar known to be
        down): then nothing is copied, encoded or assembled, the conversations' positions
        move on as if it had been sent, and `unsent()` counts it (a captured step dropped
        as `sidecar_unavailable`) instead of `emit`."""
        self.hook_points = hook_points
        self.deepest = max(hook_points, key=lambda hp: int(hp.rsplit(".", 1)[1]))
        self.ledger = ledger
        self.emit = emit
        self.drop = drop
        self.want_token_ids = want_token_ids
        self.local_encoder = local_encoder
        self.dropping = dropping
        self.unsent = unsent
        self._pending = threading.local()

    def begin(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Model pre-hook: note which rows of this forward are real tokens."""
        token_ids = kwargs.get("input_ids")
        if token_ids is None and args and isinstance(args[0], torch.Tensor):
            token_ids = args[0]
        seq = _sequence_length(token_ids, kwargs.get("inputs_embeds"))
        mask = kwargs.get("attention_mask")
        pending = self._new_pending()
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and seq is not None:
            pending.valid = _real_tokens(mask[:, -seq:])  # the positions still count them
        if (
            self.want_token_ids
            and not pending.unsent
            and isinstance(token_ids, torch.Tensor)
            and token_ids.dim() == 2
        ):
            pending.token_ids = token_ids.to("cpu")
        self._pending.state = pending

    def _new_pending(self) -> _Pending:
        pending = _Pending()
        if self.dropping is not None and self.dropping():
            pending.unsent = True
        return pending

    def layer_output(
        self, hook_point: str, output: object, context: ConversationContext | None
    ) -> None:
        """Layer forward hook: start the copy off the device; the deepest layer closes the step."""
        pending: _Pending | None = getattr(self._pending, "state", None)
        if pending is None:
            pending = self._pending.state = self._new_pending()
        hidden = output[0] if isinstance(output, tuple) else output
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
            raise TypeError(f"{hook_point}: expected a [batch, seq, d_model] tensor output")
        if hidden.is_meta:
            raise TypeError(f"{hook_point}: activations on the meta device cannot be captured")
        deepest = hook_point == self.deepest
        if context is not None and not pending.unsent:
            if hidden.requires_grad:
                hidden = hidden.detach()
            # With local encoding, hook points the pack does not cover still go as activations.
            encoded = None
            if self.local_encoder:
                rows = hidden
                valid = pending.valid
                if valid is not None and hidden.is_cpu and valid.shape == hidden.shape[:2]:
                    # Only the rows that are sent: MKL's result for a row depends on how
                    # many rows are multiplied together, and the relay (`encode_in="relay"`)
                    # sees only these, so both compute the same values
                    # (tests/integration/test_relay_encoding_bits.py). Fewer rows, too.
                    rows = hidden[valid]
                    pending.encoded_rows = valid
                encoded = self.local_encoder(hook_point, rows)
            if encoded:
                pending.features.update(encoded)
            elif deepest and hidden.is_cpu and not pending.on_cuda:
                # The step is copied onto the ring before this hook returns: no clone needed.
                # Not so when an earlier layer is on a GPU (a model split across devices):
                # the step then waits for that copy on a background thread, by which time
                # the model may have reused this buffer, so it is cloned like the others.
                pending.layers[hook_point] = hidden
            else:
                pending.layers[hook_point] = _to_host(hidden)
            pending.on_cuda = pending.on_cuda or hidden.is_cuda
        if deepest:
            self._pending.state = None
            if context is None:
                self.drop("untagged")
            else:
                self._finish(pending, context, batch=hidden.shape[0], seq=hidden.shape[1])

    def _finish(
        self, pending: _Pending, context: ConversationContext, batch: int, seq: int
    ) -> None:
        # A prompt block's first forward pass finds no tagging here (see `_tagging`): turn
        # ends and prompts cost the decode steps nothing.
        tagging = context.taggings.get(batch) or self._tagging(context, batch)
        if tagging is None:
            self.drop("batch_mismatch")
            return
        valid = pending.valid
        if valid is not None and valid.shape != (batch, seq):
            valid = None
        if not context.started:
            valid = self._skip_already_sent(valid, tagging.conversation_ids, context, seq)
        rows = [seq] * batch if valid is None else valid.sum(dim=1).tolist()
        if pending.unsent:
            # Dropped as if it had been sent: the next step sent has its true positions.
            self.ledger.advance_many(tagging.conversation_ids, rows)
            self.unsent()  # type: ignore[misc]  # set whenever `dropping` is
            return
        step = CapturedStep(
            layers=pending.layers,
            tagging=tagging,
            rows=rows,
            positions=self.ledger.advance_many(tagging.conversation_ids, rows),
            valid=valid,
            token_ids=pending.token_ids,
            features=_select_features(pending.features, valid, pending.encoded_rows),
        )
        if pending.on_cuda:
            step.ready = torch.cuda.Event()
            step.ready.record()
        self.emit(step)

    def _tagging(self, context: ConversationContext, batch: int) -> Tagging | None:
        """The block's ids, roles, request ids and turn ends, one per row of a `batch`-row
        forward. A prompt block's first forward pass gets the prompt's roles, every row
        ending its turn, in a tagging of its own that is not kept: the next pass (the first
        generated token) builds and keeps the block's."""
        ids = _expand(context.conversation_ids, batch)
        if ids is None:
            return None
        if ids is not context.conversation_ids:
            copies = batch // len(context.conversation_ids)
            for i, parent in enumerate(context.conversation_ids):
                self.ledger.link(parent, ids[i * copies : (i + 1) * copies])
        if context.prompt_roles and not context.prompted:
            context.prompted = True
            return Tagging(
                conversation_ids=ids,
                roles=_repeat(context.prompt_roles, batch),
                request_ids=_repeat(context.request_ids, batch),
                attributes=context.attributes,
                key=(context.serial, batch, "prompt"),
                turn_ends=(True,) * batch,
            )
        turn_ends = _repeat_flags(context.turn_ends, batch)
        tagging = Tagging(
            conversation_ids=ids,
            roles=_repeat(context.roles, batch),
            request_ids=_repeat(context.request_ids, batch),
            attributes=context.attributes,
            key=(context.serial, batch),
            turn_ends=turn_ends if any(turn_ends) else (),
        )
        context.taggings[batch] = tagging
        return tagging

    def _skip_already_sent(
        self,
        valid: torch.Tensor | None,
        ids: tuple[str, ...],
        context: ConversationContext,
        seq: int,
    ) -> torch.Tensor | None:
        """With start_position, the block's first forward may re-run tokens already sent."""
        context.started = True
        if context.start_position is None:
            return valid
        valid = torch.ones(len(ids), seq, dtype=torch.bool) if valid is None else valid.clone()
        for row, cid in enumerate(ids):
            already = self.ledger.peek(cid) - context.start_position
            if already > 0:
                real = valid[row].nonzero().flatten()
                valid[row, real[:already]] = False
            elif already < 0:
                # Tokens between the counter and start_position were never seen: a gap.
                self.ledger.advance(cid, -already)
        return None if bool(valid.all()) else valid


def _real_tokens(mask: torch.Tensor) -> torch.Tensor | None:
    """[batch, seq] attention mask -> bool tensor of the real tokens, or None when all are
    (checked through numpy: one torch call instead of three)."""
    if not mask.is_cpu:
        mask = mask.to("cpu")
    if mask.dtype == torch.bfloat16:  # the one mask dtype numpy cannot view
        mask = mask.bool()
    if mask.numpy().all():
        return None
    return mask.bool()


def _sequence_length(token_ids: object, embeds: object) -> int | None:
    if isinstance(token_ids, torch.Tensor) and token_ids.dim() == 2:
        return token_ids.shape[1]
    if isinstance(embeds, torch.Tensor) and embeds.dim() == 3:
        return embeds.shape[1]
    return None


def _expand(values: tuple[str, ...], batch: int) -> tuple[str, ...] | None:
    """One value per row; n rows per value (num_return_sequences, beams) get '/<j>' suffixes."""
    if len(values) == batch:
        return values
    if len(values) == 0 or batch % len(values):
        return None
    copies = batch // len(values)
    return tuple(f"{v}/{j}" for v in values for j in range(copies))


def _repeat(values: tuple[str, ...], batch: int) -> tuple[str, ...]:
    """One value per row for roles and request ids: one value for every row, one per row, or
    one per conversation id repeated over its sequences. Never suffixed: only conversation ids
    get '/<j>' (a role 'assistant/0' would match no rule, and a request id that changes with
    the row index would restart every `scope: request` rule at each step)."""
    if len(values) == batch:
        return values
    if len(values) == 0 or batch % len(values):
        return (values[0] if values else "",) * batch
    copies = batch // len(values)
    return tuple(v for v in values for _ in range(copies))


def _repeat_flags(values: tuple[bool, ...], batch: int) -> tuple[bool, ...]:
    """One flag per row, expanded as `_repeat` expands roles (one for all rows, one per row,
    or one per conversation id repeated over its sequences); empty stays empty."""
    if not values:
        return ()
    if len(values) == batch:
        return values
    if batch % len(values):
        return (values[0],) * batch
    copies = batch // len(values)
    return tuple(v for v in values for _ in range(copies))


def _select_features(
    features: dict[tuple[str, str, str], torch.Tensor],
    valid: torch.Tensor | None,
    encoded_rows: torch.Tensor | None = None,
) -> dict[tuple[str, str, str], torch.Tensor]:
    """The feature rows of the tokens sent (`valid`), from features encoded from every row
    of the forward or, with `encoded_rows`, from those rows only."""
    if encoded_rows is not None:
        if valid is encoded_rows:
            return features
        if valid is None:
            # Not reached: `encoded_rows` is set only for a mask that fits the step, and a
            # mask with a padded row keeps one. If it were, every row would be sent against
            # fewer feature rows: refuse (counted as a hook error) rather than misalign.
            raise RuntimeError("features were encoded from a mask the step no longer has")
        keep = valid[encoded_rows]  # a block re-running tokens already sent drops more
        return {key: values[keep.to(values.device)] for key, values in features.items()}
    if valid is None:
        return features
    flat = valid.flatten()
    return {key: values[flat.to(values.device)] for key, values in features.items()}


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """Copy off the model's device without waiting for it (pinned buffer + non_blocking)."""
    if tensor.is_cuda:
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        return host
    # A copy, because the serving code may reuse or modify the buffer after the hook returns.
    return tensor.clone() if tensor.is_cpu else tensor.to("cpu")


def register_hooks(
    model: nn.Module,
    layers: dict[str, nn.Module],
    assembler: StepAssembler,
    context_of: Callable[[], ConversationContext | None],
    on_error: Callable[[str, BaseException], None],
) -> list[torch.utils.hooks.RemovableHandle]:
    """Install the model pre-hook and one forward hook per layer; errors go to on_error."""

    def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        try:
            if context_of() is not None:
                assembler.begin(args, kwargs)
        except Exception as exc:
            on_error("pre_hook", exc)

    def make_layer_hook(hook_point: str):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: object, output: object) -> None:
            try:
                assembler.layer_output(hook_point, output, context_of())
            except Exception as exc:
                on_error(hook_point, exc)

        return hook

    handles = [model.register_forward_pre_hook(pre_hook, with_kwargs=True)]
    for hook_point, module in layers.items():
        handles.append(module.register_forward_hook(make_layer_hook(hook_point)))
    return handles
