"""Validate a StepBatch before any work is done on it.

Every problem becomes a BatchRejected naming the field and the problem, with a stable reason
code for the rejected-batches metric. Nothing here trusts the client: sizes are checked before
bytes are viewed, and every row is checked for NaN/Inf.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from monitor.rules import SequenceSlice, SliceList
from monitor.sidecar.config import Limits
from monitor.wire import WIRE_DTYPES, TensorDecodeError, decode_tensor_with_bytes, pb

if TYPE_CHECKING:
    from monitor.sidecar.columns import ConversationTable

# Per-sequence flags read besides `end` (StatusResponse.sequence_flags): `turn_end` marks a
# slice whose last row ends a turn (rules with `at: turn_end` are checked there).
SEQUENCE_FLAGS = ("turn_end",)
# Positions are stored as signed 64-bit integers downstream (audit store, rule state); a
# conversation of 2**62 tokens does not exist, so anything past it is a client bug.
MAX_POSITION = 2**62
_ROWS = operator.attrgetter("rows")
_HOOK_POINT = operator.itemgetter(1)


@dataclass(frozen=True)
class BatchRejected(Exception):
    """A batch the sidecar refuses: `reason` (the metric label), the offending `field` and a
    one-line `message`, sent back as a BatchError.
    """

    reason: str
    field: str
    message: str

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class EncoderCatalog:
    """What the loaded packs accept: d_model per hook point, and per (pack, hook point) the
    pack's hash and column count for feature values a client encoded itself."""

    d_model_of: Mapping[str, int]
    columns_of: Mapping[tuple[str, str], tuple[str, int]]  # (pack, hp) -> (sha256, k)


@dataclass(frozen=True)
class ValidatedBatch:
    """A StepBatch after validation: decoded activations per hook point, conversation slices, token
    text, and feature values a client encoded itself, keyed by (pack, hook point).
    """

    seq_no: int
    model: str
    rows: int
    activations: dict[str, torch.Tensor]  # hook point -> [rows, d_model], wire dtype
    slices: list[SequenceSlice]
    tokens: list[Sequence[str]]  # per slice; empty when the client sent no text
    encoded: dict[tuple[str, str], torch.Tensor]  # (pack, hp) -> [rows, k], encoded by the client


def validate_batch(
    batch: pb.StepBatch,
    catalog: EncoderCatalog,
    required: Set[tuple[str, str]],
    limits: Limits,
    scope: str = "",
    scope_attribute: str = "",
    table: ConversationTable | None = None,
    decoded: Sequence[torch.Tensor | None] = (),
) -> ValidatedBatch:
    """Check a batch against the loaded packs and limits; raise BatchRejected on a problem.
    `required` holds the (pack, hook point) pairs the rules read. Conversation state of the
    batch's sequences is scoped by `scope` (the client's identity), or, when
    `scope_attribute` is set, by that attribute of each sequence. A batch in the columnar
    format (`columns`) is read against `table`, the stream's conversation table, which its
    slot definitions update. `decoded` is what `decode_layers` gave for this batch, if it ran
    (the same checks, done before: the result is the same with or without it)."""
    if batch.HasField("columns"):
        # The slot definitions first: whatever else is wrong with the batch, the client has
        # sent them and will not again, so they must reach the table (see ConversationTable).
        slices, tokens = _validate_columns(batch, limits, table, scope, scope_attribute)
        check_model(batch.model, limits)
    else:
        check_model(batch.model, limits)
        check_counts(len(batch.sequences), limits)
        slices, tokens = _validate_sequences(batch, limits, scope, scope_attribute)
    # A columnar batch's slices carry their rows; in C either way (a generator costs a Python
    # step per slice).
    columnar = slices.__class__ is SliceList
    rows = sum(slices.columns.rows if columnar else map(_ROWS, slices))  # type: ignore[attr-defined]
    if rows > limits.max_rows_per_batch:
        raise BatchRejected(
            "too_many_rows",
            "sequences",
            f"sequences: {rows} rows exceed the limit of {limits.max_rows_per_batch} per batch",
        )
    activations = _validate_layers(batch, rows, catalog.d_model_of, decoded) if batch.layers else {}
    encoded = _validate_feature_blocks(batch, rows, catalog) if batch.features else {}
    if not activations and not encoded:
        raise BatchRejected(
            "no_layers", "layers", "layers: the batch has no layers and no feature blocks"
        )
    # The usual batch carries every hook point the rules read: one C-level pass says so.
    if encoded or not all(map(activations.__contains__, map(_HOOK_POINT, required))):
        missing = sorted(
            hp for pack, hp in required if hp not in activations and (pack, hp) not in encoded
        )
    else:
        missing = []
    if missing:
        raise BatchRejected(
            "missing_hook_point",
            "layers",
            f"layers: the loaded rules need hook point(s) {', '.join(missing)}, "
            "which the batch does not carry",
        )
    return ValidatedBatch(batch.seq_no, batch.model, rows, activations, slices, tokens, encoded)


