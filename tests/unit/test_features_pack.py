"""Feature packs: building from an SAE, atomic save, strict load, round trips."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from monitor.features import (
    FeatureError,
    FeatureInfo,
    FeaturePack,
    HookPointEncoder,
    PackError,
    RestrictedEncoder,
    load_pack,
    save_pack,
)
from monitor.features.build import build_pack_from_sae, load_sae
from monitor.fixtures import write_saelens_sae

D_IN, D_SAE = 32, 48
INDICES = [7, 2, 40]
META_KEY = "safety_monitor.pack"


def activations(rows: int = 9, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (torch.randn(rows, D_IN, generator=torch.Generator().manual_seed(3)) + 0.2).to(dtype)


def one_line(exc: pytest.ExceptionInfo[FeatureError], *needles: str) -> None:
    message = str(exc.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


@pytest.fixture
def jumprelu_dir(tmp_path: Path) -> Path:
    return write_saelens_sae(
        tmp_path / "sae",
        D_IN,
        D_SAE,
        architecture="jumprelu",
        normalize_activations="layer_norm",
        hook_name="blocks.5.hook_resid_post",
        neuronpedia_id="tiny-llama/5-res-48",
    )


@pytest.fixture
def pack(jumprelu_dir: Path) -> FeaturePack:
    return build_pack_from_sae(load_sae(jumprelu_dir), INDICES, "tiny-l5")


def probe_pack() -> FeaturePack:
    """Two hook points, identity (probe) and relu activations: what `pack fit` will produce."""
    generator = torch.Generator().manual_seed(5)
    probe = RestrictedEncoder(
        weight=torch.randn(D_IN, 2, generator=generator),
        bias=torch.tensor([0.1, -0.2]),
        floor=torch.full((2,), -math.inf),
        normalization="constant_norm_rescale",
    )
    relu = RestrictedEncoder(
        weight=torch.randn(16, 1, generator=generator),
        bias=torch.zeros(1),
        floor=torch.zeros(1),
        normalization="none",
    )
    probe_features = [
        FeatureInfo(name, "layers.3", "identity", None, category="deception", description=name)
        for name in ("deception", "harm")
    ]
    relu_features = [FeatureInfo("misc", "layers.9", "relu", 4, source="x")]
    return FeaturePack(
        name="probes",
        hook_points={
            "layers.3": HookPointEncoder("layers.3", probe, probe_features),
            "layers.9": HookPointEncoder("layers.9", relu, relu_features),
        },
    )


# --- building -----------------------------------------------------------------------------


def test_build_from_sae(jumprelu_dir: Path, pack: FeaturePack) -> None:
    sae = load_sae(jumprelu_dir)
    assert pack.name == "tiny-l5"
    assert list(pack.hook_points) == ["layers.5"]
    assert pack.d_model("layers.5") == D_IN
    assert pack.feature_count == len(INDICES)
    assert pack.qualified_names("layers.5") == ["tiny-l5/7", "tiny-l5/2", "tiny-l5/40"]
    feature = pack.hook_points["layers.5"].features[0]
    assert feature.activation == "jumprelu" and feature.sae_index == 7
    assert feature.source == "saelens:tiny-llama/5-res-48/7"
    assert sae.threshold is not None and feature.threshold == float(sae.threshold[7])
    assert pack.hook_points["layers.5"].encoder.normalization == "layer_norm"
    x = activations(dtype=torch.bfloat16)
    torch.testing.assert_close(
        pack.encode("layers.5", x), sae.encode(x)[:, INDICES], rtol=1e-5, atol=1e-5
    )
    # Capture clients may send the module path; it maps to the same encoder.
    assert torch.equal(pack.encode("model.layers.5", x), pack.encode("layers.5", x))


def test_build_standard_sae_without_neuronpedia(tmp_path: Path) -> None:
    directory = write_saelens_sae(tmp_path / "sae", D_IN, D_SAE)
    pack = build_pack_from_sae(load_sae(directory), [1], "p")
    feature = pack.hook_points["layers.1"].features[0]
    assert (feature.activation, feature.threshold, feature.source) == ("relu", None, str(directory))


def test_build_hook_point_override(jumprelu_dir: Path) -> None:
    pack = build_pack_from_sae(load_sae(jumprelu_dir), [1], "p", "blocks.8.hook_resid_post")
    assert list(pack.hook_points) == ["layers.8"]
    assert pack.hook_points["layers.8"].features[0].hook_point == "layers.8"


def test_build_needs_a_hook_point(tmp_path: Path) -> None:
    sae = load_sae(write_saelens_sae(tmp_path / "sae", D_IN, D_SAE, hook_name=None))
    with pytest.raises(FeatureError) as exc:
        build_pack_from_sae(sae, [1], "p")
    one_line(exc, "hook_point", "--hook-point")


@pytest.mark.parametrize("name", ["", "a/b", "has space", "ünïcode"])
def test_build_rejects_bad_pack_names(jumprelu_dir: Path, name: str) -> None:
    with pytest.raises(PackError) as exc:
        build_pack_from_sae(load_sae(jumprelu_dir), [1], name)
    one_line(exc, "name")


def test_build_rejects_bad_indices(jumprelu_dir: Path) -> None:
    with pytest.raises(FeatureError) as exc:
        build_pack_from_sae(load_sae(jumprelu_dir), [1, 1], "p")
    one_line(exc, "indices", "twice")


def test_unknown_hook_point(pack: FeaturePack) -> None:
    with pytest.raises(FeatureError) as exc:
        pack.encode("layers.4", activations())
    one_line(exc, "tiny-l5", "layers.4", "layers.5")


def test_pack_invariants_are_checked_on_construction() -> None:
    good = probe_pack()
    entry = good.hook_points["layers.3"]
    duplicate = [entry.features[0], entry.features[0]]
    nan_threshold = dataclasses.replace(entry.features[0], threshold=math.nan)
    cases: list[tuple[dict[str, HookPointEncoder], str]] = [
        ({}, "at least one hook point"),
        ({"layers.4": entry}, "hook_points.layers.4"),
        ({"layers.3": HookPointEncoder("layers.3", entry.encoder, duplicate)}, "duplicate"),
        (
            {
                "layers.3": HookPointEncoder(
                    "layers.3", entry.encoder, [nan_threshold, entry.features[1]]
                )
            },
            "not finite",
        ),
        (
            {"layers.3": HookPointEncoder("layers.3", entry.encoder, entry.features[:1])},
            "1 features",
        ),
    ]
    for hook_points, needle in cases:
        with pytest.raises(PackError) as exc:
            FeaturePack(name="p", hook_points=hook_points)
        one_line(exc, "pack 'p'", needle)


# --- save / load --------------------------------------------------------------------------


def test_round_trip(tmp_path: Path, pack: FeaturePack) -> None:
    out = tmp_path / "pack.safetensors"
    digest = save_pack(pack, out)
    assert digest == pack.sha256 == hashlib.sha256(out.read_bytes()).hexdigest()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pack.safetensors", "sae"]  # no tmp
    loaded = load_pack(out)
    assert loaded.sha256 == digest
    assert loaded.name == pack.name
    assert loaded.hook_points["layers.5"].features == pack.hook_points["layers.5"].features
    for suffix in ("weight", "bias", "floor"):
        assert torch.equal(
            getattr(loaded.hook_points["layers.5"].encoder, suffix),
            getattr(pack.hook_points["layers.5"].encoder, suffix),
        )
    x = activations()
    assert torch.equal(loaded.encode("layers.5", x), pack.encode("layers.5", x))
    # Saving the same content again gives the same bytes, so the hash identifies the pack.
    assert save_pack(loaded, tmp_path / "again.safetensors") == digest


def test_labeled_roles_round_trip_and_older_packs_keep_their_bytes(
    tmp_path: Path, pack: FeaturePack
) -> None:
    """`labeled_roles` (what `pack fit` records of its fit data) is saved and loaded as a
    tuple; a pack without it is written as before (no such key: same bytes, same hash)."""
    before = save_pack(pack, tmp_path / "before.safetensors")
    document = json.loads(load_file_metadata(tmp_path / "before.safetensors"))
    assert all("labeled_roles" not in f for f in document["hook_points"]["layers.5"]["features"])
    entry = pack.hook_points["layers.5"]
    roles = [dataclasses.replace(entry.features[0], labeled_roles=("assistant", "tool"))]
    entry.features = roles + entry.features[1:]
    after = save_pack(pack, tmp_path / "after.safetensors")
    assert after != before
    loaded = load_pack(tmp_path / "after.safetensors")
    assert loaded.hook_points["layers.5"].features[0].labeled_roles == ("assistant", "tool")
    assert loaded.hook_points["layers.5"].features[1].labeled_roles == ()
    assert save_pack(loaded, tmp_path / "again.safetensors") == after


def load_file_metadata(path: Path) -> str:
    """The pack's JSON metadata string, read with safetensors' own reader."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()[META_KEY]


