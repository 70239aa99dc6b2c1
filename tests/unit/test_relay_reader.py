"""The relay's StepReader: a decode loop's frames reuse the encoding kept from the first frame
of their template, and what it returns is, frame for frame, the message the full path builds
(read_step, the model name, ColumnarEncoder.encode on an encoder of its own), whatever comes
between: other taggings that define, reuse or evict slots, ends, bad frames, features, token
text, more templates than are kept."""

from __future__ import annotations

import struct

import pytest
import torch

from monitor.capture.channel.frames import FrameWriter, read_step
from monitor.capture.channel.ring import FRAME_HEADER, SharedRing
from monitor.capture.relay import reader as reader_module
from monitor.capture.relay.reader import StepReader
from monitor.capture.steps import CapturedStep, Tagging
from monitor.wire import pb
from monitor.wire.columns import ColumnarEncoder


class _Pair:
    """A frame writer, the reader under test and the reference path, on one ring."""

    def __init__(self, slots: int = 1024, columnar: bool = True) -> None:
        self.ring = SharedRing.create(1 << 20)
        self.writer = FrameWriter(self.ring)
        self.reader = StepReader("model-x", ColumnarEncoder(slots) if columnar else None)
        self.reference = ColumnarEncoder(slots) if columnar else None

    def send(self, step: CapturedStep, texts: list[list[str]] | None = None) -> pb.StepBatch:
        """Publish `step`, read it both ways, assert they agree; the reader's message."""
        assert self.writer.write(step, texts)
        frame = self.ring.peek()
        assert frame is not None
        got = self.reader.read(self.ring, frame)
        expected = read_step(self.ring, frame)
        self.ring.release(frame.size)
        expected.model = "model-x"
        rows = sum(sequence.rows for sequence in expected.sequences)
        if self.reference is not None:
            self.reference.encode(expected)
        assert got == expected
        assert self.reader.rows == rows
        return got


def _tagging(ids: tuple[str, ...], role: str = "assistant", **kwargs) -> Tagging:
    return Tagging(ids, (role,) * len(ids), tuple(f"r-{i}" for i in ids), key=(ids, role), **kwargs)


def _decode_step(tagging: Tagging, position: int, view: torch.Tensor) -> CapturedStep:
    count = len(tagging.conversation_ids)
    return CapturedStep(
        {"layers.1": view},
        tagging,
        [1] * count,
        [position + index for index in range(count)],
        persistent_layers=True,
    )


@pytest.fixture
def pair():
    made = _Pair()
    yield made
    made.ring.close()


def test_a_decode_loop_reuses_its_encoding_and_sends_each_steps_rows_and_bytes(pair):
    tagging = _tagging(("a", "b", "c"))
    buffer = torch.zeros(3, 8)
    view = buffer[:3]
    messages = []
    for step in range(6):
        buffer.copy_(torch.full((3, 8), float(step)))
        messages.append(pair.send(_decode_step(tagging, 10 + step, view)))
    assert pair.reader.reused == 5  # every frame after the first
    # Only the first defines the slots; each carries its own positions and tensor bytes.
    assert [len(m.columns.define) for m in messages] == [3, 0, 0, 0, 0, 0]
    assert [list(m.columns.position) for m in messages][-1] == [15, 16, 17]
    data = messages[4].layers[0].activations
    assert list(data.shape) == [3, 8]
    assert torch.frombuffer(bytearray(data.data), dtype=torch.float32).eq(4.0).all()


def test_rows_per_step_may_change_under_one_template(pair):
    tagging = _tagging(("a", "b"))
    for step, rows in enumerate([[5, 1], [1, 1], [0, 3], [2, 2]]):
        hidden = torch.randn(sum(rows), 4)
        pair.send(CapturedStep({"layers.1": hidden}, tagging, rows, [step * 10, step * 10]))
    assert pair.reader.reused == 3


def test_other_taggings_between_two_frames_force_a_fresh_encoding(pair):
    """Slot definitions by another tagging change the table: the kept encoding is not used
    until the table is the same again; reused or not, each message equals the full path's."""
    first, second = _tagging(("a", "b")), _tagging(("c", "a"), role="user")
    view = torch.randn(2, 4)
    sequence = [first, first, second, first, first, second, second, first]
    for position, tagging in enumerate(sequence):
        pair.send(_decode_step(tagging, position, view))
    # "a" changes role between the two taggings, so each switch redefines it: reused are
    # only the frames right after one of their own template (the 2nd, 5th and 7th).
    assert pair.reader.reused == 3