def _validate_columns(
    batch: pb.StepBatch,
    limits: Limits,
    table: ConversationTable | None,
    scope: str,
    scope_attribute: str,
) -> tuple[list[SequenceSlice], list[Sequence[str]]]:
    if batch.sequences:
        raise BatchRejected(
            "mixed_sequence_formats",
            "columns",
            "columns: the batch carries both Sequence messages and columns; send one",
        )
    if table is None:
        raise BatchRejected(
            "unsupported_format", "columns", "columns: not accepted here (no conversation table)"
        )
    columns = batch.columns
    if columns.define:
        table.define(columns.define, limits)
    return table.slices(columns, limits, scope, scope_attribute)


def _validate_sequences(
    batch: pb.StepBatch, limits: Limits, scope: str, scope_attribute: str
) -> tuple[list[SequenceSlice], list[list[str]]]:
    if not batch.sequences:
        raise BatchRejected("no_sequences", "sequences", "sequences: the batch has no sequences")
    slices: list[SequenceSlice] = []
    tokens: list[list[str]] = []
    seen: set[str] = set()
    max_id_length = limits.max_conversation_id_length
    max_request_id, max_role = limits.max_request_id_length, limits.max_role_length
    start = 0
    # A 64-sequence decode step passes through here on every step: each field is read once.
    for i, seq in enumerate(batch.sequences):
        conversation_id, rows, position = seq.conversation_id, seq.rows, seq.position
        texts, request_id, role = seq.tokens, seq.request_id, seq.role
        if (
            not conversation_id
            or len(conversation_id) > max_id_length
            or conversation_id in seen
            or position + rows > MAX_POSITION
            or (texts and len(texts) != rows)
            or len(request_id) > max_request_id
            or len(role) > max_role
        ):
            _reject_sequence(seq, f"sequences[{i}]", seen, limits)  # the slow, precise path
        seen.add(conversation_id)
        # Without attributes: the engine's shared empty default, which it caches on.
        extra: dict[str, object] = {}
        if seq.attributes:
            attributes = dict(seq.attributes)
            check_attributes(attributes, f"sequences[{i}].attributes", limits)
            extra["attributes"] = attributes
        if scope_attribute:
            extra["scope"] = seq.attributes.get(scope_attribute, "")
        elif scope:
            extra["scope"] = scope
        if seq.turn_end:
            extra["turn_end"] = True
        slices.append(
            SequenceSlice(
                conversation_id, start, rows, position, role, seq.end, request_id, **extra
            )
        )
        tokens.append(list(texts) if texts else [])
        start += rows
    return slices, tokens


def _reject_sequence(seq: pb.Sequence, field: str, seen: set[str], limits: Limits) -> None:
    """Raise the BatchRejected that names what is wrong with one sequence."""
    _check_conversation_id(seq.conversation_id, field, limits)
    if seq.conversation_id in seen:
        raise BatchRejected(
            "duplicate_conversation",
            f"{field}.conversation_id",
            f"{field}.conversation_id: {seq.conversation_id!r} appears more than once in the batch",
        )
    for name, value in (("request_id", seq.request_id), ("role", seq.role)):
        check_length(value, f"{field}.{name}", getattr(limits, f"max_{name}_length"))
    if seq.position + seq.rows > MAX_POSITION:
        raise BatchRejected(
            "bad_position",
            f"{field}.position",
            f"{field}.position: {seq.position} + {seq.rows} rows is past the largest "
            f"supported position {MAX_POSITION}",
        )
    raise BatchRejected(
        "bad_tokens",
        f"{field}.tokens",
        f"{field}.tokens: {len(seq.tokens)} token texts for {seq.rows} rows",
    )