def test_round_trip_multi_hook_point_probes(tmp_path: Path) -> None:
    pack = probe_pack()
    save_pack(pack, tmp_path / "probes.safetensors")
    loaded = load_pack(tmp_path / "probes.safetensors")
    assert loaded.feature_count == 3
    assert loaded.qualified_names("layers.3") == ["probes/deception", "probes/harm"]
    assert loaded.hook_points["layers.3"].features[0].category == "deception"
    assert loaded.d_model("layers.9") == 16
    x = activations()
    out = loaded.encode("layers.3", x)
    assert (out < 0).any()  # identity activation keeps negative logits
    assert torch.equal(out, pack.encode("layers.3", x))


def test_save_overwrites_existing_pack(tmp_path: Path, pack: FeaturePack) -> None:
    out = tmp_path / "pack.safetensors"
    out.write_bytes(b"old")
    save_pack(pack, out)
    assert load_pack(out).name == "tiny-l5"


def test_save_refuses_nan_and_leaves_no_file(tmp_path: Path, pack: FeaturePack) -> None:
    out = tmp_path / "out" / "pack.safetensors"
    out.parent.mkdir()
    pack.hook_points["layers.5"].encoder.bias[1] = math.nan
    with pytest.raises(PackError) as exc:
        save_pack(pack, out)
    one_line(exc, str(out), "layers.5.bias", "NaN")
    assert list(out.parent.iterdir()) == []


