"""The relay's linger merge (monitor/capture/relay/coalesce.py): several steps as one StepBatch.

Each test builds steps whose activation rows are numbered (row value = a distinct id), so the
merged tensors can be checked row by row: every conversation's rows in its own order, the
conversations in order of first appearance, every layer alike.
"""

from __future__ import annotations

import numpy as np
import pytest

from monitor.capture.relay.coalesce import Coalescer
from monitor.wire import pb

COLUMNS = 4


def _seq(cid: str, position: int, rows: int, **extra) -> dict:  # type: ignore[no-untyped-def]
    return {"conversation_id": cid, "position": position, "rows": rows, **extra}


def step(*sequences: dict, layers=("layers.1", "layers.2"), dtype="FP32") -> pb.StepBatch:  # type: ignore[no-untyped-def]
    """A StepBatch whose row r of layer l for conversation c at position p holds the value
    id(c, p, l) in every column (see `row_ids`)."""
    batch = pb.StepBatch(model="m")
    for layer_index, hook_point in enumerate(layers):
        values = [
            _row_id(s["conversation_id"], s["position"] + r, layer_index)
            for s in sequences
            for r in range(s["rows"])
        ]
        array = np.repeat(np.array(values, np.float32)[:, None], COLUMNS, axis=1)
        if dtype == "FP16":
            array = array.astype(np.float16)
        batch.layers.append(
            pb.Layer(
                hook_point=hook_point,
                activations=pb.Tensor(dtype=dtype, shape=array.shape, data=array.tobytes()),
            )
        )
    for s in sequences:
        batch.sequences.append(pb.Sequence(**s))
    return batch


def _row_id(cid: str, position: int, layer: int) -> float:
    return float(1000 * layer + 100 * (ord(cid[-1]) - ord("a")) + position)


def row_ids(batch: pb.StepBatch, layer: int) -> list[float]:
    tensor = batch.layers[layer].activations
    dtype = np.float16 if tensor.dtype == "FP16" else np.float32
    array = np.frombuffer(tensor.data, dtype).reshape(tuple(tensor.shape))
    assert (array == array[:, :1]).all()
    return array[:, 0].astype(float).tolist()


def expected_ids(sequences: list[pb.Sequence], layer: int) -> list[float]:
    return [
        _row_id(s.conversation_id, s.position + r, layer) for s in sequences for r in range(s.rows)
    ]


def merge(*steps: pb.StepBatch) -> tuple[pb.StepBatch, int]:
    coalescer = Coalescer()
    for batch in steps:
        assert coalescer.add(batch)
    return coalescer.take()


def test_prefill_then_decodes_merge_per_conversation_in_row_order():
    steps = [
        step(_seq("conv-a", 0, 3, role="user"), _seq("conv-b", 0, 2, role="user")),
        step(_seq("conv-a", 3, 1, role="user"), _seq("conv-b", 2, 1, role="user")),
        # a conversation joining, and conv-b missing for a step
        step(_seq("conv-c", 0, 4, role="user"), _seq("conv-a", 4, 1, role="user")),
        step(_seq("conv-b", 3, 1, role="user"), _seq("conv-a", 5, 1, role="user")),
    ]
    merged, frames = merge(*steps)
    assert frames == 4
    got = [(s.conversation_id, s.position, s.rows) for s in merged.sequences]
    assert got == [("conv-a", 0, 6), ("conv-b", 0, 4), ("conv-c", 0, 4)]
    assert merged.model == "m"
    for layer in (0, 1):
        assert row_ids(merged, layer) == expected_ids(list(merged.sequences), layer)
        assert list(merged.layers[layer].activations.shape) == [14, COLUMNS]
    assert [layer.hook_point for layer in merged.layers] == ["layers.1", "layers.2"]
    assert not merged.HasField("columns")


def test_half_precision_rows_are_gathered_too():
    merged, _ = merge(
        step(_seq("conv-a", 7, 1), _seq("conv-b", 3, 1), dtype="FP16"),
        step(_seq("conv-a", 8, 1), _seq("conv-b", 4, 1), dtype="FP16"),
    )
    assert row_ids(merged, 0) == expected_ids(list(merged.sequences), 0)
    assert merged.layers[0].activations.dtype == "FP16"