def check_counts(sequences: int, limits: Limits) -> None:
    """A batch's sequence count against its limits, before any sequence is looked at.
    Sequences of one batch are distinct conversations, so the count also bounds how many
    conversations one batch can ask the rules engine to hold at once."""
    if sequences > limits.max_sequences_per_batch:
        raise BatchRejected(
            "too_many_sequences",
            "sequences",
            f"sequences: {sequences} sequences exceed the limit of "
            f"{limits.max_sequences_per_batch} per batch",
        )
    if sequences > limits.max_conversations:
        raise BatchRejected(
            "too_many_conversations",
            "sequences",
            f"sequences: {sequences} conversations in one batch exceed max_conversations "
            f"({limits.max_conversations}), the most the sidecar tracks at once",
        )


def check_model(model: str, limits: Limits) -> None:
    """The batch's model name is logged, stored and (bounded in number) a label."""
    check_length(model, "model", limits.max_model_length)


def check_length(value: str, field: str, limit: int) -> None:
    """A client-chosen string that is logged or stored: bounded in characters."""
    if len(value) > limit:
        raise BatchRejected(
            "too_long", field, f"{field}: {len(value)} characters exceed the limit of {limit}"
        )


def check_attributes(attributes: Mapping[str, str], field: str, limits: Limits) -> None:
    """A sequence's attributes: how many, and how long each key and value is."""
    if len(attributes) > limits.max_attributes:
        raise BatchRejected(
            "too_many_attributes",
            field,
            f"{field}: {len(attributes)} attributes exceed the limit of {limits.max_attributes}",
        )
    for key, value in attributes.items():
        if len(key) > limits.max_attribute_key_length:
            raise BatchRejected(
                "too_long",
                field,
                f"{field}: a key of {len(key)} characters exceeds the limit of "
                f"{limits.max_attribute_key_length}",
            )
        check_length(value, f"{field}[{key!r}]", limits.max_attribute_value_length)


def _check_conversation_id(conversation_id: str, field: str, limits: Limits) -> None:
    if not conversation_id:
        raise BatchRejected(
            "bad_conversation_id",
            f"{field}.conversation_id",
            f"{field}.conversation_id: empty",
        )
    if len(conversation_id) > limits.max_conversation_id_length:
        raise BatchRejected(
            "bad_conversation_id",
            f"{field}.conversation_id",
            f"{field}.conversation_id: {len(conversation_id)} characters exceed the limit of "
            f"{limits.max_conversation_id_length}",
        )


def _validate_feature_blocks(
    batch: pb.StepBatch, rows: int, catalog: EncoderCatalog
) -> dict[tuple[str, str], torch.Tensor]:
    encoded: dict[tuple[str, str], torch.Tensor] = {}
    for i, block in enumerate(batch.features):
        field = f"features[{i}]"
        key = (block.pack, block.hook_point)
        known = catalog.columns_of.get(key)
        if known is None:
            raise BatchRejected(
                "unknown_pack",
                f"{field}.pack",
                f"{field}.pack: no loaded pack {block.pack!r} reads {block.hook_point!r}",
            )
        sha, k = known
        if block.pack_sha256 != sha:
            raise BatchRejected(
                "pack_mismatch",
                f"{field}.pack_sha256",
                f"{field}.pack_sha256: the client encoded with another version of pack "
                f"{block.pack!r} ({block.pack_sha256[:12] or 'none'}, sidecar has {sha[:12]})",
            )
        if key in encoded:
            raise BatchRejected(
                "duplicate_hook_point", field, f"{field}: {key} appears more than once"
            )
        values = _checked_tensor(block.values, f"{field}.values", rows, k)
        encoded[key] = values.to(torch.float32)
    return encoded


