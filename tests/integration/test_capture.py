"""Capture client behaviour that needs no sidecar logic: layer lookup, fail-open when the
sidecar is down, detach."""

from __future__ import annotations

import pytest
import torch

from monitor.capture import CaptureClient, LayerNotFoundError, select_layers
from monitor.fixtures import build_tiny_llama, free_port


def test_layers_are_found_by_index_with_canonical_names():
    model = build_tiny_llama(layers=3)
    selected = select_layers(model, [0, -1])
    assert list(selected) == ["layers.0", "layers.2"]
    assert selected["layers.2"] is model.model.layers[2]


def test_out_of_range_layer_is_a_clear_error():
    model = build_tiny_llama(layers=3)
    with pytest.raises(LayerNotFoundError, match=r"index 3 out of range.*3 layers \(0\.\.2\)"):
        select_layers(model, [3])


def test_unknown_architecture_lists_candidates():
    model = torch.nn.Sequential(
        torch.nn.ModuleDict({"blocks": torch.nn.ModuleList([torch.nn.Linear(2, 2)])})
    )
    with pytest.raises(LayerNotFoundError, match=r"ModuleLists found: 0\.blocks"):
        select_layers(model, [0])
    assert list(select_layers(model, [0], module_path="0.blocks")) == ["layers.0"]