def test_tokens_concatenate_and_flags_stay_on_the_last_slice():
    attributes = {"tenant": "t1"}
    first = step(
        _seq("conv-a", 0, 2, tokens=["a", "b"], request_id="r1", attributes=attributes),
        _seq("conv-b", 0, 1, tokens=["x"]),
    )
    second = step(
        _seq("conv-a", 2, 1, tokens=["c"], request_id="r1", attributes=attributes, turn_end=True),
        _seq("conv-b", 1, 1, tokens=["y"], end=True),
    )
    merged, _ = merge(first, second)
    a, b = merged.sequences
    assert list(a.tokens) == ["a", "b", "c"] and a.turn_end and not a.end
    assert a.request_id == "r1" and dict(a.attributes) == attributes
    assert list(b.tokens) == ["x", "y"] and b.end and not b.turn_end


@pytest.mark.parametrize(
    ("later", "why"),
    [
        (_seq("conv-a", 5, 1), "a gap in positions"),
        (_seq("conv-a", 3, 1), "an overlap"),
        (_seq("conv-a", 4, 1, role="assistant"), "another role"),
        (_seq("conv-a", 4, 1, request_id="other"), "another request id"),
        (_seq("conv-a", 4, 1, attributes={"k": "v"}), "other attributes"),
    ],
)
def test_a_slice_that_does_not_continue_its_conversation_flushes(later, why):
    coalescer = Coalescer()
    assert coalescer.add(step(_seq("conv-a", 0, 4), _seq("conv-b", 0, 1)))
    assert not coalescer.add(step(_seq("conv-b", 1, 1), later)), why
    batch, frames = coalescer.take()
    assert frames == 1 and [s.rows for s in batch.sequences] == [4, 1]


@pytest.mark.parametrize("flag", ["turn_end", "end"])
def test_nothing_follows_a_turn_end_or_an_end_in_one_message(flag):
    coalescer = Coalescer()
    assert coalescer.add(step(_seq("conv-a", 0, 2, **{flag: True})))
    assert not coalescer.add(step(_seq("conv-a", 2, 1)))
    # after a turn end another conversation may still join; after an end nothing does (as the
    # sidecar's grouping: at its conversation capacity the eviction order would change)
    joined = coalescer.add(step(_seq("conv-b", 0, 1)))
    assert joined == (flag == "turn_end")
    assert coalescer.full == (flag == "end")
    assert coalescer.take()[1] == (2 if joined else 1)