def decode_layers(batch: pb.StepBatch, widen: bool = False) -> tuple[torch.Tensor | None, ...]:
    """Each layer's activations decoded and checked finite, or None for a layer where either
    fails (validation then finds the problem again and names it). This is the part of
    validation that reads every byte of a batch and depends on the message alone, not on
    packs, rules or stream state: the server runs it as a message arrives, on the event loop,
    while the worker thread encodes the previous batch with the GIL released, instead of on
    the worker, which is the sidecar's bottleneck (see `service._read_into`).

    ``widen``: hand back float32 copies of BF16/FP16 layers, the dtype every CPU encoder
    converts its input to before its matrix multiply (the same values: the conversion is
    exact), so that copy is made here rather than on the worker. Only for packs that encode
    on the CPU: a GPU kernel reads the wire's dtype itself."""
    decoded: list[torch.Tensor | None] = []
    for layer in batch.layers:
        message = layer.activations
        tensor = None
        shape = message.shape
        if len(shape) == 2:  # anything else is rejected before decoding
            try:
                rows, width = shape
                dtype = WIRE_DTYPES.get(message.dtype)
                # Read once: each read of a bytes field hands out a new copy.
                data = message.data
                if (
                    dtype is not None
                    and rows > 0
                    and width > 0
                    and len(data) == rows * width * dtype.itemsize
                ):
                    # The usual message, decoded as `decode_tensor_with_bytes` decodes it
                    # (a view of the bytes) in fewer calls, and only once it is finite: a
                    # decode step passes here as it arrives.
                    if _finite_bits(np.frombuffer(data, _BITS[dtype][0]), dtype):
                        tensor = torch.frombuffer(data, dtype=dtype).view(rows, width)
                        if widen:
                            tensor = tensor.float()
                    decoded.append(tensor)
                    continue
                values, data = decode_tensor_with_bytes(message, "")
                if _bytes_finite(data, values.dtype):
                    tensor = values.float() if widen else values
            except TensorDecodeError:
                pass
            except Exception:
                # A bug, not a bad message: this runs on the event loop, where it would end
                # the whole stream. None lets validation decode again on the worker, whose
                # guard turns a bug into a BatchError for this batch alone.
                tensor = None
        decoded.append(tensor)
    return tuple(decoded)


def _validate_layers(
    batch: pb.StepBatch,
    rows: int,
    d_model_of: Mapping[str, int],
    decoded: Sequence[torch.Tensor | None] = (),
) -> dict[str, torch.Tensor]:
    activations: dict[str, torch.Tensor] = {}
    if len(decoded) != len(batch.layers):
        decoded = (None,) * len(batch.layers)
    for i, layer in enumerate(batch.layers):
        hook_point = layer.hook_point
        known = decoded[i]
        if known is not None and hook_point in d_model_of and hook_point not in activations:
            # Decoded and checked finite already (`decode_layers`): only the shape is left
            # to check, and the field names are only formatted for an error.
            shape = layer.activations.shape
            if len(shape) == 2 and shape[0] == rows and shape[1] == d_model_of[hook_point]:
                activations[hook_point] = known
                continue
        field = f"layers[{i}]"
        if hook_point not in d_model_of:
            raise BatchRejected(
                "unknown_hook_point",
                f"{field}.hook_point",
                f"{field}.hook_point: no loaded pack reads {hook_point!r} "
                f"(packs read: {', '.join(sorted(d_model_of)) or 'none'})",
            )
        if hook_point in activations:
            raise BatchRejected(
                "duplicate_hook_point",
                f"{field}.hook_point",
                f"{field}.hook_point: {hook_point!r} appears more than once in the batch",
            )
        activations[hook_point] = _layer_tensor(
            layer, f"{field}.activations", rows, d_model_of, decoded[i]
        )
    return activations


def _layer_tensor(
    layer: pb.Layer,
    field: str,
    rows: int,
    d_model_of: Mapping[str, int],
    decoded: torch.Tensor | None = None,
) -> torch.Tensor:
    d_model = d_model_of[layer.hook_point]
    return _checked_tensor(layer.activations, field, rows, d_model, layer.hook_point, decoded)


