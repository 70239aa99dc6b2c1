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
from typing import NamedTuple

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


class _Part(NamedTuple):
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

    def split(self, firings: Sequence[Firing]) -> list[list[Firing]]:
        """Firings per member, in the order the member alone would have produced them (by
        its row, then rule order, which the merged order already has within a row)."""
        if len(self.members) == 1:
            return [list(firings)]
        keyed: list[list[tuple[int, Firing]]] = [[] for _ in self.members]
        if not firings:  # the usual case: no rule fired, nothing to place
            return [[] for _ in keyed]
        parts = _parts(self.members)
        for firing in firings:
            for part in parts[firing.conversation_id]:
                if not firing.in_batch:
                    # A turn end marked by a slice without rows, at the token before it: the
                    # member of that slice, at its start row (as that member alone).
                    if part.first_position == part.end_position == firing.position + 1:
                        keyed[part.member].append((part.start_row, firing))
                        break
                elif part.first_position <= firing.position < part.end_position:
                    row = part.start_row + firing.position - part.first_position
                    keyed[part.member].append((row, firing))
                    break
        return [[f for _, f in sorted(pairs, key=lambda pair: pair[0])] for pairs in keyed]


def _parts(members: Sequence[ValidatedBatch]) -> dict[str, list[_Part]]:
    """Conversation id -> where each member's slice of it lies, in member order (only needed
    to hand firings back, so only built when a rule fired)."""
    parts: dict[str, list[_Part]] = {}
    for index, member in enumerate(members):
        for sl in member.slices:
            part = _Part(sl.position, sl.position + sl.rows, index, sl.start_row)
            parts.setdefault(sl.conversation_id, []).append(part)
    return parts


class GroupState:
    """What deciding whether the next step can join a group needs, kept up to date as steps
    join: the group's rows, each conversation's last slice (and whether it carried token
    text), and whether any conversation ended. Checking a step then costs its own slices,
    not those of every member again (quadratic in the group's size)."""

    def __init__(self, first: ValidatedBatch) -> None:
        self.first = first
        self.rows = 0
        self.ended = False
        self.last: dict[str, tuple[SequenceSlice, bool]] = {}
        # Conversations whose last slice ended a turn: a merged slice has one turn end, its
        # last row, so no later step of theirs may join.
        self.turn_ended: set[str] = set()
        self.add(first)

    def add(self, step: ValidatedBatch) -> None:
        """`step` joins the group (after `fits` said it can, or as its first member)."""
        self.rows += step.rows
        last = self.last
        for sl, text in zip(step.slices, step.tokens, strict=True):
            last[sl.conversation_id] = (sl, bool(text))
            if sl.end:
                self.ended = True
            if sl.turn_end:
                self.turn_ended.add(sl.conversation_id)

    def fits(self, step: ValidatedBatch, max_rows: int, room: int) -> bool:
        """Whether `step` can be evaluated together with the group's steps: every
        conversation it shares with them continues at the next position with the same
        request, role, attributes and token-text presence (anything else, a gap or a new
        request, resets rule state at a boundary the merged batch would not have), with rows
        (a turn end without rows would become the merged slice's last row, and fire in the
        member before), none of them has ended or ended a turn (a merged slice has one turn
        end: its last row), and
        the group's conversations fit in `room` (what the engine can track without evicting:
        one wave would evict in another order than the steps one at a time)."""
        first = self.first
        if step.encoded or first.encoded or step.model != first.model or self.ended:
            return False
        if step.activations.keys() != first.activations.keys() or any(
            step.activations[hp].dtype != tensor.dtype for hp, tensor in first.activations.items()
        ):
            return False
        if self.rows + step.rows > max_rows:
            return False
        last = self.last
        turn_ended = self.turn_ended
        new = 0
        for sl, text in zip(step.slices, step.tokens, strict=True):
            before = last.get(sl.conversation_id)
            if before is None:
                new += 1
                continue
            if turn_ended and sl.conversation_id in turn_ended:
                return False
            previous, had_text = before
            if (
                not sl.rows
                or sl.position != previous.position + previous.rows
                or sl.request_id != previous.request_id
                or sl.role != previous.role
                or sl.attributes != previous.attributes
                or bool(text) != had_text
            ):
                return False
        return len(last) + new <= room


def can_join(
    members: Sequence[ValidatedBatch], step: ValidatedBatch, max_rows: int, room: int
) -> bool:
    """Whether `step` can be evaluated together with the steps before it (`GroupState.fits`
    for a group of `members`)."""
    state = GroupState(members[0])
    for member in members[1:]:
        state.add(member)
    return state.fits(step, max_rows, room)


def merge_steps(members: list[ValidatedBatch]) -> StepGroup:
    """One batch of the members' rows, each conversation's rows contiguous and in order."""
    if len(members) == 1:  # the light-load case: the step itself
        return StepGroup(members, members[0])
    return StepGroup(members, _merge_any(members))


def _merge_any(members: list[ValidatedBatch]) -> ValidatedBatch:
    """The members' rows, each conversation's contiguous and in order, whatever the steps."""
    by_conversation: dict[str, list[tuple[int, SequenceSlice, list[str]]]] = {}
    for index, member in enumerate(members):
        for sl, text in zip(member.slices, member.tokens, strict=True):
            by_conversation.setdefault(sl.conversation_id, []).append((index, sl, text))
    offsets = [0]
    for member in members[:-1]:
        offsets.append(offsets[-1] + member.rows)
    slices, tokens, order = [], [], []
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
                pieces[-1][1].turn_end,
            )
        )
        tokens.append([t for _, _, text in pieces for t in text])
        for index, sl, _ in pieces:
            begin = offsets[index] + sl.start_row
            order.extend(range(begin, begin + sl.rows))
        start += rows
    return ValidatedBatch(
        seq_no=members[-1].seq_no,
        model=members[0].model,
        rows=start,
        activations=_gather_rows(members, order),
        slices=slices,
        tokens=tokens,
        encoded={},  # can_join never groups steps the client encoded itself
    )


def _gather_rows(members: list[ValidatedBatch], order: list[int]) -> dict[str, torch.Tensor]:
    index = torch.tensor(order, dtype=torch.int64)
    return {
        hook_point: torch.cat([m.activations[hook_point] for m in members])[index]
        for hook_point in members[0].activations
    }
