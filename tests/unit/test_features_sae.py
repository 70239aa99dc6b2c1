"""SAELens loading, the reference encode, and the restricted encoder's exactness."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from monitor.features import FeatureError, RestrictedEncoder, SAEFormatError, canonical_hook_point
from monitor.features.build import SAE, load_sae
from monitor.fixtures import write_saelens_sae

D_IN, D_SAE, ROWS = 64, 96, 33
INDICES = [0, 5, 17, 95, 42, 3, 60]  # unsorted on purpose: column order must follow it
NORMALIZATIONS = ["none", "expected_average_only_in", "constant_norm_rescale", "layer_norm"]


def saelens_encode(directory: Path, x: torch.Tensor) -> torch.Tensor:
    """Independent SAELens encode, read straight from disk (does not use monitor.features)."""
    cfg = json.loads((directory / "cfg.json").read_text())
    w = load_file(str(directory / "sae_weights.safetensors"))
    x = x.to(torch.float32)
    norm = cfg["normalize_activations"]
    if norm == "constant_norm_rescale":
        x_norm_coeff = (cfg["d_in"] ** 0.5) / x.norm(dim=-1, keepdim=True)
        x = x * x_norm_coeff
    elif norm == "layer_norm":
        mu = x.mean(-1, keepdim=True)
        std = x.std(-1, keepdim=True)
        x = (x - mu) / (std + 1e-5)
    if cfg.get("apply_b_dec_to_input", True):
        x = x - w["b_dec"]
    hidden_pre = x @ w["W_enc"] + w["b_enc"]
    if cfg["architecture"] == "jumprelu":
        return torch.nn.functional.relu(hidden_pre) * (hidden_pre > w["threshold"])
    return torch.nn.functional.relu(hidden_pre)


def activations(dtype: torch.dtype = torch.float32, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # A residual-stream-like offset makes the b_dec fold and the normalisations matter.
    x = 2.0 * torch.randn(ROWS, D_IN, generator=generator) + 0.3
    return x.to(dtype)


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = max(float(expected.abs().max()), 1.0)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale)


def one_line(exc: pytest.ExceptionInfo[FeatureError], *needles: str) -> None:
    message = str(exc.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


# --- reference encode ---------------------------------------------------------------------


@pytest.mark.parametrize("architecture", ["standard", "jumprelu"])
@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("v6", [True, False])
def test_reference_encode_matches_saelens(
    tmp_path: Path, architecture: str, apply_b_dec: bool, normalization: str, v6: bool
) -> None:
    directory = write_saelens_sae(
        tmp_path / "sae",
        D_IN,
        D_SAE,
        architecture=architecture,
        apply_b_dec_to_input=apply_b_dec,
        normalize_activations=normalization,
        v6=v6,
    )
    sae = load_sae(directory)
    assert (sae.d_in, sae.d_sae, sae.architecture) == (D_IN, D_SAE, architecture)
    assert sae.apply_b_dec_to_input is apply_b_dec
    assert sae.normalize_activations == normalization
    assert sae.hook_point == "layers.1"
    x = activations()
    out = sae.encode(x)
    assert out.dtype == torch.float32 and out.shape == (ROWS, D_SAE)
    torch.testing.assert_close(out, saelens_encode(directory, x), rtol=1e-6, atol=1e-6)
    # The fixture is only useful if it exercises both sides of each activation.
    assert 0 < int((out > 0).sum()) < out.numel()


# --- restricted encoder -------------------------------------------------------------------


@pytest.mark.parametrize("architecture", ["standard", "jumprelu"])
@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_restricted_matches_full_encode(
    tmp_path: Path,
    architecture: str,
    apply_b_dec: bool,
    normalization: str,
    dtype: torch.dtype,
) -> None:
    directory = write_saelens_sae(
        tmp_path / "sae",
        D_IN,
        D_SAE,
        architecture=architecture,
        apply_b_dec_to_input=apply_b_dec,
        normalize_activations=normalization,
    )
    sae = load_sae(directory)
    encoder = sae.restrict(INDICES)
    assert (encoder.d_in, encoder.k) == (D_IN, len(INDICES))
    assert encoder.weight.is_contiguous() and encoder.weight.dtype == torch.float32
    x = activations(dtype)  # the reference sees the same bf16 values, upcast the same way
    out = encoder.encode(x)
    assert out.dtype == torch.float32 and out.shape == (ROWS, len(INDICES))
    expected = saelens_encode(directory, x)[:, INDICES]
    assert_close_scaled(out, expected)
    assert_close_scaled(out, sae.encode(x)[:, INDICES])


def test_fold_is_computed_in_float64(tmp_path: Path) -> None:
    sae = load_sae(write_saelens_sae(tmp_path / "sae", D_IN, D_SAE))
    encoder = sae.restrict(INDICES)
    idx = torch.tensor(INDICES)
    exact = sae.b_enc[idx].double() - sae.b_dec.double() @ sae.W_enc[:, idx].double()
    assert torch.equal(encoder.bias, exact.float())


def test_jumprelu_negative_threshold_behaves_like_relu(tmp_path: Path) -> None:
    directory = write_saelens_sae(tmp_path / "sae", D_IN, D_SAE, architecture="jumprelu")
    weights = load_file(str(directory / "sae_weights.safetensors"))
    weights["threshold"][::2] = -0.3  # relu(h) * (h > -0.3) == relu(h)
    save_file(weights, str(directory / "sae_weights.safetensors"))
    sae = load_sae(directory)
    encoder = sae.restrict(list(range(D_SAE)))
    assert float(encoder.floor.min()) == 0.0
    x = activations()
    assert_close_scaled(encoder.encode(x), saelens_encode(directory, x))


def test_identity_floor_gives_raw_logits() -> None:
    weight = torch.randn(D_IN, 3)
    bias = torch.tensor([0.5, -1.0, 0.0])
    floor = torch.full((3,), -math.inf)
    encoder = RestrictedEncoder(weight=weight, bias=bias, floor=floor, normalization="none")
    x = activations()
    out = encoder.encode(x)
    assert (out < 0).any()
    torch.testing.assert_close(out, x @ weight + bias)


def test_encode_rejects_wrong_width(tmp_path: Path) -> None:
    encoder = load_sae(write_saelens_sae(tmp_path / "sae", D_IN, D_SAE)).restrict([1, 2])
    with pytest.raises(FeatureError) as exc:
        encoder.encode(torch.zeros(4, D_IN + 1))
    one_line(exc, "activations", str(D_IN))


@pytest.mark.parametrize(
    ("indices", "needle"),
    [
        ([], "no feature indices"),
        ([D_SAE], f"index {D_SAE} out of range"),
        ([-1], "index -1 out of range"),
        ([3, 4, 3], "index 3 given twice"),
        ([1.5], "not an integer"),
        ([True], "not an integer"),
    ],
)
def test_restrict_validates_indices(tmp_path: Path, indices: list[Any], needle: str) -> None:
    directory = write_saelens_sae(tmp_path / "sae", D_IN, D_SAE)
    with pytest.raises(FeatureError) as exc:
        load_sae(directory).restrict(indices)
    one_line(exc, str(directory), "indices", needle)


def test_restrict_accepts_integer_like_indices(tmp_path: Path) -> None:
    sae = load_sae(write_saelens_sae(tmp_path / "sae", D_IN, D_SAE))
    by_tensor = sae.restrict(torch.tensor([4, 9]))  # type: ignore[arg-type]
    assert torch.equal(by_tensor.weight, sae.restrict([4, 9]).weight)


# --- config variants ----------------------------------------------------------------------


def edit_cfg(directory: Path, **changes: Any) -> Path:
    """Apply changes to cfg.json; a value of ... deletes the key, 'metadata.x' edits metadata."""
    cfg = json.loads((directory / "cfg.json").read_text())
    for key, value in changes.items():
        target, name = (cfg["metadata"], key[9:]) if key.startswith("metadata_") else (cfg, key)
        if value is ...:
            target.pop(name, None)
        else:
            target[name] = value
    (directory / "cfg.json").write_text(json.dumps(cfg))
    return directory


def test_pre6_hook_point_key_and_neuronpedia_id(tmp_path: Path) -> None:
    directory = write_saelens_sae(
        tmp_path / "sae", D_IN, D_SAE, v6=False, hook_name=None, neuronpedia_id="m/1-res/x"
    )
    edit_cfg(directory, hook_name=..., hook_point="blocks.4.hook_resid_post", architecture=...)
    sae = load_sae(directory)
    assert (sae.hook_point, sae.architecture, sae.neuronpedia_id) == (
        "layers.4",
        "standard",
        "m/1-res/x",
    )
    assert sae.source == str(directory)


def test_v6_metadata_without_hook_name(tmp_path: Path) -> None:
    directory = write_saelens_sae(tmp_path / "sae", D_IN, D_SAE, hook_name=None)
    assert load_sae(directory).hook_point is None


def test_half_precision_weights_load_as_float32(tmp_path: Path) -> None:
    directory = write_saelens_sae(tmp_path / "sae", D_IN, D_SAE, architecture="jumprelu")
    path = directory / "sae_weights.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(path)).items()}, str(path))
    sae = load_sae(directory)
    assert sae.W_enc.dtype == sae.b_enc.dtype == sae.b_dec.dtype == torch.float32
    assert sae.threshold is not None and sae.threshold.dtype == torch.float32


@pytest.mark.parametrize(
    ("hook", "canonical"),
    [
        ("layers.3", "layers.3"),
        ("blocks.3.hook_resid_post", "layers.3"),
        ("blocks.12.hook_resid_pre", "layers.11"),
        ("model.layers.7", "layers.7"),
        ("model.model.layers.7", "layers.7"),
        ("base_model.model.layers.2", "layers.2"),
        ("layers.03", "layers.3"),
    ],
)
def test_canonical_hook_point(hook: str, canonical: str) -> None:
    assert canonical_hook_point(hook) == canonical


@pytest.mark.parametrize(
    "hook",
    [
        "embed_tokens",
        "blocks.0.hook_resid_pre",
        "blocks.3.attn.hook_z",
        "layers.x",
        "layers.3.mlp",
        "",
    ],
)
def test_canonical_hook_point_rejects(hook: str) -> None:
    with pytest.raises(FeatureError) as exc:
        canonical_hook_point(hook)
    one_line(exc, "hook_point", repr(hook))


# --- bad SAE directories ------------------------------------------------------------------


def write_default(tmp_path: Path, **kwargs: Any) -> Path:
    return write_saelens_sae(tmp_path / "sae", 8, 12, **kwargs)


def replace_weights(directory: Path, **changes: Any) -> None:
    path = directory / "sae_weights.safetensors"
    weights = load_file(str(path))
    for name, value in changes.items():
        if value is ...:
            del weights[name]
        else:
            weights[name] = value
    save_file(weights, str(path))


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(SAEFormatError) as exc:
        load_sae(tmp_path / "nope")
    one_line(exc, "nope", "not a directory")


def test_cfg_missing(tmp_path: Path) -> None:
    directory = write_default(tmp_path)
    (directory / "cfg.json").unlink()
    with pytest.raises(SAEFormatError) as exc:
        load_sae(directory)
    one_line(exc, "cfg.json", "not found")


@pytest.mark.parametrize(("text", "needle"), [("{not json", "invalid JSON"), ("[1, 2]", "object")])
def test_cfg_not_a_json_object(tmp_path: Path, text: str, needle: str) -> None:
    directory = write_default(tmp_path)
    (directory / "cfg.json").write_text(text)
    with pytest.raises(SAEFormatError) as exc:
        load_sae(directory)
    one_line(exc, "cfg.json", needle)


@pytest.mark.parametrize(
    ("changes", "field", "needle"),
    [
        ({"d_in": ...}, "d_in", "missing"),
        ({"d_sae": "12"}, "d_sae", "positive integer"),
        ({"d_sae": True}, "d_sae", "positive integer"),
        ({"d_in": 0}, "d_in", "positive integer"),
        ({"architecture": ...}, "architecture", "missing"),
        ({"architecture": "topk"}, "k", "missing"),
        ({"architecture": "topk", "k": 13}, "k", "exceeds d_sae 12"),
        ({"architecture": "topk", "k": 0}, "k", "positive integer"),
        ({"architecture": "batchtopk"}, "architecture", "training architecture"),
        ({"architecture": "wibble"}, "architecture", "unknown architecture 'wibble'"),
        ({"apply_b_dec_to_input": "yes"}, "apply_b_dec_to_input", "true or false"),
        ({"normalize_activations": "l2"}, "normalize_activations", "'l2'"),
        ({"normalize_activations": True}, "normalize_activations", "True"),
        ({"reshape_activations": "hook_z"}, "reshape_activations", "not supported"),
        ({"metadata": "x"}, "metadata", "object"),
        ({"metadata_hook_name": "blocks.1.attn.hook_z"}, "metadata.hook_name", "hook_z"),
        ({"metadata_hook_name": 3}, "metadata.hook_name", "string"),
        ({"metadata_hook_head_index": 2}, "hook_head_index", "per-head"),
        ({"metadata_neuronpedia_id": 5}, "neuronpedia_id", "string"),
    ],
)
def test_bad_v6_cfg(tmp_path: Path, changes: dict[str, Any], field: str, needle: str) -> None:
    directory = edit_cfg(write_default(tmp_path), **changes)
    with pytest.raises(SAEFormatError) as exc:
        load_sae(directory)
    one_line(exc, "cfg.json", f": {field}: ", needle)


@pytest.mark.parametrize(
    ("changes", "field", "needle"),
    [
        (
            {"activation_fn_str": "topk", "activation_fn_kwargs": {}},
            "activation_fn_kwargs.k",
            "missing",
        ),
        ({"activation_fn_str": "tanh-relu"}, "activation_fn_str", "unknown architecture"),
        ({"hook_name": "blocks.2.hook_mlp_out"}, "hook_name", "hook_mlp_out"),
    ],
)
def test_bad_pre6_cfg(tmp_path: Path, changes: dict[str, Any], field: str, needle: str) -> None:
    directory = edit_cfg(write_default(tmp_path, v6=False), **changes)
    with pytest.raises(SAEFormatError) as exc:
        load_sae(directory)
    one_line(exc, "cfg.json", f": {field}: ", needle)


def test_weights_missing(tmp_path: Path) -> None:
    directory = write_default(tmp_path)
    (directory / "sae_weights.safetensors").unlink()
    with pytest.raises(SAEFormatError) as exc:
        load_sae(directory)
    one_line(exc, "sae_weights.safetensors", "not found")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_weights_corrupt(tmp_path: Path, damage: str) -> None:
    directory = write_default(tmp_path)
    path = directory / "sae_weights.safetensors"
    data = path.read_bytes()
    path.write_bytes(
        {"truncate": data[: len(data) // 2], "garbage": b"\x00junk" * 9, "empty": b""}[damage]
    )
    with pytest.raises(SAEFormatError) as exc:
        load_sae(directory)
    one_line(exc, "sae_weights.safetensors", "corrupt")


@pytest.mark.parametrize(
    ("architecture", "changes", "field", "needle"),
    [
        ("standard", {"W_enc": ...}, "W_enc", "missing tensor"),
        ("standard", {"b_dec": ...}, "b_dec", "missing tensor"),
        ("jumprelu", {"threshold": ...}, "threshold", "missing tensor"),
        ("standard", {"W_enc": torch.zeros(8, 13)}, "W_enc", "[8, 13]"),
        ("standard", {"W_enc": torch.zeros(12, 8)}, "W_enc", "[12, 8]"),
        ("standard", {"b_enc": torch.zeros(8)}, "b_enc", "[8]"),
        ("jumprelu", {"threshold": torch.zeros(1, 12)}, "threshold", "[1, 12]"),
        ("standard", {"W_enc": torch.zeros(8, 12, dtype=torch.int32)}, "W_enc", "float"),
        ("standard", {"W_enc": torch.full((8, 12), math.nan)}, "W_enc", "NaN"),
        ("standard", {"b_dec": torch.full((8,), math.inf)}, "b_dec", "Inf"),
        ("jumprelu", {"threshold": torch.full((12,), math.nan)}, "threshold", "NaN"),
    ],
)
def test_bad_weights(
    tmp_path: Path, architecture: str, changes: dict[str, Any], field: str, needle: str
) -> None:
    directory = write_default(tmp_path, architecture=architecture)
    replace_weights(directory, **changes)
    with pytest.raises(SAEFormatError) as exc:
        load_sae(directory)
    one_line(exc, "sae_weights.safetensors", f": {field}: ", needle)


def test_w_dec_is_not_required(tmp_path: Path) -> None:
    directory = write_default(tmp_path)
    replace_weights(directory, W_dec=...)
    assert isinstance(load_sae(directory), SAE)


def test_errors_are_value_errors() -> None:
    assert issubclass(SAEFormatError, FeatureError) and issubclass(FeatureError, ValueError)
