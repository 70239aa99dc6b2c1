"""Ring frames -> StepBatches ready to send on one Monitor stream, without rebuilding the
same message step after step.

A decode loop publishes step after step under one tagging: their TEMPLATED_STEP frames carry
the same serialised StepBatch and differ only in rows, positions and tensor bytes. Parsing
that template, filling it in and rewriting its `Sequence` messages as columns
(`ColumnarEncoder.encode`) took the relay about 90 us per step on this project's 2-vCPU VM
(more inside the running relay, its caches cold after every sleep). So the first frame of a
template is read and encoded in full, and its encoded message, less what changes per step,
is kept: later frames of that template copy it and add their rows, positions and tensor
bytes, while the encoder's table is unchanged since (`ColumnarEncoder.version`). Anything
else (a frame with token text, an end of conversation, an older sidecar's `Sequence`
format, a table that changed) takes the full path, so what goes on the wire is the same
message either way (tests/unit/test_relay_reader.py compares them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from monitor.capture.channel.frames import (
    fill_tensors,
    frame_meta,
    read_step,
    split_template,
    tensor_messages,
)
from monitor.capture.channel.ring import Frame, FrameKind, SharedRing
from monitor.capture.relay.encode import RelayFeatureEncoder
from monitor.wire import pb
from monitor.wire.columns import ColumnarEncoder

# Templates kept per stream: a serving process alternates between a few taggings (a decode
# batch, a prefill joining it); a key is one template's bytes (about 100 per sequence).
TEMPLATES = 32
_TEMPLATED = FrameKind.TEMPLATED_STEP


@dataclass(slots=True)
class _Encoded:
    """A template's encoded StepBatch, with no rows, positions, tensor bytes, slot
    definitions, seq_no or timestamp, and the encoder version it is valid at."""

    batch: pb.StepBatch
    conversation_ids: tuple[str, ...]
    version: int
    features: bool  # whether it has feature blocks (most have none: one lookup fewer)


class StepReader:
    """Reads frames for one stream: `read(ring, frame)` returns the StepBatch (model name set,
    columnar when `encoder` is given) and sets `rows` to its rows; ValueError on a malformed
    frame. The encoder is the stream's: every batch the stream sends must pass through it.
    `features` (local encoding in the relay) turns the covered activations into feature
    values in the batch it returns; what it keeps for reuse stays as the frames hold it."""

    def __init__(
        self,
        model_name: str,
        encoder: ColumnarEncoder | None,
        features: RelayFeatureEncoder | None = None,
    ) -> None:
        self.model_name = model_name
        self.encoder = encoder
        self.features = features
        self.rows = 0
        self.reused = 0  # frames read from a kept encoding (tests, benches)
        self._kept: dict[bytes, _Encoded] = {}

    def read(self, ring: SharedRing, frame: Frame) -> pb.StepBatch:
        """The frame as the StepBatch to send (see the class)."""
        batch = self._read(ring, frame)
        if self.features is not None:
            self.features.apply(batch)
        return batch

    def _read(self, ring: SharedRing, frame: Frame) -> pb.StepBatch:
        encoder = self.encoder
        if encoder is None or frame.kind != _TEMPLATED:
            return self._read_in_full(ring, frame, None)
        template, counts = split_template(frame_meta(ring, frame))
        key = template.tobytes()
        kept = self._kept.get(key)
        if kept is None or kept.version != encoder.version:
            return self._read_in_full(ring, frame, key)
        ids = kept.conversation_ids
        sequences = len(ids)
        rows = counts[:sequences]
        if len(counts) != 2 * sequences:
            raise ValueError("templated frame: the rows and positions do not fit the metadata")
        if sum(rows) != frame.rows:
            raise ValueError("templated frame: the sequences' rows do not add up to the frame's")
        batch = pb.StepBatch()
        batch.CopyFrom(kept.batch)
        columns = batch.columns
        columns.rows.extend(rows)
        columns.position.extend(counts[sequences:])
        # Upb builds a wrapper object per access: the tensors are looked up once.
        messages = [layer.activations for layer in batch.layers]
        if kept.features:
            messages += [block.values for block in batch.features]
        for message in messages:
            message.shape[0] = frame.rows
        fill_tensors(ring, frame, messages)
        encoder.touch(ids)  # last: a frame found bad above leaves the table as it was
        self.rows = frame.rows
        self.reused += 1
        return batch

    def _read_in_full(self, ring: SharedRing, frame: Frame, key: bytes | None) -> pb.StepBatch:
        """Parse, fill in and encode; keep the encoding under `key` when a later frame of
        the same template may reuse it."""
        batch = read_step(ring, frame)
        batch.model = self.model_name
        sequences = batch.sequences
        self.rows = sum(sequence.rows for sequence in sequences)
        encoder = self.encoder
        if encoder is None:
            return batch
        ids = tuple(sequence.conversation_id for sequence in sequences)
        # A conversation's end frees its slot: the same frame again would define it anew.
        ends = any(sequence.end for sequence in sequences)
        encoder.encode(batch)
        if key is not None and not ends and batch.HasField("columns") and ids:
            self._keep(key, batch, ids, encoder.version)
        return batch

    def _keep(self, key: bytes, batch: pb.StepBatch, ids: tuple[str, ...], version: int) -> None:
        kept = pb.StepBatch()
        kept.CopyFrom(batch)
        columns = kept.columns
        for name in ("define", "rows", "position"):
            columns.ClearField(name)
        for message in tensor_messages(kept):
            message.ClearField("data")
        if key not in self._kept and len(self._kept) >= TEMPLATES:
            del self._kept[next(iter(self._kept))]  # the oldest
        self._kept[key] = _Encoded(kept, ids, version, len(kept.features) > 0)


# How `FrameSource.next` turns a frame into a StepBatch (`read_step`, or `StepReader.read`).
Reader = Callable[[SharedRing, Frame], pb.StepBatch]