def test_save_to_missing_directory(tmp_path: Path, pack: FeaturePack) -> None:
    out = tmp_path / "missing" / "pack.safetensors"
    with pytest.raises(PackError) as exc:
        save_pack(pack, out)
    one_line(exc, str(out), "cannot write")
    assert not out.parent.exists()


def test_failed_rename_keeps_old_file_and_cleans_up(
    tmp_path: Path, pack: FeaturePack, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out" / "pack.safetensors"
    out.parent.mkdir()
    out.write_bytes(b"previous")

    def fail(src: Any, dst: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(PackError) as exc:
        save_pack(pack, out)
    one_line(exc, "disk full")
    assert out.read_bytes() == b"previous"
    assert list(out.parent.iterdir()) == [out]


def test_save_under_a_file_instead_of_a_directory(tmp_path: Path, pack: FeaturePack) -> None:
    # (A read-only directory would be the natural case, but root, which CI runs as, ignores
    # directory permissions; a file in the way fails for every user.)
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("x")
    before = sorted(tmp_path.iterdir())
    with pytest.raises(PackError):
        save_pack(pack, blocker / "pack.safetensors")
    assert sorted(tmp_path.iterdir()) == before
    assert blocker.read_text() == "x"


# --- bad pack files -----------------------------------------------------------------------


@pytest.fixture
def raw(tmp_path: Path, pack: FeaturePack) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A valid pack's tensors and metadata document, for tests to damage."""
    path = tmp_path / "good.safetensors"
    save_pack(pack, path)
    with open(path, "rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_len))
    return load_file(str(path)), json.loads(header["__metadata__"][META_KEY])


def write_raw(path: Path, tensors: dict[str, torch.Tensor], document: Any) -> Path:
    text = document if isinstance(document, str) else json.dumps(document)
    save_file(tensors, str(path), metadata=None if document is None else {META_KEY: text})
    return path


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PackError) as exc:
        load_pack(tmp_path / "none.safetensors")
    one_line(exc, "none.safetensors", "not found")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_load_corrupt(tmp_path: Path, pack: FeaturePack, damage: str) -> None:
    path = tmp_path / "p.safetensors"
    save_pack(pack, path)
    data = path.read_bytes()
    path.write_bytes({"truncate": data[:-10], "garbage": b"\xff" * 40, "empty": b""}[damage])
    with pytest.raises(PackError) as exc:
        load_pack(path)
    one_line(exc, "p.safetensors", "corrupt")


def test_load_without_metadata(tmp_path: Path, raw: tuple[dict, dict]) -> None:
    path = write_raw(tmp_path / "p.safetensors", raw[0], None)
    with pytest.raises(PackError) as exc:
        load_pack(path)
    one_line(exc, "p.safetensors", META_KEY, "missing")


def test_load_invalid_metadata_json(tmp_path: Path, raw: tuple[dict, dict]) -> None:
    path = write_raw(tmp_path / "p.safetensors", raw[0], "{oops")
    with pytest.raises(PackError) as exc:
        load_pack(path)
    one_line(exc, "p.safetensors", "metadata", "invalid JSON")


HP = "hook_points.layers.5"
F0 = f"{HP}.features[0]"
F0P = "hook_points/layers.5/features/0"


def _set(document: dict[str, Any], dotted: str, value: Any) -> None:
    """Set (or with ``...`` delete) the item at a '/'-separated path of keys and list indices."""
    *parents, last = dotted.split("/")
    target: Any = document
    for key in parents:
        target = target[int(key) if isinstance(target, list) else key]
    index = int(last) if isinstance(target, list) else last
    if value is ...:
        del target[index]
    else:
        target[index] = value


@pytest.mark.parametrize(
    ("edit", "value", "field", "needle"),
    [
        ("format_version", 3, "format_version", "reads 1, 2"),
        ("name", ..., "name", "missing"),
        ("name", "bad/name", "name", "must match"),
        ("hook_points", [], "hook_points", "unexpected value"),
        ("hook_points/layers.5", "x", HP, "JSON object"),
        ("hook_points/layers.5/normalization", "rms", f"{HP}.normalization", "'rms'"),
        ("hook_points/layers.5/features", {}, f"{HP}.features", "unexpected value"),
        ("hook_points/layers.5/features/0", 3, f"{HP}.features[0]", "JSON object"),
        ("hook_points/layers.5/features/0/name", ..., f"{HP}.features[0].name", "missing"),
        ("hook_points/layers.5/features/1/sae_index", True, f"{HP}.features[1].sae_index", "True"),
        ("hook_points/layers.5/features/1/threshold", "1", f"{HP}.features[1].threshold", "'1'"),
        ("hook_points/layers.5/features/0/colour", "red", f"{HP}.features[0].colour", "unknown"),
        ("hook_points/layers.5/features/0/activation", "gelu", f"{HP}.features[0]", "'gelu'"),
        ("hook_points/layers.5/features/0/activation", "identity", f"{HP}.features[0]", "floor"),
        ("hook_points/layers.5/features/1/name", "7", f"{HP}.features[1]", "duplicate"),
        ("hook_points/layers.5/features/2/hook_point", "layers.6", f"{HP}.features[2]", "differs"),
        ("hook_points/layers.5/features/2", ..., "layers.5.weight", "for 2 features"),
        ("hook_points/layers.5/features/0/labeled_roles", "user", f"{F0}.labeled_roles", "'user'"),
        ("hook_points/layers.5/features/0/labeled_roles", [""], f"{F0}.labeled_roles", "role"),
        ("hook_points/layers.5/features/0/labeled_roles", [3], f"{F0}.labeled_roles", "role names"),
        # Role names are shown in notes and written into rule files: printable and short.
        (f"{F0P}/labeled_roles", ["\x1b[2J"], f"{F0}.labeled_roles", "role '\\x1b[2J': "),
        (f"{F0P}/labeled_roles", ["user\nnote: ok"], f"{F0}.labeled_roles", "printable"),
        (f"{F0P}/labeled_roles", ["user\u202e"], f"{F0}.labeled_roles", "printable"),
        (f"{F0P}/labeled_roles", ["u" * 65], f"{F0}.labeled_roles", "at most 64"),
    ],
)
def test_load_bad_metadata(
    tmp_path: Path, raw: tuple[dict, dict], edit: str, value: Any, field: str, needle: str
) -> None:
    tensors, document = raw
    _set(document, edit, value)
    path = write_raw(tmp_path / "p.safetensors", tensors, document)
    with pytest.raises(PackError) as exc:
        load_pack(path)
    one_line(exc, "p.safetensors", f": {field}: ", needle)


@pytest.mark.parametrize(
    ("name", "value", "field", "needle"),
    [
        ("layers.5.bias", ..., "layers.5.bias", "missing tensor"),
        ("layers.5.bias", torch.zeros(4), "layers.5.bias", "[4]"),
        ("layers.5.weight", torch.zeros(D_IN, 2), "layers.5.weight", "[32, 2]"),
        (
            "layers.5.weight",
            torch.zeros(D_IN, 3, dtype=torch.float64),
            "layers.5.weight",
            "float32",
        ),
        ("layers.5.weight", torch.full((D_IN, 3), math.nan), f"{HP}.weight", "NaN"),
        ("layers.5.floor", torch.tensor([0.1, math.nan, 0.2]), f"{HP}.floor", "NaN"),
        ("layers.5.floor", torch.tensor([0.1, -0.5, 0.2]), f"{HP}.features[1]", "floor -0.5"),
        ("layers.6.weight", torch.zeros(2, 2), "layers.6.weight", "not described"),
    ],
)
def test_load_bad_tensors(
    tmp_path: Path, raw: tuple[dict, dict], name: str, value: Any, field: str, needle: str
) -> None:
    tensors, document = raw
    if value is ...:
        del tensors[name]
    else:
        tensors[name] = value
    path = write_raw(tmp_path / "p.safetensors", tensors, document)
    with pytest.raises(PackError) as exc:
        load_pack(path)
    one_line(exc, "p.safetensors", f": {field}: ", needle)
