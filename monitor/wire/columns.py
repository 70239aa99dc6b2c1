"""The columnar sequence format, the client's half: a StepBatch's `Sequence` messages rewritten
as `SequenceColumns` against a stream's conversation table.

A decode step of a batched server repeats the same conversation ids, request ids, roles and
attributes step after step; only rows, positions and end (and turn-end) flags change. In the
columnar format those strings travel once per stream, as slot definitions, and each step is a
few packed integer arrays, which the sidecar reads without building a protobuf object per
sequence.

The table lives as long as one Monitor stream: a new stream (a reconnect) starts with an
empty one on both sides, so the client makes a new `ColumnarEncoder` per stream. Imports no
torch (the capture relay uses it).

    encoder = ColumnarEncoder(status.conversation_slots)   # when "columns" is offered
    batch = encoder.encode(batch)                          # per StepBatch, in stream order
"""

from __future__ import annotations

from collections import OrderedDict

from monitor.limits import MAX_CONVERSATION_SLOTS
from monitor.wire.safety_monitor.v1 import monitor_pb2 as pb

SEQUENCES, COLUMNS = "sequences", "columns"
SEQUENCE_FORMATS = (SEQUENCES, COLUMNS)


def offers_columns(status: pb.StatusResponse) -> bool:
    """Whether a sidecar's GetStatus answer says it reads the columnar format. Older sidecars
    leave `sequence_formats` empty: they read only `Sequence` messages."""
    return COLUMNS in status.sequence_formats and status.conversation_slots > 0


class ColumnarEncoder:
    """One stream's conversation table on the client's side. Each conversation id holds one
    slot while it is in use; a slot is defined again when the conversation's request id, role
    or attributes change, freed when the conversation ends, and the least recently used one
    is reused when all are taken.

    ``slots`` is what the sidecar reported; at most ``MAX_CONVERSATION_SLOTS`` are used (the
    table is a list of that size, and the count comes from the other side of the wire)."""

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError("a conversation table needs at least one slot")
        self.slots = min(slots, MAX_CONVERSATION_SLOTS)
        # conversation id -> (slot, (request id, role, attributes)); least recently used first
        self._held: OrderedDict[str, tuple[int, tuple[str, str, tuple[tuple[str, str], ...]]]]
        self._held = OrderedDict()
        self._free = list(range(self.slots - 1, -1, -1))  # popped from the end: slot 0 first
        # Bumped whenever a slot is defined or freed: while it stays the same, a batch of the
        # same sequences encodes to the same columns (see `touch`).
        self.version = 0

    def encode(self, batch: pb.StepBatch) -> pb.StepBatch:
        """`batch` with its `sequences` moved into `columns` (in place; returned for
        convenience). A batch with more sequences than the table has slots, a conversation
        id twice (which the sidecar rejects in either format) or token text on some
        sequences only keeps its `Sequence` messages: a sidecar reads both on any stream."""
        sequences = batch.sequences
        if not sequences or len(sequences) > self.slots:
            return batch
        ids = [sequence.conversation_id for sequence in sequences]
        if len(set(ids)) != len(ids):
            return batch
        # Token text is one flat list in the columnar format: all rows have text or none do.
        # Anything else (including a wrong count, which the sidecar locates) stays as it is.
        texts = sum(len(sequence.tokens) for sequence in sequences)
        if texts and any(len(sequence.tokens) != sequence.rows for sequence in sequences):
            return batch
        columns = pb.SequenceColumns()
        held, define = self._held, columns.define
        slots, ends, turn_ends, tokens = [], [], [], []
        # Conversations of this batch are made most recent first, so a slot reused below is
        # never one this batch needs.
        for conversation_id in ids:
            if conversation_id in held:
                held.move_to_end(conversation_id)
        for sequence in sequences:
            conversation_id = sequence.conversation_id
            key = (
                sequence.request_id,
                sequence.role,
                tuple(sorted(sequence.attributes.items())),
            )
            entry = held.get(conversation_id)
            if entry is None or entry[1] != key:
                slot = entry[0] if entry is not None else self._take_slot()
                define.append(
                    pb.ConversationSlot(
                        slot=slot,
                        conversation_id=conversation_id,
                        request_id=sequence.request_id,
                        role=sequence.role,
                        attributes=sequence.attributes,
                    )
                )
                held[conversation_id] = (slot, key)
                self.version += 1
            else:
                slot = entry[0]
            slots.append(slot)
            ends.append(sequence.end)
            turn_ends.append(sequence.turn_end)
            tokens.extend(sequence.tokens)
        columns.slot.extend(slots)
        columns.rows.extend([sequence.rows for sequence in sequences])
        columns.position.extend([sequence.position for sequence in sequences])
        if any(ends):
            columns.end.extend(ends)
            for conversation_id, end in zip(ids, ends, strict=True):
                if end:  # its state ends with this batch: the slot may serve another
                    self._free.append(held.pop(conversation_id)[0])
                    self.version += 1
        if any(turn_ends):  # else empty, as `end`: no turn ends in this batch
            columns.turn_end.extend(turn_ends)
        columns.tokens.extend(tokens)
        batch.ClearField("sequences")
        batch.columns.CopyFrom(columns)
        return batch

    def touch(self, conversation_ids: tuple[str, ...]) -> None:
        """What `encode` does to the table for a batch of these conversations, all held with
        the same request id, role and attributes and none ending (a batch encoded at the same
        `version`): makes them the most recently used, in order. Encoding such a batch again
        would give the same slots and no definitions, so a caller that kept that encoding
        (the capture relay) reuses it with `touch` instead."""
        held = self._held
        for conversation_id in conversation_ids:
            held.move_to_end(conversation_id)

    def _take_slot(self) -> int:
        if self._free:
            return self._free.pop()
        _, (slot, _) = self._held.popitem(last=False)  # the least recently used
        return slot
