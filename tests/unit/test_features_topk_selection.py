"""TopK exact/approx packs, disagreement reporting, and multi-source selection files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from monitor.features import (
    ConcatEncoder,
    FeatureError,
    PackError,
    RestrictedEncoder,
    TopKExactEncoder,
    load_pack,
    save_pack,
)
from monitor.features.build import build_pack_from_sae, load_sae
from monitor.features.build.selection import build_from_selection, load_selection
from monitor.features.build.topk import fit_topk_thresholds, load_activations, topk_disagreement
from monitor.fixtures import write_gemma_scope, write_saelens_sae, write_sparsify

D_IN, D_SAE, K = 32, 128, 8
INDICES = [5, 90, 17, 3]


def samples(rows: int = 2000, seed: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 2.0 * torch.randn(rows, D_IN, generator=g) + 0.3


@pytest.fixture
def topk_dir(tmp_path: Path) -> Path:
    return write_sparsify(tmp_path / "ckpt", D_IN, D_SAE // D_IN, K, "layers.6")


def test_exact_pack_round_trip(tmp_path: Path, topk_dir: Path) -> None:
    sae = load_sae(topk_dir)
    pack = build_pack_from_sae(sae, INDICES, "tk", topk_mode="exact")
    assert isinstance(pack.hook_points["layers.6"].encoder, TopKExactEncoder)
    save_pack(pack, tmp_path / "tk.safetensors")
    loaded = load_pack(tmp_path / "tk.safetensors")
    x = samples(64).to(torch.bfloat16)
    torch.testing.assert_close(loaded.encode("layers.6", x), sae.encode(x)[:, INDICES])
    assert [f.activation for f in loaded.hook_points["layers.6"].features] == ["topk"] * 4
    assert loaded.encode("layers.6", x).shape == (64, len(INDICES))


def test_approx_thresholds_beat_plain_relu(topk_dir: Path) -> None:
    sae = load_sae(topk_dir)
    train, test = samples(3000, seed=1), samples(2000, seed=2)
    thresholds = fit_topk_thresholds(sae, INDICES, train)
    assert thresholds.shape == (len(INDICES),) and (thresholds >= 0).all()
    relu = topk_disagreement(sae, INDICES, test, None)
    fitted = topk_disagreement(sae, INDICES, test, thresholds)
    assert fitted.disagreement_rate < relu.disagreement_rate
    assert fitted.disagreement_rate < 0.05
    assert fitted.rows == 2000 and len(fitted.per_feature) == len(INDICES)
    assert fitted.disagreement_rate == pytest.approx(
        fitted.false_positive_rate + fitted.false_negative_rate
    )
    pack = build_pack_from_sae(sae, INDICES, "a", topk_mode="approx", thresholds=thresholds)
    encoder = pack.hook_points["layers.6"].encoder
    assert isinstance(encoder, RestrictedEncoder)
    assert pack.hook_points["layers.6"].features[0].threshold == pytest.approx(float(thresholds[0]))


def test_topk_calibration_rejects_non_topk(tmp_path: Path) -> None:
    sae = load_sae(write_saelens_sae(tmp_path / "s", D_IN, D_SAE))
    with pytest.raises(FeatureError, match="slice exactly"):
        fit_topk_thresholds(sae, [1], samples(10))


def test_load_activations(tmp_path: Path) -> None:
    x = samples(10)
    save_file({"layers.6": x, "layers.7": x * 2}, str(tmp_path / "a.safetensors"))
    assert torch.equal(load_activations(tmp_path / "a.safetensors", "layers.7"), x * 2)
    with pytest.raises(FeatureError, match="expected one named"):
        load_activations(tmp_path / "a.safetensors", "layers.9")
    save_file({"x": torch.zeros(3)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(FeatureError, match="rows, d_model"):
        load_activations(tmp_path / "b.safetensors")


# --- selection files ------------------------------------------------------------------------


def write_selection(tmp_path: Path, document: object) -> Path:
    path = tmp_path / "selection.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.fixture
def multi_source(tmp_path: Path, topk_dir: Path) -> Path:
    write_saelens_sae(
        tmp_path / "a",
        D_IN,
        D_SAE,
        architecture="jumprelu",
        hook_name="blocks.6.hook_resid_post",
        normalize_activations="layer_norm",
    )
    write_saelens_sae(tmp_path / "b", D_IN, D_SAE, hook_name="blocks.6.hook_resid_post", seed=3)
    write_gemma_scope(tmp_path / "gs", 24, 48, layer=2)
    save_file({"layers.6": samples(500)}, str(tmp_path / "acts.safetensors"))
    return write_selection(
        tmp_path,
        {
            "name": "safety",
            "sources": [
                {
                    "sae": "a",
                    "features": [
                        {
                            "index": 4,
                            "name": "secrecy",
                            "label": "Secrets",
                            "category": "deception",
                            "description": "hides things",
                            "neuronpedia_id": "m/6-res/4",
                        },
                        9,
                    ],
                },
                {"sae": "b", "features": [{"index": 4, "name": "b4"}]},
                {
                    "sae": "gs/gemma-scope-2b-pt-res/layer_2/width_16k/average_l0_9",
                    "format": "gemma-scope",
                    "features": [1, 2],
                },
                {
                    "sae": "ckpt/layers.6",
                    "topk_mode": "approx",
                    "calibration_activations": "acts.safetensors",
                    "features": [{"index": 5, "name": "tk5"}],
                },
            ],
        },
    )


def test_multi_source_pack(tmp_path: Path, multi_source: Path) -> None:
    pack = build_from_selection(load_selection(multi_source))
    assert pack.name == "safety" and sorted(pack.hook_points) == ["layers.2", "layers.6"]
    l6 = pack.hook_points["layers.6"]
    # layer_norm SAE 'a' stays its own segment; 'b' and the approx TopK slice merge.
    assert isinstance(l6.encoder, ConcatEncoder) and len(l6.encoder.parts) == 2
    assert [f.name for f in l6.features] == ["secrecy", "9", "b4", "tk5"]
    secrecy = l6.features[0]
    assert (secrecy.label, secrecy.category, secrecy.neuronpedia_id) == (
        "Secrets",
        "deception",
        "m/6-res/4",
    )
    assert pack.d_model("layers.2") == 24
    save_pack(pack, tmp_path / "p.safetensors")
    loaded = load_pack(tmp_path / "p.safetensors")
    assert loaded.hook_points["layers.6"].features == l6.features
    x = samples(50).to(torch.bfloat16)
    a, b = load_sae(tmp_path / "a"), load_sae(tmp_path / "b")
    expected = torch.cat([a.encode(x)[:, [4, 9]], b.encode(x)[:, [4]]], dim=1)
    torch.testing.assert_close(loaded.encode("layers.6", x)[:, :3], expected, rtol=1e-5, atol=1e-5)
    assert loaded.hook_points["layers.6"].features[3].threshold is not None


@pytest.mark.parametrize(
    ("document", "needle"),
    [
        ([1, 2], "expected a mapping"),
        ({"sources": []}, "sources: expected a non-empty list"),
        ({"sources": [{"sae": "a"}]}, "sources[0].features: expected a non-empty list"),
        ({"sources": [{"sae": "a", "features": [{"index": "x"}]}]}, "sources[0].features[0].index"),
        (
            {"sources": [{"sae": "a", "features": [1], "colour": 1}]},
            "sources[0].colour: unknown key",
        ),
        ({"sources": [{"sae": "a", "features": [1], "topk_mode": "fast"}]}, "topk_mode: 'fast'"),
        (
            {"sources": [{"sae": "a", "features": [{"index": 1, "label": 3}]}]},
            "label: expected a string",
        ),
        ({"sources": ["x"]}, "sources[0]: expected a mapping"),
    ],
)
def test_bad_selection_files(tmp_path: Path, document: object, needle: str) -> None:
    path = write_selection(tmp_path, document)
    with pytest.raises(FeatureError) as exc:
        load_selection(path)
    assert str(exc.value).startswith(str(path)) and needle in str(exc.value)


def test_selection_duplicate_names_and_bad_indices(tmp_path: Path) -> None:
    write_saelens_sae(tmp_path / "a", D_IN, D_SAE)
    write_saelens_sae(tmp_path / "b", D_IN, D_SAE)
    dup = write_selection(
        tmp_path,
        {"name": "p", "sources": [{"sae": "a", "features": [4]}, {"sae": "b", "features": [4]}]},
    )
    with pytest.raises(PackError, match=r"duplicate feature name '4'.*distinct 'name'"):
        build_from_selection(load_selection(dup))
    out_of_range = write_selection(
        tmp_path, {"name": "p", "sources": [{"sae": "a", "features": [D_SAE]}]}
    )
    with pytest.raises(FeatureError, match="out of range"):
        build_from_selection(load_selection(out_of_range))
    topk = write_sparsify(tmp_path / "ck", D_IN, 2, K)
    no_mode = write_selection(
        tmp_path, {"name": "p", "sources": [{"sae": str(topk), "features": [1]}]}
    )
    with pytest.raises(FeatureError, match="topk_mode"):
        build_from_selection(load_selection(no_mode))


def test_pack_to_device_keeps_values(tmp_path: Path, multi_source: Path) -> None:
    pack = build_from_selection(load_selection(multi_source))
    moved = pack.to("cpu")
    x = samples(20)
    for hp in pack.hook_points:
        width = pack.d_model(hp)
        assert torch.equal(moved.encode(hp, x[:, :width]), pack.encode(hp, x[:, :width]))
    assert moved.qualified_names("layers.6") == pack.qualified_names("layers.6")