def test_sidecar_down_fails_open_and_generation_is_unchanged():
    model = build_tiny_llama()
    prompt = torch.randint(1, 256, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
    client = CaptureClient(f"127.0.0.1:{free_port()}", queue_size=2)
    client.attach(model, layers=[1])
    with client.conversation("c"), torch.no_grad():
        got = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(got, expected)
    assert client.flush(timeout=10)
    client.close(timeout=5)
    assert client.stats.steps_captured == 5
    assert client.stats.batches_acked == 0
    # Every step is accounted for: dropped on a full queue or while the sidecar was down.
    assert client.stats.dropped["queue_full"] + client.stats.dropped["sidecar_unavailable"] == 5


def test_steps_submitted_again_are_counted_and_settled_once_each():
    """`CaptureClient.submit_again` (vLLM's decode runs) counts, drops and settles each step
    as `submit` would: with the sidecar down (fail-open) every step is captured once and
    dropped once, whether the ring took it or the client dropped it first."""
    from monitor.capture.steps import CapturedStep, Tagging

    buffer = torch.zeros(8, 4)
    tagging = Tagging(("a", "b"), ("assistant",) * 2, ("ra", "rb"), key=("decode",))
    step = CapturedStep({"layers.1": buffer[0:2]}, tagging, [1, 1], [0, 0], persistent_layers=True)
    client = CaptureClient(f"127.0.0.1:{free_port()}", queue_size=4, metrics_registry=None)
    try:
        client.submit(step)
        for position in range(1, 40):
            client.submit_again(step, [position, position])
        assert client.flush(timeout=20)
        stats = client.stats
    finally:
        client.close(timeout=5)
    assert stats.steps_captured == 40
    assert stats.batches_acked == 0
    assert sum(stats.dropped.values()) == 40
    assert set(stats.dropped) <= {"queue_full", "sidecar_unavailable"}


def test_detach_removes_every_hook():
    model = build_tiny_llama()
    client = CaptureClient("127.0.0.1:1")
    client.attach(model, layers=[0, 2])
    assert all(len(layer._forward_hooks) == 1 for layer in model.model.layers[::2])
    client.close(timeout=2)
    assert all(len(layer._forward_hooks) == 0 for layer in model.model.layers)


def test_untagged_forward_passes_are_counted_not_sent():
    model = build_tiny_llama()
    client = CaptureClient("127.0.0.1:1")
    client.attach(model, layers=[1])
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    client.close(timeout=2)
    assert client.stats.dropped["untagged"] == 1
    assert client.stats.steps_captured == 0


def test_client_metrics_on_the_serving_process_registry():
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    model = build_tiny_llama()
    target = f"127.0.0.1:{free_port()}"
    client = CaptureClient(target, queue_size=1, metrics_registry=registry)
    client.attach(model, layers=[1])
    with client.conversation("m"), torch.no_grad():
        model(torch.tensor([[1, 2]]))
        model(torch.tensor([[3, 4]]))
    assert client.flush(10)
    client.close(timeout=5)
    text = generate_latest(registry).decode()
    assert f'safety_monitor_capture_steps_total{{target="{target}"}} 2.0' in text
    assert (
        f'safety_monitor_capture_dropped_total{{reason="queue_full",target="{target}"}} 1.0' in text
    )


def test_a_frame_on_the_ring_becomes_the_wire_message():
    """Row selection happens on the way onto the ring; the relay's side adds the tensor bytes
    back to the metadata, exactly."""
    from monitor.capture.channel.frames import FrameWriter, read_step
    from monitor.capture.channel.ring import FrameKind, SharedRing
    from monitor.capture.steps import CapturedStep, Tagging
    from monitor.wire import decode_tensor

    hidden = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    valid = torch.tensor([[False, True, True], [True, True, True]])
    step = CapturedStep(
        layers={"layers.0": hidden, "layers.1": hidden.to(torch.float64)},
        tagging=Tagging(("a", "b"), ("assistant", "user"), ("", "r"), key=(0, 2)),
        rows=[2, 3],
        positions=[5, 0],
        valid=valid,
        features={("p", "sha", "layers.0"): torch.ones(5, 2)},
    )
    ring = SharedRing.create(1 << 16)
    try:
        assert FrameWriter(ring).write(step, [["x", "y"], ["1", "2", "3"]])
        frame = ring.peek()
        assert frame.rows == 5 and frame.kind == FrameKind.STEP  # token text: no template
        message = read_step(ring, frame)
        ring.release(frame.size)
        assert ring.peek() is None
    finally:
        ring.close()
    assert torch.equal(decode_tensor(message.layers[0].activations, "t"), hidden[valid])
    assert message.layers[1].activations.dtype == "FP32"  # FP64 has no wire name
    assert torch.equal(decode_tensor(message.layers[1].activations, "t"), hidden[valid])
    assert torch.equal(decode_tensor(message.features[0].values, "t"), torch.ones(5, 2))
    assert [list(s.tokens) for s in message.sequences] == [["x", "y"], ["1", "2", "3"]]
    assert [(s.conversation_id, s.position, s.rows, s.role) for s in message.sequences] == [
        ("a", 5, 2, "assistant"),
        ("b", 0, 3, "user"),
    ]


def test_steps_of_one_tagging_share_a_template_and_arrive_exact():
    """Decode steps reuse their tagging's serialised metadata and add only rows and
    positions; every message the relay rebuilds equals the one built from scratch, also when
    the row counts, dtypes or hook points change under the same tagging."""
    from monitor.capture.channel.frames import FrameWriter, read_step
    from monitor.capture.channel.ring import FrameKind, SharedRing
    from monitor.capture.steps import CapturedStep, Tagging
    from monitor.wire import decode_tensor

    tagging = Tagging(("a", "b/0"), ("assistant",) * 2, ("r1", "r2"), {"tenant": "t"}, key=(7, 2))
    shapes = [(3, torch.float32, "layers.1"), (1, torch.float32, "layers.1")]
    shapes += [(1, torch.bfloat16, "layers.1"), (2, torch.float16, "layers.3")]
    ring = SharedRing.create(1 << 16)
    writer = FrameWriter(ring)
    try:
        for index, (seq, dtype, hook_point) in enumerate(shapes):
            hidden = torch.randn(2, seq, 8).to(dtype)
            valid = torch.ones(2, seq, dtype=torch.bool)
            valid[0, 0] = index % 2 == 0  # some steps drop a row of the first sequence
            rows = valid.sum(dim=1).tolist()
            step = CapturedStep(
                {hook_point: hidden}, tagging, rows, [10 * index, 100 + index], valid=valid
            )
            assert writer.write(step, None)
            frame = ring.peek()
            assert frame.kind == FrameKind.TEMPLATED_STEP
            message = read_step(ring, frame)
            ring.release(frame.size)
            layer = message.layers[0]
            assert layer.hook_point == hook_point
            assert torch.equal(decode_tensor(layer.activations, "t"), hidden[valid])
            assert [(s.conversation_id, s.rows, s.position) for s in message.sequences] == [
                ("a", rows[0], 10 * index),
                ("b/0", rows[1], 100 + index),
            ]
            assert [s.request_id for s in message.sequences] == ["r1", "r2"]
            assert all(dict(s.attributes) == {"tenant": "t"} for s in message.sequences)
    finally:
        ring.close()


def test_steps_of_persistent_views_reuse_the_layout_and_carry_each_steps_bytes():
    """vLLM's decode steps hand the writer the same views of a persistent buffer every step
    (`persistent_layers`): the writer reuses the last frame's layout, and each frame still
    carries that step's rows, positions and the buffer's bytes at the time of the write. A
    new tagging, new views, a wrapped ring or a converted tensor take the full path again."""
    from monitor.capture.channel.frames import FrameWriter, read_step
    from monitor.capture.channel.ring import FrameKind, SharedRing
    from monitor.capture.steps import CapturedStep, Tagging
    from monitor.wire import decode_tensor

    buffer = torch.zeros(16, 8)
    half = torch.zeros(16, 8, dtype=torch.float64)  # no wire dtype: converted every step
    views = {"layers.1": buffer[0:3], "layers.2": buffer[3:6]}
    first = Tagging(("a", "b"), ("assistant",) * 2, ("ra", "rb"), key=("first",))
    second = Tagging(("a", "b"), ("assistant",) * 2, ("ra", "rb"), key=("second",))
    ring = SharedRing.create(4096)  # small: the frames wrap around it many times
    writer = FrameWriter(ring)
    reused = []
    write_again = writer._write_again
    writer._write_again = lambda *a: reused.append(1) or write_again(*a)  # count the reuses
    plan = [(first, views)] * 4 + [(second, views)] * 3
    plan += [(second, {"layers.1": buffer[0:3], "layers.2": buffer[3:6]})] * 3
    plan += [(second, {"layers.1": half[0:3], "layers.2": half[3:6]})] * 3
    try:
        for index, (tagging, layers) in enumerate(plan):
            buffer.copy_(torch.randn(16, 8))  # what the capture op wrote this step
            half.copy_(torch.randn(16, 8, dtype=torch.float64))
            rows, positions = ([1, 2] if index % 2 else [2, 1]), [index, 50 + index]
            step = CapturedStep(dict(layers), tagging, rows, positions, persistent_layers=True)
            assert writer.write(step, None)
            frame = ring.peek()
            assert frame.kind == FrameKind.TEMPLATED_STEP
            message = read_step(ring, frame)
            ring.release(frame.size)
            for layer, (hook_point, view) in zip(message.layers, layers.items(), strict=True):
                assert layer.hook_point == hook_point
                expected = view.to(torch.float32)
                assert torch.equal(decode_tensor(layer.activations, "t"), expected)
            got = [(s.conversation_id, s.request_id, s.rows, s.position) for s in message.sequences]
            assert got == [("a", "ra", rows[0], index), ("b", "rb", rows[1], 50 + index)]
        # Reused: 3 of the first tagging's 4 steps, 2 of each next 3 (a new tagging, then new
        # views); never the converted tensors'.
        assert len(reused) == 7
    finally:
        ring.close()


def test_a_corrupt_templated_frame_is_refused_not_misread():
    from monitor.capture.channel.frames import FrameWriter, read_step
    from monitor.capture.channel.ring import FRAME_HEADER, SharedRing
    from monitor.capture.steps import CapturedStep, Tagging

    ring = SharedRing.create(1 << 16)
    try:
        tagging = Tagging(("a",), ("assistant",), ("",), key=(1, 1))
        step = CapturedStep({"layers.0": torch.ones(1, 2, 4)}, tagging, [2], [0])
        assert FrameWriter(ring).write(step, None)
        frame = ring.peek()
        # The frame header claims 3 rows; the sequences add up to 2.
        FRAME_HEADER.pack_into(ring.data, frame.offset, frame.size, frame.kind, frame.meta, 3)
        with pytest.raises(ValueError, match="do not add up"):
            read_step(ring, ring.peek())
    finally:
        ring.close()


def test_ring_wraps_and_refuses_what_does_not_fit():
    """Frames never straddle the end; a full ring says so instead of overwriting."""
    from monitor.capture.channel.frames import FrameTooLarge, FrameWriter, read_step
    from monitor.capture.channel.ring import SharedRing
    from monitor.capture.steps import CapturedStep, Tagging
    from monitor.wire import decode_tensor

    tagging = Tagging(("c",), ("assistant",), ("",), key=(0, 1))

    def step(value: float, rows: int) -> CapturedStep:
        layers = {"layers.0": torch.full((1, rows, 64), value)}
        return CapturedStep(layers, tagging, [rows], [0])

    ring = SharedRing.create(4096)
    writer = FrameWriter(ring)
    try:
        with pytest.raises(FrameTooLarge):
            writer.write(step(0, 32), None)  # 8 KiB of activations
        seen = []
        for value in range(40):
            while not writer.write(step(value, 3), None):  # full: consume one, then retry
                frame = ring.peek()
                seen.append(decode_tensor(read_step(ring, frame).layers[0].activations, "t"))
                ring.release(frame.size)
        while (frame := ring.peek()) is not None:
            seen.append(decode_tensor(read_step(ring, frame).layers[0].activations, "t"))
            ring.release(frame.size)
    finally:
        ring.close()
    assert [int(t[0, 0]) for t in seen] == list(range(40))
    assert all(torch.equal(t, torch.full((3, 64), float(i))) for i, t in enumerate(seen))


def test_token_texts_keep_the_spaces_between_words():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from monitor.capture.client import token_texts

    vocab = {w: i for i, w in enumerate(["[UNK]", "the", "cat", "play", "##ing", "."])}
    backend = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    ids = tokenizer("the cat playing.")["input_ids"]
    texts = token_texts(tokenizer, ids)
    assert "".join(texts) == tokenizer.decode(ids) == "the cat playing."
    assert texts[:2] == ["the", " cat"]
    # The first token of a later decode step reads in the context of the one before it.
    assert token_texts(tokenizer, [vocab["##ing"]], previous=vocab["play"]) == ["ing"]
