"""Local encoding in the relay (relay/encode.py): what the relay sends for activations it
encodes is, bit for bit, the feature block local encoding in the layer hook sends, on the full
path and a decode loop's reused template, for the row counts below and a hook on one or two
threads (MKL can round some row counts differently by thread count: relay/encode.py); hook
points the pack does not cover, and a pack that cannot be used, leave the activations as
they came (the sidecar then encodes them itself)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from monitor.capture.channel.frames import FrameWriter, read_step
from monitor.capture.channel.ring import SharedRing
from monitor.capture.relay.encode import ENCODER_FAILED, ENCODER_READY, RelayFeatureEncoder
from monitor.capture.relay.reader import StepReader
from monitor.capture.steps import CapturedStep, Tagging
from monitor.features import load_pack, save_pack
from monitor.features.build import build_pack_from_sae, load_sae
from monitor.fixtures import write_layer_sae
from monitor.wire.columns import ColumnarEncoder
from monitor.wire.tensors import decode_tensor

HIDDEN = 96


@pytest.fixture(scope="module")
def pack_path(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("relay-encode")
    sae = load_sae(write_layer_sae(workdir / "sae", HIDDEN, 512, 1, seed=3))
    pack = build_pack_from_sae(sae, list(range(0, 512, 4)), name="relaypack")
    path = workdir / "relaypack.pack.safetensors"
    save_pack(pack, path)
    return path


@pytest.fixture
def ring():
    made = SharedRing.create(8 << 20)
    yield made
    made.close()


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    threads = torch.get_num_threads()  # the relay encoder sets its process's thread count
    yield
    torch.set_num_threads(threads)


def _loaded(path, sha256: str, hook_points: tuple[str, ...]) -> RelayFeatureEncoder:
    encoder = RelayFeatureEncoder(str(path), sha256, hook_points)
    encoder.load()
    return encoder


def _tagging(count: int) -> Tagging:
    ids = tuple(f"c{i}" for i in range(count))
    return Tagging(ids, ("assistant",) * count, ids, key=(ids, "t"))


def _step(layers: dict, features: dict, count: int, rows: int, position: int) -> CapturedStep:
    return CapturedStep(
        layers, _tagging(count), [rows] * count, [position] * count, features=features
    )


def _through_relay(ring, reader: StepReader, step: CapturedStep):
    writer = FrameWriter(ring)
    assert writer.write(step, None)
    frame = ring.peek()
    batch = reader.read(ring, frame)
    ring.release(frame.size)
    return batch


def _hook_block(ring, pack, hook_point: str, hidden: torch.Tensor, count: int, rows: int):
    """The feature block local encoding in the hook puts on the wire (as the client's
    `_encode_locally` computes it, through the frame writer and `read_step`)."""
    values = pack.hook_points[hook_point].encoder.encode(hidden.reshape(-1, HIDDEN))
    key = (pack.name, pack.sha256, hook_point)
    step = _step({}, {key: values}, count, rows, 0)
    writer = FrameWriter(ring)
    assert writer.write(step, None)
    frame = ring.peek()
    batch = read_step(ring, frame)
    ring.release(frame.size)
    (block,) = batch.features
    return block


@pytest.mark.parametrize("hook_threads", [1, 2])
@pytest.mark.parametrize(("count", "rows"), [(1, 1), (4, 1), (64, 1), (1, 512), (3, 7)])
def test_the_relay_sends_the_hooks_feature_block_bit_for_bit(
    pack_path, ring, count, rows, hook_threads
):
    torch.set_num_threads(hook_threads)
    pack = load_pack(pack_path)
    hidden = torch.randn(count, rows, HIDDEN, generator=torch.Generator().manual_seed(rows))
    expected = _hook_block(ring, pack, "layers.1", hidden, count, rows)
    encoder = _loaded(pack_path, pack.sha256, ("layers.1",))
    reader = StepReader("m", ColumnarEncoder(1024), encoder)
    step = _step({"layers.1": hidden.reshape(-1, HIDDEN)}, {}, count, rows, 0)
    batch = _through_relay(ring, reader, step)
    assert len(batch.layers) == 0
    (block,) = batch.features
    assert block == expected  # pack, hash, hook point, dtype, shape and every byte
    assert encoder.encoded == 1


def test_a_decode_loop_reusing_its_template_is_encoded_every_step(pack_path, ring):
    pack = load_pack(pack_path)
    encoder = _loaded(pack_path, pack.sha256, ("layers.1",))
    reader = StepReader("m", ColumnarEncoder(1024), encoder)
    buffer = torch.empty(4, HIDDEN)
    writer = FrameWriter(ring)
    for position in range(5):
        buffer.copy_(torch.randn(4, HIDDEN, generator=torch.Generator().manual_seed(position)))
        step = CapturedStep(
            {"layers.1": buffer},
            _tagging(4),
            [1] * 4,
            [position] * 4,
            persistent_layers=True,
        )
        assert writer.write(step, None)
        frame = ring.peek()
        batch = reader.read(ring, frame)
        ring.release(frame.size)
        (block,) = batch.features
        values = decode_tensor(block.values, "values")
        assert torch.equal(values, pack.hook_points["layers.1"].encoder.encode(buffer))
        assert len(batch.layers) == 0
    assert reader.reused == 4  # the template's kept message still holds the activations
    assert encoder.encoded == 5


def test_hook_points_the_pack_does_not_cover_go_as_activations(pack_path, ring):
    pack = load_pack(pack_path)
    encoder = _loaded(pack_path, pack.sha256, ("layers.1",))
    reader = StepReader("m", None, encoder)
    layers = {"layers.1": torch.randn(2, HIDDEN), "layers.3": torch.randn(2, HIDDEN)}
    batch = _through_relay(ring, reader, _step(layers, {}, 2, 1, 0))
    assert [layer.hook_point for layer in batch.layers] == ["layers.3"]
    assert torch.equal(
        decode_tensor(batch.layers[0].activations, "a"), layers["layers.3"].contiguous()
    )
    assert [block.hook_point for block in batch.features] == ["layers.1"]


def test_until_the_pack_is_loaded_activations_go_unencoded(pack_path, ring):
    pack = load_pack(pack_path)
    states = []
    encoder = RelayFeatureEncoder(str(pack_path), pack.sha256, ("layers.1",), states.append)
    reader = StepReader("m", None, encoder)
    hidden = torch.randn(2, HIDDEN)
    batch = _through_relay(ring, reader, _step({"layers.1": hidden}, {}, 2, 1, 0))
    assert not encoder.ready and states == []
    assert [layer.hook_point for layer in batch.layers] == ["layers.1"]
    encoder.start()  # the relay starts it as it starts; a thread of its own
    assert encoder.wait(60) and states == [ENCODER_READY]
    batch = _through_relay(ring, reader, _step({"layers.1": hidden}, {}, 2, 1, 0))
    assert len(batch.layers) == 0 and [b.hook_point for b in batch.features] == ["layers.1"]


def test_blocks_go_in_layer_order_as_the_hooks(tmp_path, ring):
    saes = [load_sae(write_layer_sae(tmp_path / f"sae{i}", HIDDEN, 64, i, seed=i)) for i in (1, 3)]
    packs = [
        build_pack_from_sae(sae, features, name="two")  # feature names are unique in a pack
        for sae, features in zip(saes, ([0, 5, 9], [1, 6, 10]), strict=True)
    ]
    pack = packs[0]
    pack.hook_points.update(packs[1].hook_points)  # one pack covering layers 1 and 3
    path = tmp_path / "two.pack.safetensors"
    save_pack(pack, path)
    pack = load_pack(path)
    assert set(pack.hook_points) == {"layers.1", "layers.3"}
    encoder = _loaded(path, pack.sha256, ("layers.1", "layers.3"))
    layers = {
        "layers.0": torch.randn(2, HIDDEN),
        "layers.1": torch.randn(2, HIDDEN),
        "layers.3": torch.randn(2, HIDDEN),
    }
    batch = _through_relay(ring, StepReader("m", None, encoder), _step(layers, {}, 2, 1, 0))
    assert [layer.hook_point for layer in batch.layers] == ["layers.0"]
    assert [block.hook_point for block in batch.features] == ["layers.1", "layers.3"]
    for block in batch.features:
        expected = pack.hook_points[block.hook_point].encoder.encode(layers[block.hook_point])
        assert torch.equal(decode_tensor(block.values, "v"), expected)


@pytest.mark.parametrize("problem", ["missing file", "another hash", "uncovered hook point"])
def test_a_pack_the_relay_cannot_use_leaves_the_activations(pack_path, ring, problem, capsys):
    pack = load_pack(pack_path)
    path, sha, hook_points = str(pack_path), pack.sha256, ("layers.1",)
    if problem == "missing file":
        path = str(pack_path.parent / "gone.pack.safetensors")
    elif problem == "another hash":
        sha = "0" * 64
    else:
        hook_points = ("layers.1", "layers.7")
    states = []
    encoder = RelayFeatureEncoder(path, sha, hook_points, states.append)
    encoder.start()
    assert not encoder.wait(60) and states == [ENCODER_FAILED]
    reader = StepReader("m", None, encoder)
    hidden = torch.randn(3, HIDDEN)
    for _ in range(2):  # logged once, then left alone
        batch = _through_relay(ring, reader, _step({"layers.1": hidden}, {}, 3, 1, 0))
        assert [layer.hook_point for layer in batch.layers] == ["layers.1"]
        assert len(batch.features) == 0
        assert torch.equal(decode_tensor(batch.layers[0].activations, "a"), hidden)
    assert encoder.encoded == 0
    logged = capsys.readouterr()
    assert (logged.out + logged.err).count("cannot encode with the pack") == 1
