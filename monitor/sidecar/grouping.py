"""Steps of one stream that wait together, evaluated as one.

Under load, decode steps of the same conversations queue up behind the one being processed.
The rules engine costs mostly per rule per call, not per row, and its results do not depend
on how a conversation's tokens are chunked (a prefill and the same tokens as decode steps
fire the same way). So consecutive steps in which every conversation continues exactly
where it left off are merged into one batch, each conversation's rows side by side, encoded
and evaluated once; each firing is handed back to the step its token came from. Under light
load a group is a single step and nothing changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from monitor.rules import Firing, SequenceSlice
from monitor.sidecar.validate import ValidatedBatch

# Batches of one stream held at once: those being processed and those read ahead. Bounded
# in count here and in bytes by `limits.max_stream_bytes` (see streams.py), so a client
# faster than the sidecar is held back by gRPC flow control rather than by our memory.
READ_AHEAD = 16
# At most this many waiting batches are processed as one group: half the read-ahead, so the
# next ones are still read while a full group is processed.
MAX_GROUP = 8


@dataclass(frozen=True)
class _Part:
    """Where one member's slice of a conversation lies: its positions and its first row."""

    first_position: int
    end_position: int
    member: int
    start_row: int  # in the member


@dataclass
class StepGroup:
    """Member steps, in stream order, and the one batch they are evaluated as."""

    members: list[ValidatedBatch]
    merged: ValidatedBatch
    parts: dict[str, list[_Part]]  # conversation id -> its parts, in order

    def split(self, firings: Sequence[Firing]) -> list[list[Firing]]:
        """Firings per member, in the order the member alone would have produced them (by
        its row, then rule order, which the merged order already has within a row)."""
        if len(self.members) == 1:
            return [list(firings)]
        keyed: list[list[tuple[int, Firing]]] = [[] for _ in self.members]
        for firing in firings:
            for part in self.parts[firing.conversation_id]:
                if part.first_position <= firing.position < part.end_position:
                    row = part.start_row + firing.position - part.first_position
                    keyed[part.member].append((row, firing))
                    break
        return [[f for _, f in sorted(pairs, key=lambda pair: pair[0])] for pairs in keyed]


def can_join(
    members: Sequence[ValidatedBatch], step: ValidatedBatch, max_rows: int, room: int
) -> bool:
    """Whether `step` can be evaluated together with the steps before it: every conversation
    it shares with them continues at the next position with the same request, role,
    attributes and token-text presence (anything else, a gap or a new request, resets rule
    state at a boundary the merged batch would not have), none of them has ended, and the
    group's conversations fit in `room` (what the engine can track without evicting: one
    wave would evict in another order than the steps one at a time)."""
    first = members[0]
    if step.encoded or first.encoded or step.model != first.model:
        return False
    if step.activations.keys() != first.activations.keys() or any(
        step.activations[hp].dtype != tensor.dtype for hp, tensor in first.activations.items()
    ):
        return False
    if sum(m.rows for m in members) + step.rows > max_rows:
        return False
    conversations = {sl.conversation_id for m in (*members, step) for sl in m.slices}
    if len(conversations) > room:
        return False
    last: dict[str, tuple[SequenceSlice, bool]] = {}
    for member in members:
        for sl, text in zip(member.slices, member.tokens, strict=True):
            if sl.end:
                return False
            last[sl.conversation_id] = (sl, bool(text))
    for sl, text in zip(step.slices, step.tokens, strict=True):
        before = last.get(sl.conversation_id)
        if before is None:
            continue
        previous, had_text = before
        if (
            sl.position != previous.position + previous.rows
            or sl.request_id != previous.request_id
            or sl.role != previous.role
            or sl.attributes != previous.attributes
            or bool(text) != had_text
        ):
            return False
    return True


def merge_steps(members: list[ValidatedBatch]) -> StepGroup:
    """One batch of the members' rows, each conversation's rows contiguous and in order."""
    if len(members) == 1:  # the light-load case: the step itself
        return StepGroup(members, members[0], {})
    by_conversation: dict[str, list[tuple[int, SequenceSlice, list[str]]]] = {}
    for index, member in enumerate(members):
        for sl, text in zip(member.slices, member.tokens, strict=True):
            by_conversation.setdefault(sl.conversation_id, []).append((index, sl, text))
    offsets = [0]
    for member in members[:-1]:
        offsets.append(offsets[-1] + member.rows)
    slices, tokens, order = [], [], []
    parts: dict[str, list[_Part]] = {}
    start = 0
    for conversation_id, pieces in by_conversation.items():
        first, rows = pieces[0][1], sum(sl.rows for _, sl, _ in pieces)
        slices.append(
            SequenceSlice(
                conversation_id,
                start,
                rows,
                first.position,
                first.role,
                pieces[-1][1].end,
                first.request_id,
                first.attributes,
                first.scope,
            )
        )
        tokens.append([t for _, _, text in pieces for t in text])
        parts[conversation_id] = []
        for index, sl, _ in pieces:
            begin = offsets[index] + sl.start_row
            order.extend(range(begin, begin + sl.rows))
            parts[conversation_id].append(
                _Part(sl.position, sl.position + sl.rows, index, sl.start_row)
            )
        start += rows
    merged = ValidatedBatch(
        seq_no=members[-1].seq_no,
        model=members[0].model,
        rows=start,
        activations=_gather_rows(members, order),
        slices=slices,
        tokens=tokens,
        encoded={},  # can_join never groups steps the client encoded itself
    )
    return StepGroup(members, merged, parts)


def _gather_rows(members: list[ValidatedBatch], order: list[int]) -> dict[str, torch.Tensor]:
    index = torch.tensor(order, dtype=torch.int64)
    return {
        hook_point: torch.cat([m.activations[hook_point] for m in members])[index]
        for hook_point in members[0].activations
    }