def test_ends_free_slots_and_are_never_reused(pair):
    live = _tagging(("a", "b"))
    ended = Tagging(("a",), ("assistant",), ("r-a",), end=True, key="end-a")
    view = torch.randn(2, 4)
    pair.send(_decode_step(live, 0, view))
    pair.send(_decode_step(live, 1, view))
    for _ in range(2):  # the same end frame twice: each frees, so each is encoded afresh
        pair.send(CapturedStep({"layers.1": torch.zeros(0, 4)}, ended, [0], [2]))
    pair.send(_decode_step(live, 2, view))  # "a" is defined again
    assert pair.reader.reused == 1


def test_a_reused_encoding_keeps_the_tables_recency_for_evictions():
    """A reused frame makes its conversations the most recently used, as encoding it would:
    with three slots, (b, a) then (a, b) again leaves a least recent, so d takes a's slot
    (b's, were the reused frame to leave the order of (b, a))."""
    pair = _Pair(slots=3)
    try:
        view = torch.randn(2, 4)
        order = [("a", "b"), ("b", "a"), ("a", "b"), ("c", "d"), ("a", "b")]
        messages = [
            pair.send(_decode_step(_tagging(ids), position, view))
            for position, ids in enumerate(order)
        ]
        assert pair.reader.reused == 1  # the third
        defined = {d.conversation_id: d.slot for d in messages[3].columns.define}
        assert defined == {"c": 2, "d": 0}  # a's slot: a was least recently used
    finally:
        pair.ring.close()


def test_feature_blocks_and_several_layers_are_filled_in(pair):
    tagging = _tagging(("a", "b"))
    for position in range(3):
        step = CapturedStep(
            {"layers.1": torch.randn(2, 4), "layers.2": torch.randn(2, 6).half()},
            tagging,
            [1, 1],
            [position, position],
            features={("pack", "sha", "layers.1"): torch.randn(2, 3)},
        )
        message = pair.send(step)
    assert pair.reader.reused == 2
    assert [list(t.activations.shape) for t in message.layers] == [[2, 4], [2, 6]]
    assert list(message.features[0].values.shape) == [2, 3]


def test_token_text_and_the_sequence_format_take_the_full_path():
    pair = _Pair(columnar=False)
    try:
        tagging = _tagging(("a",))
        for position in range(3):
            message = pair.send(_decode_step(tagging, position, torch.randn(1, 4)))
        assert message.sequences[0].position == 2 and pair.reader.reused == 0
    finally:
        pair.ring.close()
    pair = _Pair()
    try:
        tagging = _tagging(("a",))
        for position in range(3):
            step = _decode_step(tagging, position, torch.randn(1, 4))
            message = pair.send(step, texts=[[f"t{position}"]])
        assert list(message.columns.tokens) == ["t2"] and pair.reader.reused == 0
    finally:
        pair.ring.close()


def test_a_bad_frame_of_a_kept_template_raises_and_leaves_the_table_alone(pair):
    tagging = _tagging(("a", "b"))
    view = torch.randn(2, 4)
    pair.send(_decode_step(tagging, 0, view))
    assert pair.writer.write(_decode_step(tagging, 1, view), None)
    frame = pair.ring.peek()
    # The first sequence's row count, after the template: make the rows disagree with the
    # frame's total.
    meta_at = frame.offset + FRAME_HEADER.size
    (length,) = struct.unpack_from("<I", pair.ring.data, meta_at)
    counts_at = meta_at + 4 + length + (-(4 + length) % 8)
    struct.pack_into("<Q", pair.ring.data, counts_at, 7)
    version = pair.reader.encoder.version
    with pytest.raises(ValueError, match="add up"):
        pair.reader.read(pair.ring, frame)
    pair.ring.release(frame.size)
    assert pair.reader.encoder.version == version
    pair.send(_decode_step(tagging, 2, view))  # still equal to the full path's
    assert pair.reader.reused == 1


def test_more_templates_than_kept_stay_bounded_and_exact(pair, monkeypatch):
    monkeypatch.setattr(reader_module, "TEMPLATES", 4)
    view = torch.randn(1, 4)
    taggings = [_tagging((f"c{index}",)) for index in range(6)]
    for position in range(3):
        for tagging in taggings:
            pair.send(_decode_step(tagging, position, view))
    assert len(pair.reader._kept) == 4