@pytest.mark.parametrize("dtype", ["FP32", "FP16", "BF16"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_step_with_a_non_finite_value_is_sent_alone(dtype, bad):
    """The sidecar rejects a whole message over one NaN/Inf: such a step must not take the
    steps merged with it down too."""

    def poisoned(sequence: dict) -> pb.StepBatch:
        return _as(step(sequence), dtype, bad=bad)

    def clean(sequence: dict) -> pb.StepBatch:
        return _as(step(sequence), dtype)

    coalescer = Coalescer()
    assert coalescer.add(clean(_seq("conv-a", 0, 1)))
    assert not coalescer.add(poisoned(_seq("conv-a", 1, 1)))  # not merged with the clean one
    assert coalescer.take()[1] == 1
    assert coalescer.add(poisoned(_seq("conv-a", 1, 1)))
    assert coalescer.full  # nothing joins it
    assert not coalescer.add(clean(_seq("conv-a", 2, 1)))
    # large finite values (high byte 0x7F/0xFF) are not mistaken for non-finite ones
    assert coalescer.take()[1] == 1
    big = _as(step(_seq("conv-b", 0, 1)), dtype, value=-6.0e4 if dtype == "FP16" else -3.0e38)
    assert coalescer.add(big) and not coalescer.full


def _as(
    batch: pb.StepBatch, dtype: str, value: float | None = None, bad: float | None = None
) -> pb.StepBatch:
    """`batch` (FP32) in `dtype`, every value replaced by `value` when given, and one value
    in the middle of each layer by `bad`."""
    for layer in batch.layers:
        values = np.frombuffer(layer.activations.data, np.float32).copy()
        if value is not None:
            values[:] = value
        if bad is not None:
            values[len(values) // 2] = bad
        if dtype == "FP16":
            data = values.astype(np.float16).tobytes()
        elif dtype == "BF16":
            data = (values.view(np.uint32) >> 16).astype(np.uint16).tobytes()
        else:
            data = values.tobytes()
        layer.activations.dtype, layer.activations.data = dtype, data
    return batch


def test_steps_of_another_kind_flush():
    base = step(_seq("conv-a", 0, 1))
    other_layers = step(_seq("conv-b", 0, 1), layers=("layers.1",))
    other_dtype = step(_seq("conv-b", 0, 1), dtype="FP16")
    with_text = step(_seq("conv-b", 0, 1, tokens=["t"]))
    features = step(_seq("conv-b", 0, 1))
    features.features.append(
        pb.FeatureBlock(pack="p", values=pb.Tensor(dtype="FP32", shape=(1, 1), data=bytes(4)))
    )
    for other in (other_layers, other_dtype, with_text, features):
        coalescer = Coalescer()
        assert coalescer.add(base)
        assert not coalescer.add(other)
    # a step that cannot be merged at all is sent alone, and nothing joins it
    alone = Coalescer()
    assert alone.add(features) and alone.full
    assert not alone.add(step(_seq("conv-c", 0, 1)))
    assert alone.take() == (features, 1)


def test_a_conversation_twice_in_a_step_is_sent_as_it_is():
    twice = step(_seq("conv-a", 0, 1), _seq("conv-a", 1, 1))
    coalescer = Coalescer()
    assert coalescer.add(twice) and coalescer.full
    assert coalescer.take() == (twice, 1)  # the sidecar rejects it, as without a linger


def test_bounds_on_frames_rows_and_bytes():
    coalescer = Coalescer(max_frames=3)
    for position in range(3):
        assert coalescer.add(step(_seq("conv-a", position, 1)))
    assert coalescer.full and not coalescer.add(step(_seq("conv-a", 3, 1)))
    assert coalescer.take()[1] == 3
    rows = Coalescer(max_rows=5)
    assert rows.add(step(_seq("conv-a", 0, 3)))
    assert not rows.add(step(_seq("conv-a", 3, 3)))
    row_bytes = 2 * COLUMNS * 4  # two FP32 layers
    size = Coalescer(max_bytes=3 * row_bytes)
    assert size.add(step(_seq("conv-a", 0, 2)))
    assert not size.add(step(_seq("conv-a", 2, 2)))
    assert size.add(step(_seq("conv-a", 2, 1)))
    sequences = Coalescer(max_sequences=2)
    assert sequences.add(step(_seq("conv-a", 0, 1), _seq("conv-b", 0, 1)))
    assert not sequences.add(step(_seq("conv-c", 0, 1)))


def test_take_starts_afresh_and_a_single_step_is_unchanged():
    coalescer = Coalescer()
    with pytest.raises(ValueError):
        coalescer.take()
    single = step(_seq("conv-a", 0, 2))
    assert coalescer.add(single)
    assert coalescer.take() == (single, 1)
    assert coalescer.frames == 0
    # after a take, a conversation that had ended may start a new message
    assert coalescer.add(step(_seq("conv-a", 0, 1, end=True)))
    assert coalescer.take()[1] == 1
    assert coalescer.add(step(_seq("conv-a", 5, 1)))


def test_zero_row_end_joins_its_conversation():
    merged, frames = merge(step(_seq("conv-a", 0, 2)), step(_seq("conv-a", 2, 0, end=True)))
    assert frames == 2
    (a,) = merged.sequences
    assert (a.position, a.rows, a.end) == (0, 2, True)
    assert row_ids(merged, 1) == expected_ids([a], 1)