def _checked_tensor(
    message: pb.Tensor,
    field: str,
    rows: int,
    width: int,
    hook_point: str = "",
    decoded: torch.Tensor | None = None,
) -> torch.Tensor:
    """Shape [rows, width], decodable, finite -> a tensor viewing the message bytes. The width
    is the pack's d_model for `hook_point` when given, else the pack's column count.
    `decoded`: this message's tensor from `decode_layers` (decoded and finite already)."""
    shape = message.shape[:]  # a list
    if len(shape) != 2:
        raise BatchRejected(
            "bad_shape", f"{field}.shape", f"{field}.shape: expected [rows, width], got {shape}"
        )
    if shape[1] != width:
        raise BatchRejected(
            "d_model_mismatch",
            f"{field}.shape",
            f"{field}.shape: width {shape[1]} does not match "
            + (f"the pack's {width} for {hook_point!r}" if hook_point else f"pack {width}"),
        )
    if shape[0] != rows:
        raise BatchRejected(
            "row_count_mismatch",
            f"{field}.shape",
            f"{field}.shape: {shape[0]} rows, but the sequences add up to {rows}",
        )
    if decoded is not None:  # the shape checked here is the one it was decoded with
        return decoded
    try:
        # Kept in its wire dtype: the encoder reads BF16/FP16 directly (on GPU, in-kernel).
        tensor, data = decode_tensor_with_bytes(message, field)
    except TensorDecodeError as exc:
        raise BatchRejected(exc.reason, exc.field, exc.message) from exc
    dtype = tensor.dtype
    if not _bytes_finite(data, dtype):
        bad_row = int((~torch.isfinite(tensor)).any(dim=1).nonzero()[0, 0])
        raise BatchRejected(
            "non_finite",
            f"{field}.data",
            f"{field}.data: NaN or Inf in row {bad_row}",
        )
    return tensor


# Per wire dtype: the signed and unsigned integers of its width, and the smallest bit pattern
# of a non-finite value (all exponent bits set) as a positive and as a negative number.
_BITS: dict[torch.dtype, tuple[type[np.signedinteger], type[np.unsignedinteger], int, int]] = {
    torch.bfloat16: (np.int16, np.uint16, 0x7F80, 0xFF80),
    torch.float16: (np.int16, np.uint16, 0x7C00, 0xFC00),
    torch.float32: (np.int32, np.uint32, 0x7F800000, 0xFF800000),
}


def _bytes_finite(data: bytes | memoryview, dtype: torch.dtype) -> bool:
    """No NaN and no ±Inf among the floats of ``dtype`` stored in ``data`` (the wire's bytes;
    the check the sidecar runs on every tensor it receives)."""
    return not data or _finite_bits(np.frombuffer(data, _BITS[dtype][0]), dtype)


def _all_finite(tensor: torch.Tensor) -> bool:
    """``_bytes_finite`` of a tensor of a wire dtype (its bytes, as the wire would carry them)."""
    signed = _BITS[tensor.dtype][0]
    bits = tensor.contiguous().view(torch.int16 if signed is np.int16 else torch.int32)
    return _bytes_finite(bits.numpy().tobytes(), tensor.dtype)


def _finite_bits(bits: np.ndarray, dtype: torch.dtype) -> bool:
    """No NaN and no ±Inf among the floats of ``dtype`` whose bit patterns are ``bits`` (signed
    integers of the same width, at least one). A value is NaN or ±Inf when all its exponent
    bits are set: as a signed integer a positive one is then at least ``0x7F80`` (BF16), and
    as an unsigned integer a negative one is at least ``0xFF80``, while every finite value is
    below both. So two integer maxima decide it, with no temporary array and no float
    compare: several times faster on a CPU than ``isfinite(tensor).all()`` or a float
    min/max, and numpy calls, which cost less than torch ones when the caches are cold (as
    they are right after an encode)."""
    _, unsigned, positive, negative = _BITS[dtype]
    return bool(
        _MAX(bits, axis=None) < positive and _MAX(bits.view(unsigned), axis=None) < negative
    )


# The reduction itself: ``ndarray.max`` goes through a Python wrapper.
_MAX = np.maximum.reduce
