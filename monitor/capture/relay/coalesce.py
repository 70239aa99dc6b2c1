"""Several captured steps as one StepBatch: the relay's linger (`SenderSettings.linger_ms`).

Most of what the relay and the sidecar spend per step is spent per message (wake-ups, the
gRPC send and its ack, protobuf, one rules call), not per row. With a linger the relay keeps
taking the frames published within that time after the first and sends them as one message.

Merging relies on the sidecar's chunking invariance (tested in tests/unit/test_rules_engine.py,
test_rules_language.py and test_sidecar_grouping.py): a conversation's events
are the same however its tokens are split into slices. So, per conversation, consecutive
slices become one slice: the rows of every layer gathered in the new order, positions
contiguous, token text concatenated, request id, role and attributes unchanged, `turn_end` and
`end` taken from the last slice. A step joins the steps gathered so far only when that holds
for each of its conversations and it has the same layers (hook points, dtypes, columns), no
feature blocks and token text on all rows or none, as they have; otherwise they are sent first
(`Coalescer.add` says so). A conversation is never twice in one batch (the wire forbids it).

What a merge must not change, the Coalescer keeps apart:
- The sidecar rejects a message as a whole, so one bad step would take the steps merged with it
  down too. A step with a NaN or an infinity (which the sidecar rejects as `non_finite`) is
  sent alone; the relay builds the Coalescer under the limits the sidecar advertises (rows,
  sequences, bytes per batch: `Sender._negotiate`). Any other reject of a merged message still
  loses every step it holds.
- Nothing joins a message after a step that ends a conversation, as the sidecar's own grouping
  does: at its conversation capacity the steps merged across an end could evict another
  conversation than the steps one at a time.
- The events are those of the steps one at a time up to the limit of chunking invariance:
  float64 window sums may differ in the last bit between the decode path and the prefill path
  once values span more than ~2**29 (monitor/rules/engine.py).

Works on StepBatches in the `Sequence` format, as `frames.read_step` gives them; the stream's
columnar encoder runs on the merged batch. Imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from monitor.wire import pb

ITEMSIZE = {"BF16": 2, "FP16": 2, "FP32": 4}

# Bounds of one merged message, below the sidecar's default limits (16,384 rows and 1,024
# sequences per batch) so a merged message is never refused where its steps were not.
MAX_FRAMES = 64
MAX_ROWS = 4096
MAX_SEQUENCES = 512


@dataclass(slots=True)
class _Slice:
    """One conversation's rows in one step: which step, where its rows start there."""

    step: int
    start: int
    rows: int


@dataclass(slots=True)
class _Conversation:
    """A conversation of the steps gathered so far: its first sequence, its slices, and what
    its last slice ends with."""

    first: pb.Sequence
    slices: list[_Slice] = field(default_factory=list)
    next_position: int = 0
    closed: bool = False  # its last slice ended a turn or the conversation
    tokens: list[str] = field(default_factory=list)
    end: bool = False
    turn_end: bool = False


def _layout(batch: pb.StepBatch) -> tuple[tuple[str, str, int], ...] | None:
    """What a step must share with the others to be merged: its layers' hook points, dtypes
    and columns; None when it cannot be merged at all (feature blocks, a tensor that is not
    [rows, columns] of a known dtype, a conversation twice, text on some rows only)."""
    if len(batch.features) or not len(batch.layers):
        return None
    sequences = batch.sequences
    rows = sum(sequence.rows for sequence in sequences)
    layout = []
    for layer in batch.layers:
        tensor = layer.activations
        if len(tensor.shape) != 2 or tensor.shape[0] != rows or tensor.dtype not in ITEMSIZE:
            return None
        if len(tensor.data) != rows * tensor.shape[1] * ITEMSIZE[tensor.dtype]:
            return None
        layout.append((layer.hook_point, tensor.dtype, int(tensor.shape[1])))
    ids = {sequence.conversation_id for sequence in sequences}
    if len(ids) != len(sequences):
        return None  # sent as it is: the sidecar rejects it, as without a linger
    texts = [len(sequence.tokens) for sequence in sequences]
    if any(texts) and any(t != s.rows for t, s in zip(texts, sequences, strict=True)):
        return None
    if not all(_finite(layer.activations.data, layer.activations.dtype) for layer in batch.layers):
        return None  # sent alone: the sidecar rejects it, and it alone, as without a linger
    return tuple(layout)


# High bytes (little-endian) of the FP16 values whose exponent bits are all set (NaN, +-Inf):
# deleting every other byte leaves nothing when all values are finite.
_FP16_FINITE_HIGH = bytes(b for b in range(256) if b & 0x7C != 0x7C)
# BF16 and FP32: the high byte holds the sign and the exponent's top 7 bits; only 0x7F and 0xFF
# can start a non-finite value (then the next byte's top bit decides).
_NOT_TOP_HIGH = bytes(b for b in range(256) if b & 0x7F != 0x7F)


def _finite(data: bytes, dtype: str) -> bool:
    """No NaN and no +-Inf among the little-endian floats of `dtype` in `data`, with byte
    slicing and `translate` only (the relay loads no numpy; a value that large is rare, so the
    exact check of a candidate is a Python loop that almost never runs)."""
    width = ITEMSIZE[dtype]
    high = data[width - 1 :: width]
    if dtype == "FP16":
        return not high.translate(None, _FP16_FINITE_HIGH)
    if not high.translate(None, _NOT_TOP_HIGH):
        return True
    low = data[width - 2 :: width]
    return not any(h & 0x7F == 0x7F and low[i] & 0x80 for i, h in enumerate(high))


