"""The columnar sequence format (`StepBatch.columns`), the sidecar's half: a stream's
conversation table, and a batch's packed arrays checked and turned into SequenceSlices.

The client's half is `monitor.wire.columns`. The same limits apply as to `Sequence` messages
(conversation id length, positions, token text counts, rows per batch), and every problem is
a BatchRejected naming the field, e.g. `columns.slot[3]` or `columns.define[0].conversation_id`.
Reading the arrays costs no protobuf object per sequence: that is the point of the format.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from itertools import accumulate
from typing import NamedTuple

from monitor.rules import SequenceSlice, SliceColumns, SliceList
from monitor.rules.engine import SLICE_FIELDS  # noqa: F401  # re-exported: its test reads it here
from monitor.sidecar.config import Limits
from monitor.sidecar.validate import (
    MAX_POSITION,
    BatchRejected,
    _check_conversation_id,
    check_attributes,
    check_length,
)
from monitor.wire import pb

_NO_ATTRIBUTES: Mapping[str, str] = SequenceSlice._field_defaults["attributes"]
_NO_TOKENS: tuple[str, ...] = ()


@functools.lru_cache(maxsize=64)
def _starts(count: int) -> list[int]:
    """``[0, 1, ..., count - 1]``, shared: the first rows of a decode step's slices (read
    only, as the engine reads them)."""
    return list(range(count))


class _Slot(NamedTuple):
    conversation_id: str
    role: str
    request_id: str
    attributes: Mapping[str, str]


class ConversationTable:
    """One stream's conversation slots (or one Evaluate call's). A batch's definitions are
    applied before its arrays are read, and they stay applied even when the rest of the batch
    is rejected (the client has sent them; it will not again). A definition that is refused
    empties its slot instead: the client now holds that slot for another conversation, so the
    slot must not go on naming the one it held before (its steps would be charged to that
    conversation, past the limits the definition failed). A conversation id lives in one slot
    at a time: defining it elsewhere empties its old slot."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._slots: list[_Slot | None] = [None] * size
        self._slot_of: dict[str, int] = {}
        # The last batch's slots, read: decode steps of a stream name the same slots step
        # after step, and while no definition changes them they read the same.
        self._last: tuple[list[int], str, str, tuple] | None = None

    def __len__(self) -> int:
        """Slots currently defined."""
        return len(self._slot_of)

    def define(self, definitions: list[pb.ConversationSlot], limits: Limits) -> None:
        """Apply the definitions in order; each refused one empties its slot. Raises
        BatchRejected naming the first refused definition, after the others are applied."""
        if len(definitions) > limits.max_sequences_per_batch:
            for definition in definitions:  # bounded by the message's size, as parsing was
                self._empty(definition.slot)
            raise BatchRejected(
                "too_many_sequences",
                "columns.define",
                f"columns.define: {len(definitions)} definitions exceed the limit of "
                f"{limits.max_sequences_per_batch} per batch",
            )
        self._last = None
        first: BatchRejected | None = None
        slots_seen: set[int] = set()
        ids_seen: set[str] = set()
        for i, definition in enumerate(definitions):
            try:
                entry = self._checked(definition, f"columns.define[{i}]", limits, slots_seen)
                if entry.conversation_id in ids_seen:
                    raise BatchRejected(
                        "duplicate_conversation",
                        f"columns.define[{i}].conversation_id",
                        f"columns.define[{i}].conversation_id: {entry.conversation_id!r} is "
                        "defined twice",
                    )
            except BatchRejected as rejected:
                first = first or rejected
                self._empty(definition.slot)
                slots_seen.add(definition.slot)
                continue
            slots_seen.add(definition.slot)
            ids_seen.add(entry.conversation_id)
            self._empty(definition.slot)
            moved_from = self._slot_of.get(entry.conversation_id)
            if moved_from is not None:
                self._slots[moved_from] = None
            self._slots[definition.slot] = entry
            self._slot_of[entry.conversation_id] = definition.slot
        if first is not None:
            raise first

    def _checked(
        self, definition: pb.ConversationSlot, field: str, limits: Limits, slots_seen: set[int]
    ) -> _Slot:
        slot, conversation_id = definition.slot, definition.conversation_id
        if slot >= self.size:
            raise BatchRejected(
                "bad_slot",
                f"{field}.slot",
                f"{field}.slot: {slot} is past the table's {self.size} slots",
            )
        if slot in slots_seen:
            raise BatchRejected(
                "bad_slot", f"{field}.slot", f"{field}.slot: {slot} is defined twice"
            )
        _check_conversation_id(conversation_id, field, limits)
        check_length(definition.request_id, f"{field}.request_id", limits.max_request_id_length)
        check_length(definition.role, f"{field}.role", limits.max_role_length)
        if definition.attributes:
            check_attributes(definition.attributes, f"{field}.attributes", limits)
        attributes = dict(definition.attributes) if definition.attributes else _NO_ATTRIBUTES
        return _Slot(conversation_id, definition.role, definition.request_id, attributes)

    def _empty(self, slot: int) -> None:
        self._last = None
        if slot >= self.size:
            return
        old = self._slots[slot]
        if old is not None and self._slot_of.get(old.conversation_id) == slot:
            del self._slot_of[old.conversation_id]
        self._slots[slot] = None

    def slices(
        self,
        columns: pb.SequenceColumns,
        limits: Limits,
        scope: str = "",
        scope_attribute: str = "",
    ) -> tuple[list[SequenceSlice], list[Sequence[str]]]:
        """The batch's sequences from its arrays: what `Sequence` messages would have given,
        scoped by `scope` or, when set, by each conversation's `scope_attribute`. Raises
        BatchRejected (located) on a problem."""
        # A slice of a repeated field is a list, made in about half the time list() takes.
        slot_ids = columns.slot[:]
        count = len(slot_ids)
        if not count:
            raise BatchRejected("no_sequences", "columns.slot", "columns.slot: no sequences")
        if count > limits.max_sequences_per_batch:
            raise BatchRejected(
                "too_many_sequences",
                "columns.slot",
                f"columns.slot: {count} sequences exceed the limit of "
                f"{limits.max_sequences_per_batch} per batch",
            )
        if count > limits.max_conversations:
            raise BatchRejected(
                "too_many_conversations",
                "columns.slot",
                f"columns.slot: {count} conversations in one batch exceed max_conversations "
                f"({limits.max_conversations}), the most the sidecar tracks at once",
            )
        rows, positions, ends = columns.rows[:], columns.position[:], columns.end[:]
        turn_ends = columns.turn_end[:]
        if (
            len(rows) != count
            or len(positions) != count
            or (ends and len(ends) != count)
            or (turn_ends and len(turn_ends) != count)
        ):
            for name, values, allow_empty in (
                ("rows", rows, False),
                ("position", positions, False),
                ("end", ends, True),
                ("turn_end", turn_ends, True),
            ):
                if len(values) != count and not (allow_empty and not values):
                    raise BatchRejected(
                        "bad_columns",
                        f"columns.{name}",
                        f"columns.{name}: {len(values)} entries for {count} sequences"
                        + (" (or none)" if allow_empty else ""),
                    )
        last = self._last
        if (
            last is not None
            and last[0] == slot_ids
            and last[1] == scope
            and last[2] == scope_attribute
        ):
            read = last[3]  # the same slots as the previous batch, nothing redefined since
        else:
            read = self._read(slot_ids, scope, scope_attribute)
            self._last = (slot_ids, scope, scope_attribute, read)
        ids, roles, request_ids, attributes, scopes, keys = read
        # max + max bounds every sum: the exact check runs only when that bound is exceeded.
        if max(positions) + max(rows) > MAX_POSITION:
            for i, (position, n) in enumerate(zip(positions, rows, strict=True)):
                if position + n > MAX_POSITION:
                    raise BatchRejected(
                        "bad_position",
                        f"columns.position[{i}]",
                        f"columns.position[{i}]: {position} + {n} rows is past the largest "
                        f"supported position {MAX_POSITION}",
                    )
        texts = columns.tokens
        if texts and len(texts) != sum(rows):
            raise BatchRejected(
                "bad_tokens",
                "columns.tokens",
                f"columns.tokens: {len(texts)} token texts for {sum(rows)} rows",
            )
        if not ends:
            ends = [False] * count
        if rows.count(1) == count:  # a decode step: a row each, starts 0, 1, ...
            starts = _starts(count)
        else:
            starts = list(accumulate(rows, initial=0))
            starts.pop()  # one more than there are sequences
        # The engine reads the columns; the slices are made only if something reads them.
        # The lists read from the table (keys, request ids) are shared with the previous
        # steps': nothing changes them.
        columns_read = SliceColumns(
            starts, rows, positions, keys, request_ids, ends, True, turn_ends
        )
        slices = SliceList(columns_read, ids, roles, attributes, scopes)
        if texts:
            texts = texts[:]  # a list
            tokens: list[Sequence[str]] = [
                texts[start : start + n] for start, n in zip(starts, rows, strict=True)
            ]
        else:
            tokens = [_NO_TOKENS] * count  # read only: one shared empty tuple
        return slices, tokens

    def _read(self, slot_ids: list[int], scope: str, scope_attribute: str) -> tuple:
        """The batch's slots, checked, as columns: ids, roles, request ids, attributes and
        scopes. Raises BatchRejected (located) on a problem."""
        count = len(slot_ids)
        if max(slot_ids) >= self.size:
            i = next(i for i, s in enumerate(slot_ids) if s >= self.size)
            raise BatchRejected(
                "bad_slot",
                f"columns.slot[{i}]",
                f"columns.slot[{i}]: {slot_ids[i]} is past the table's {self.size} slots",
            )
        table = self._slots
        entries = [table[s] for s in slot_ids]
        if None in entries:
            i = entries.index(None)
            raise BatchRejected(
                "unknown_slot",
                f"columns.slot[{i}]",
                f"columns.slot[{i}]: slot {slot_ids[i]} holds no conversation on this stream",
            )
        if len(set(slot_ids)) != count:
            first: dict[int, int] = {}
            for i, slot in enumerate(slot_ids):
                if first.setdefault(slot, i) != i:
                    raise BatchRejected(
                        "duplicate_conversation",
                        f"columns.slot[{i}]",
                        f"columns.slot[{i}]: {entries[i].conversation_id!r} appears more "  # type: ignore[union-attr]
                        "than once in the batch",
                    )
        # All in C: the slot entries transposed.
        ids, roles, request_ids, attributes = zip(*entries, strict=True)  # type: ignore[misc]
        if scope_attribute:
            scopes: Sequence[str] = [a.get(scope_attribute, "") for a in attributes]
        else:
            scopes = (scope,) * count
        # The engine's state keys (``state_key``): the id alone where there is no scope.
        keys = [(s, i) if s else i for s, i in zip(scopes, ids, strict=True)]
        return ids, roles, list(request_ids), attributes, scopes, keys
