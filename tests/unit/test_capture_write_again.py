"""`FrameWriter.write_again`, the frame path of vLLM's decode runs (a step written again at
new positions, with no new step object): the bytes it puts on the ring are exactly those of
the full path (`write` laying every frame out anew) for the same step, or it writes nothing
and `write` decides. The frames wrap a small ring, so padding and reuse happen too."""

from __future__ import annotations

import dataclasses
import itertools

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from monitor.capture.channel.frames import FrameWriter, read_step
from monitor.capture.channel.ring import SharedRing
from monitor.capture.steps import CapturedStep, Tagging

SEQUENCES = 3
# One planned step: which tagging, which views (two persistent ones, a float64 buffer the
# writer must convert every step, a bfloat16 one), rows per sequence (the same total: one
# view), and the positions.
_step = st.tuples(
    st.integers(0, 2),
    st.sampled_from(["a", "b", "converted", "bf16"]),
    st.sampled_from([(1, 1, 1), (2, 0, 1), (0, 0, 3)]),
    st.lists(st.integers(0, 2**40), min_size=SEQUENCES, max_size=SEQUENCES),
)


def _taggings() -> list[Tagging]:
    ids, roles, requests = ("c0", "c1", "c2"), ("assistant",) * SEQUENCES, ("r0", "r1", "r2")
    return [
        Tagging(ids, roles, requests, key=("plain",)),
        Tagging(ids, roles, requests, {"tenant": "t"}, key=("tenant",)),
        Tagging(ids, roles, requests, key=("ends",), turn_ends=(False, True, False)),
    ]


def _frame(ring: SharedRing) -> tuple[bytes, object]:
    """The next frame's bytes and its message; the frame is released."""
    frame = ring.peek()
    assert frame is not None
    raw = bytes(ring.data[frame.offset : frame.offset + frame.size])
    message = read_step(ring, frame)
    ring.release(frame.size)
    assert ring.peek() is None  # one frame per step
    return raw, message


@settings(max_examples=60, deadline=None)
@given(plan=st.lists(_step, min_size=1, max_size=40))
def test_write_again_puts_the_same_bytes_as_the_full_path(plan):
    buffers = {
        "a": torch.zeros(8, 4),
        "converted": torch.zeros(8, 4, dtype=torch.float64),
        "bf16": torch.zeros(8, 4, dtype=torch.bfloat16),
    }
    buffers["b"] = buffers["a"]  # other views of the same buffer
    views = {
        name: {"layers.1": buffer[0:3], "layers.2": buffer[3:6]} for name, buffer in buffers.items()
    }
    views["b"] = {"layers.1": buffers["b"][0:3], "layers.2": buffers["b"][3:6]}
    taggings = _taggings()
    # A ring for about six frames: both wrap (with padding) at the same steps.
    full_ring, fast_ring = SharedRing.create(4096), SharedRing.create(4096)
    full, fast = FrameWriter(full_ring), FrameWriter(fast_ring)
    full._keep_layout = lambda *args: None  # every frame laid out anew: the reference
    previous: CapturedStep | None = None
    again = 0
    try:
        for tagging_index, name, rows, positions in plan:
            for buffer in buffers.values():  # what the capture op wrote this step
                buffer.copy_(torch.randn(8, 4))
            tagging, layers = taggings[tagging_index], views[name]
            reference = CapturedStep(
                dict(layers), tagging, list(rows), list(positions), persistent_layers=True
            )
            assert full.write(reference, None)
            if (
                previous is not None
                and previous.tagging is tagging
                and previous.layers is layers
                and previous.rows == list(rows)
            ):
                # The worker's decode run: the run's step again, at this step's positions.
                if fast.write_again(previous, list(positions)):
                    again += 1
                else:
                    assert fast.write(dataclasses.replace(previous, positions=positions), None)
            else:
                previous = CapturedStep(
                    layers, tagging, list(rows), list(positions), persistent_layers=True
                )
                assert fast.write(previous, None)
            (expected, message), (got, fast_message) = _frame(full_ring), _frame(fast_ring)
            assert got == expected
            assert [s.position for s in message.sequences] == positions
            assert [s.rows for s in message.sequences] == list(rows)
            wire = {"converted": torch.float32, "a": torch.float32, "b": torch.float32}
            dtype = wire.get(name, torch.bfloat16)
            expected_bytes = b"".join(
                view.to(dtype).contiguous().view(torch.uint8).numpy().tobytes()
                for view in layers.values()
            )
            assert b"".join(layer.activations.data for layer in message.layers) == expected_bytes
            assert fast_message == message
    finally:
        full_ring.close()
        fast_ring.close()
    # Converted tensors are never reused (their copy does not outlive the step).
    repeats = sum(
        1
        for before, step in itertools.pairwise(plan)
        if before[:3] == step[:3] and step[1] != "converted"
    )
    assert again == repeats


def test_write_again_refuses_a_step_the_last_frame_was_not_laid_out_for():
    buffer = torch.zeros(8, 4)
    layers = {"layers.1": buffer[0:2]}
    tagging = Tagging(("c",), ("assistant",), ("r",), key=("k",))
    other = Tagging(("c",), ("assistant",), ("r",), key=("other",))
    ring = SharedRing.create(1 << 16)
    writer = FrameWriter(ring)
    try:
        step = CapturedStep(layers, tagging, [2], [0], persistent_layers=True)
        assert not writer.write_again(step, [2])  # nothing laid out yet
        assert ring.peek() is None
        assert writer.write(step, None)
        _frame(ring)
        assert writer.write_again(step, [2])
        _, message = _frame(ring)
        assert [s.position for s in message.sequences] == [2]
        # Another tagging, a copy of the views dict, a dict refilled with other views, or
        # views that are not persistent: nothing written.
        refilled = dict(layers)
        for changed in (
            dataclasses.replace(step, tagging=other),
            dataclasses.replace(step, layers=dict(layers)),
            dataclasses.replace(step, persistent_layers=False),
        ):
            assert not writer.write_again(changed, [4])
        layers["layers.1"] = buffer[2:4]
        assert not writer.write_again(step, [4])
        layers.update(refilled)
        assert ring.peek() is None
        assert writer.write_again(step, [4])
    finally:
        ring.close()
