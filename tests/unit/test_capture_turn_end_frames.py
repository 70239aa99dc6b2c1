"""Turn-end flags on the capture ring and in the columnar encoder: a step's flags come from
its tagging, travel inside the frame's serialised template, and come out of the relay on
exactly the sequences that carry them (empty `columns.turn_end` when none does)."""

from __future__ import annotations

import torch

from monitor.capture.channel.frames import FrameWriter, read_step
from monitor.capture.channel.ring import FrameKind, SharedRing
from monitor.capture.steps import CapturedStep, Tagging
from monitor.wire import pb
from monitor.wire.columns import ColumnarEncoder


def _through_ring(writer: FrameWriter, ring: SharedRing, step: CapturedStep) -> pb.StepBatch:
    assert writer.write(step, None)
    frame = ring.peek()
    assert frame.kind == FrameKind.TEMPLATED_STEP
    message = read_step(ring, frame)
    ring.release(frame.size)
    return message


def test_templated_frames_carry_each_taggings_flags():
    marked = Tagging(("a", "b"), ("user", "user"), ("", ""), key=(1, 2), turn_ends=(True, False))
    plain = Tagging(("a", "b"), ("user", "user"), ("", ""), key=(1, 1))
    ring = SharedRing.create(1 << 16)
    writer = FrameWriter(ring)
    try:
        seen = []
        for index, tagging in enumerate([marked, plain, plain, marked]):
            hidden = torch.randn(2, 1, 4)
            step = CapturedStep({"layers.1": hidden}, tagging, [1, 1], [index, index])
            message = _through_ring(writer, ring, step)
            seen.append([(s.position, s.turn_end) for s in message.sequences])
    finally:
        ring.close()
    assert seen == [
        [(0, True), (0, False)],
        [(1, False), (1, False)],
        [(2, False), (2, False)],
        [(3, True), (3, False)],
    ]


def test_the_persistent_layout_path_keeps_the_flags_of_the_step_it_writes():
    """vLLM's decode steps reuse the last frame's layout (same tagging, same buffer views):
    a prefill step's marked tagging and the next decode step's unmarked one must not share."""
    buffer = torch.arange(32.0).reshape(8, 4)
    views = {"layers.1": buffer[0:2]}
    ends = Tagging(("a", "b"), ("user", "user"), ("r", "s"), key="prompt", turn_ends=(True, True))
    decode = Tagging(("a", "b"), ("assistant",) * 2, ("r", "s"), key="decode")
    ring = SharedRing.create(1 << 16)
    writer = FrameWriter(ring)
    try:
        flags = []
        for tagging in (ends, decode, decode, ends):
            step = CapturedStep(dict(views), tagging, [1, 1], [0, 0], persistent_layers=True)
            flags.append([s.turn_end for s in _through_ring(writer, ring, step).sequences])
    finally:
        ring.close()
    assert flags == [[True, True], [False, False], [False, False], [True, True]]


def _batch(*sequences: tuple[str, bool]) -> pb.StepBatch:
    batch = pb.StepBatch()
    for position, (cid, turn_end) in enumerate(sequences):
        batch.sequences.append(
            pb.Sequence(conversation_id=cid, rows=1, position=position, turn_end=turn_end)
        )
    return batch


def test_columns_carry_turn_ends_only_when_a_sequence_has_one():
    encoder = ColumnarEncoder(4)
    first = encoder.encode(_batch(("a", False), ("b", True)))
    assert list(first.columns.turn_end) == [False, True]
    assert len(first.columns.define) == 2
    second = encoder.encode(_batch(("a", False), ("b", False)))
    assert list(second.columns.turn_end) == []  # empty: no turn ends in this batch
    assert len(second.columns.define) == 0  # a flag is per step, not part of a slot
    third = encoder.encode(_batch(("b", True)))
    assert list(third.columns.turn_end) == [True] and not third.sequences


def test_a_zero_row_turn_end_crosses_the_ring_and_the_columnar_encoder():
    """What the vLLM plugin sends when a request of a conversation named by
    `sm_conversation_id` finishes: one sequence, no rows, `turn_end` and not `end`, under the
    request's id and role, so the columnar encoder reuses the conversation's slot."""
    ring = SharedRing.create(1 << 16)
    writer = FrameWriter(ring)
    rows = Tagging(("chat",), ("assistant",), ("r-1",), key="decode")
    mark = Tagging(("chat",), ("assistant",), ("r-1",), turn_ends=(True,))
    try:
        step = CapturedStep({"layers.1": torch.randn(1, 4)}, rows, [1], [6])
        decode = _through_ring(writer, ring, step)
        finish = CapturedStep({"layers.1": torch.empty(0, 4)}, mark, [0], [7])
        assert writer.write(finish, None)
        frame = ring.peek()
        message = read_step(ring, frame)
        ring.release(frame.size)
    finally:
        ring.close()
    (sequence,) = message.sequences
    assert (sequence.rows, sequence.position, sequence.turn_end, sequence.end) == (
        0,
        7,
        True,
        False,
    )
    assert (sequence.request_id, sequence.role) == ("r-1", "assistant")
    assert list(message.layers[0].activations.shape) == [0, 4]
    encoder = ColumnarEncoder(4)
    encoder.encode(decode)
    columns = encoder.encode(message).columns
    assert list(columns.rows) == [0] and list(columns.position) == [7]
    assert list(columns.turn_end) == [True] and list(columns.end) == []
    assert len(columns.define) == 0  # the slot of the rows before it, as it was