def _attributes(sequence: pb.Sequence) -> list[tuple[str, str]]:
    return sorted(sequence.attributes.items())


class Coalescer:
    """Gathers steps (Sequence-format StepBatches with their tensor bytes) into one.

        merged = Coalescer()
        merged.add(first)           # always True for the first step
        merged.add(step)            # False: send `merged.take()` first, then start again
        batch, steps = merged.take()

    `max_bytes` bounds the merged tensor bytes (a step alone may exceed it)."""

    def __init__(
        self,
        max_frames: int = MAX_FRAMES,
        max_rows: int = MAX_ROWS,
        max_bytes: int = 32 << 20,
        max_sequences: int = MAX_SEQUENCES,
    ) -> None:
        self.max_frames = max_frames
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.max_sequences = max_sequences
        self._reset()

    def _reset(self) -> None:
        self.frames = 0
        self._steps: list[pb.StepBatch] = []
        self._layout: tuple[tuple[str, str, int], ...] | None = None
        self._text = False
        self._conversations: dict[str, _Conversation] = {}
        self._rows = 0
        self._bytes = 0
        self._ended = False  # a step gathered ends a conversation: nothing more joins

    @property
    def full(self) -> bool:
        """No further step can join (frame count reached, a conversation ended, or the first
        cannot be merged)."""
        return (
            self.frames >= self.max_frames
            or self._ended
            or (self.frames > 0 and self._layout is None)
        )

    def add(self, batch: pb.StepBatch) -> bool:
        """Take a step; False (nothing taken) if it cannot join the steps gathered so far."""
        if not self._steps:
            self._start(batch)
            return True
        if self.full:
            return False
        layout = _layout(batch)
        if layout is None or layout != self._layout:
            return False
        sequences = batch.sequences
        text = any(len(sequence.tokens) for sequence in sequences)
        if text != self._text:
            return False
        rows = sum(sequence.rows for sequence in sequences)
        size = sum(len(layer.activations.data) for layer in batch.layers)
        if self._rows + rows > self.max_rows or self._bytes + size > self.max_bytes:
            return False
        conversations = self._conversations
        new = 0
        for sequence in sequences:
            held = conversations.get(sequence.conversation_id)
            if held is None:
                new += 1
                continue
            first = held.first
            if (
                held.closed
                or sequence.position != held.next_position
                or sequence.request_id != first.request_id
                or sequence.role != first.role
                or _attributes(sequence) != _attributes(first)
            ):
                return False
        if len(conversations) + new > self.max_sequences:
            return False
        self._append(batch, rows, size)
        return True

    def _start(self, batch: pb.StepBatch) -> None:
        self._layout = _layout(batch)
        self._text = any(len(sequence.tokens) for sequence in batch.sequences)
        rows = sum(sequence.rows for sequence in batch.sequences)
        self._append(batch, rows, sum(len(layer.activations.data) for layer in batch.layers))

    def _append(self, batch: pb.StepBatch, rows: int, size: int) -> None:
        step = len(self._steps)
        self._steps.append(batch)
        self.frames += 1
        self._rows += rows
        self._bytes += size
        start = 0
        conversations = self._conversations
        for sequence in batch.sequences:
            held = conversations.get(sequence.conversation_id)
            if held is None:
                held = conversations[sequence.conversation_id] = _Conversation(sequence)
            held.slices.append(_Slice(step, start, sequence.rows))
            held.next_position = sequence.position + sequence.rows
            held.tokens.extend(sequence.tokens)
            held.end, held.turn_end = sequence.end, sequence.turn_end
            held.closed = sequence.end or sequence.turn_end
            self._ended = self._ended or sequence.end
            start += sequence.rows

    def take(self) -> tuple[pb.StepBatch, int]:
        """The merged StepBatch and how many steps it holds; the coalescer starts empty again.
        A single step comes back as it was."""
        steps, frames = self._steps, self.frames
        if not steps:
            raise ValueError("nothing gathered")
        try:
            if frames == 1:
                return steps[0], 1
            return self._merge(), frames
        finally:
            self._reset()

    def _merge(self) -> pb.StepBatch:
        steps = self._steps
        first = steps[0]
        merged = pb.StepBatch(model=first.model)
        conversations = list(self._conversations.values())
        for index, layer in enumerate(first.layers):
            tensor = layer.activations
            row_bytes = int(tensor.shape[1]) * ITEMSIZE[tensor.dtype]
            data = [step.layers[index].activations.data for step in steps]
            parts = [
                data[s.step][s.start * row_bytes : (s.start + s.rows) * row_bytes]
                for held in conversations
                for s in held.slices
            ]
            merged.layers.append(
                pb.Layer(
                    hook_point=layer.hook_point,
                    activations=pb.Tensor(
                        dtype=tensor.dtype,
                        shape=(self._rows, tensor.shape[1]),
                        data=b"".join(parts),
                    ),
                )
            )
        for held in conversations:
            sequence = pb.Sequence()
            sequence.CopyFrom(held.first)
            sequence.rows = sum(s.rows for s in held.slices)
            del sequence.tokens[:]
            sequence.tokens.extend(held.tokens)
            sequence.end, sequence.turn_end = held.end, held.turn_end
            merged.sequences.append(sequence)
        return merged
