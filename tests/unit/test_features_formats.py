"""Every supported SAE format: detection, each library's reference encode (checked against an
independent transcription of that library's math, read straight from the files), restricted
encoders against the reference columns, and bad input."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from monitor.features import FeatureError, SAEFormatError, TopKExactEncoder
from monitor.features.build import build_pack_from_sae, detect_format, load_sae
from monitor.fixtures import (
    openai_state,
    write_dictionary_learning,
    write_gemma_scope,
    write_gemma_scope_2,
    write_openai,
    write_saelens_sae,
    write_sparsify,
)

D_IN, D_SAE, K, ROWS = 32, 64, 6, 41
INDICES = [3, 60, 0, 17, 41, 9]


def activations(dtype: torch.dtype = torch.float32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (2.0 * torch.randn(ROWS, D_IN, generator=g) + 0.3).to(dtype)


# --- independent reference implementations (transcribed from each library) -----------------


def _saelens_norm(x: torch.Tensor, cfg: dict[str, Any]) -> torch.Tensor:
    norm = cfg.get("normalize_activations")
    if norm == "constant_norm_rescale":
        return x * ((cfg["d_in"] ** 0.5) / x.norm(dim=-1, keepdim=True))
    if norm == "layer_norm":
        mu = x.mean(-1, keepdim=True)
        return (x - mu) / (x.std(-1, keepdim=True) + 1e-5)
    return x


def ref_saelens(directory: Path, x: torch.Tensor) -> torch.Tensor:
    cfg = json.loads((directory / "cfg.json").read_text())
    w = load_file(str(directory / "sae_weights.safetensors"))
    sae_in = _saelens_norm(x.float(), cfg)
    if cfg.get("apply_b_dec_to_input", True):
        sae_in = sae_in - w["b_dec"]
    if cfg["architecture"] == "gated":
        active = (sae_in @ w["W_enc"] + w["b_gate"] > 0).float()
        magnitude = F.relu(sae_in @ (w["W_enc"] * w["r_mag"].exp()) + w["b_mag"])
        return active * magnitude
    hidden_pre = sae_in @ w["W_enc"] + w["b_enc"]
    topk = cfg.get("k") or cfg.get("activation_fn_kwargs", {}).get("k")
    if cfg["architecture"] == "topk" or cfg.get("activation_fn_str") == "topk":
        if cfg.get("rescale_acts_by_decoder_norm"):
            hidden_pre = hidden_pre * w["W_dec"].norm(dim=-1)
        values, indices = torch.topk(hidden_pre, k=topk, dim=-1, sorted=False)
        return torch.zeros_like(hidden_pre).scatter(-1, indices, values.relu())
    if cfg["architecture"] == "jumprelu":
        return F.relu(hidden_pre) * (hidden_pre > w["threshold"])
    return F.relu(hidden_pre)


def ref_gemma_scope(directory: Path, x: torch.Tensor) -> torch.Tensor:
    p = {k: torch.from_numpy(v) for k, v in np.load(directory / "params.npz").items()}
    pre_acts = x.float() @ p["W_enc"] + p["b_enc"]
    return (pre_acts > p["threshold"]) * F.relu(pre_acts)


def ref_gemma_scope_2(directory: Path, x: torch.Tensor) -> torch.Tensor:
    p = load_file(str(directory / "params.safetensors"))
    pre_acts = x.float() @ p["w_enc"] + p["b_enc"]
    return (pre_acts > p["threshold"]) * F.relu(pre_acts)


def ref_sparsify(directory: Path, x: torch.Tensor) -> torch.Tensor:
    cfg = json.loads((directory / "cfg.json").read_text())
    p = load_file(str(directory / "sae.safetensors"))
    sae_in = x.float() - p["b_dec"]
    pre_acts = F.relu(F.linear(sae_in, p["encoder.weight"], p["encoder.bias"]))
    top_acts, top_indices = pre_acts.topk(cfg["k"], sorted=False)
    return torch.zeros_like(pre_acts).scatter(-1, top_indices, top_acts)


def ref_dictionary_learning(directory: Path, x: torch.Tensor) -> torch.Tensor:
    dict_class = json.loads((directory / "config.json").read_text())["trainer"]["dict_class"]
    sd = torch.load(directory / "ae.pt", weights_only=True)
    x = x.float()
    if dict_class == "AutoEncoder":
        return F.relu(F.linear(x - sd["bias"], sd["encoder.weight"], sd["encoder.bias"]))
    if dict_class == "JumpReluAutoEncoder":
        pre_jump = x @ sd["W_enc"] + sd["b_enc"]
        return F.relu(pre_jump * (pre_jump > sd["threshold"]))
    post_relu = F.relu(F.linear(x - sd["b_dec"], sd["encoder.weight"], sd["encoder.bias"]))
    if dict_class == "BatchTopKSAE":  # encode(use_threshold=True), the inference default
        return post_relu * (post_relu > sd["threshold"])
    top = post_relu.topk(int(sd["k"]), sorted=False, dim=-1)
    return torch.zeros_like(post_relu).scatter_(-1, top.indices, top.values)


def ref_openai(path: Path, x: torch.Tensor) -> torch.Tensor:
    sd = torch.load(path, weights_only=True)
    x = x.float()
    if sd["activation"] == "TopK":  # LN preprocessing, as Autoencoder.from_state_dict enables
        mu = x.mean(dim=-1, keepdim=True)
        x = x - mu
        x = x / (x.std(dim=-1, keepdim=True) + 1e-5)
    latents_pre_act = F.linear(x - sd["pre_bias"], sd["encoder.weight"], sd["latent_bias"])
    if sd["activation"] != "TopK":
        return F.relu(latents_pre_act)
    topk = torch.topk(latents_pre_act, k=sd["activation_state_dict"]["k"], dim=-1)
    return torch.zeros_like(latents_pre_act).scatter_(-1, topk.indices, F.relu(topk.values))


# --- cases ----------------------------------------------------------------------------------


Case = tuple[str, Callable[[Path], Path], Callable[[Path, torch.Tensor], torch.Tensor], str]


def _saelens(arch: str, v6: bool = True, **kw: Any) -> Callable[[Path], Path]:
    return lambda tmp: write_saelens_sae(
        tmp / "sae", D_IN, D_SAE, architecture=arch, v6=v6, k=K, **kw
    )


CASES: dict[str, Case] = {
    "saelens-standard": ("saelens", _saelens("standard"), ref_saelens, "relu"),
    "saelens-jumprelu-pre6": ("saelens", _saelens("jumprelu", v6=False), ref_saelens, "jumprelu"),
    "saelens-gated": (
        "saelens",
        _saelens("gated", normalize_activations="layer_norm"),
        ref_saelens,
        "gated",
    ),
    "saelens-gated-pre6": ("saelens", _saelens("gated", v6=False), ref_saelens, "gated"),
    "saelens-topk": ("saelens", _saelens("topk"), ref_saelens, "topk"),
    "saelens-topk-rescale": (
        "saelens",
        _saelens(
            "topk", rescale_acts_by_decoder_norm=True, normalize_activations="constant_norm_rescale"
        ),
        ref_saelens,
        "topk",
    ),
    "saelens-topk-pre6": ("saelens", _saelens("topk", v6=False), ref_saelens, "topk"),
    "gemma-scope": (
        "gemma-scope",
        lambda tmp: write_gemma_scope(tmp, D_IN, D_SAE, layer=5),
        ref_gemma_scope,
        "jumprelu",
    ),
    "gemma-scope-2": (
        "gemma-scope-2",
        lambda tmp: write_gemma_scope_2(tmp / "gs2", D_IN, D_SAE, layer=5),
        ref_gemma_scope_2,
        "jumprelu",
    ),
    "sparsify": (
        "sparsify",
        lambda tmp: write_sparsify(tmp / "ckpt", D_IN, D_SAE // D_IN, K, "layers.6"),
        ref_sparsify,
        "topk",
    ),
    **{
        f"dictionary-learning-{cls}": (
            "dictionary-learning",
            (lambda c: lambda tmp: write_dictionary_learning(tmp / "dl", c, D_IN, D_SAE, k=K))(cls),
            ref_dictionary_learning,
            arch,
        )
        for cls, arch in [
            ("AutoEncoder", "relu"),
            ("JumpReluAutoEncoder", "jumprelu"),
            ("AutoEncoderTopK", "topk"),
            ("BatchTopKSAE", "jumprelu"),
        ]
    },
    "openai-topk": (
        "openai",
        lambda tmp: write_openai(
            tmp / "resid_post_mlp_v5_32k" / "autoencoders" / "4.pt", D_IN, D_SAE, K
        ),
        ref_openai,
        "topk",
    ),
    "openai-relu": (
        "openai",
        lambda tmp: write_openai(tmp / "ae.v1.pt", D_IN, D_SAE, None),
        ref_openai,
        "relu",
    ),
}
EXPECTED_HOOK = {"gemma-scope": "layers.5", "gemma-scope-2": "layers.5", "sparsify": "layers.6"}


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = max(float(expected.abs().max()), 1.0)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("case", list(CASES))
def test_reference_encode_matches_library(tmp_path: Path, case: str) -> None:
    format, write, reference, _ = CASES[case]
    path = write(tmp_path)
    assert detect_format(path) == format
    sae = load_sae(path)
    assert sae.format == format and (sae.d_in, sae.d_sae) == (D_IN, D_SAE)
    assert sae.W_enc.dtype == torch.float32
    if format in EXPECTED_HOOK:
        assert sae.hook_point == EXPECTED_HOOK[format]
    x = activations()
    out = sae.encode(x)
    expected = reference(path, x)
    assert_close_scaled(out, expected)
    # The fixture must exercise both sides of the activation, or the test proves little.
    assert 0 < int((expected > 0).sum()) < expected.numel()
    if sae.is_topk:
        assert ((expected > 0).sum(dim=1) <= K).all()


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_restricted_matches_reference_columns(
    tmp_path: Path, case: str, dtype: torch.dtype
) -> None:
    _, write, reference, _ = CASES[case]
    path = write(tmp_path)
    sae = load_sae(path)
    x = activations(dtype)
    expected = reference(path, x)[:, INDICES]
    encoder = sae.restrict(INDICES, topk_mode="exact" if sae.is_topk else None)
    assert isinstance(encoder, TopKExactEncoder) == sae.is_topk
    out = encoder.encode(x)
    assert out.dtype == torch.float32 and out.shape == (ROWS, len(INDICES))
    assert_close_scaled(out, expected)


@pytest.mark.parametrize("case", list(CASES))
def test_pack_from_every_format(tmp_path: Path, case: str) -> None:
    _, write, reference, activation = CASES[case]
    path = write(tmp_path)
    sae = load_sae(path)
    mode = "exact" if sae.is_topk else None
    pack = build_pack_from_sae(sae, INDICES, "p", hook_point="layers.2", topk_mode=mode)
    features = pack.hook_points["layers.2"].features
    assert [f.sae_index for f in features] == INDICES
    assert {f.activation for f in features} == {"jumprelu" if activation == "gated" else activation}
    x = activations(torch.bfloat16)
    assert_close_scaled(pack.encode("layers.2", x), reference(path, x)[:, INDICES])


def test_topk_needs_a_mode(tmp_path: Path) -> None:
    sae = load_sae(_saelens("topk")(tmp_path))
    with pytest.raises(FeatureError) as exc:
        sae.restrict([1, 2])
    assert "topk_mode" in str(exc.value) and "not" in str(exc.value)


def test_explicit_format_overrides_detection(tmp_path: Path) -> None:
    path = write_openai(tmp_path / "weights.pt", D_IN, D_SAE, K)
    assert detect_format(path) == "openai"
    with pytest.raises(SAEFormatError) as exc:
        load_sae(path, format="dictionary-learning")  # no config.json beside it
    assert "config.json" in str(exc.value)
    with pytest.raises(SAEFormatError) as exc:
        load_sae(path, format="wibble")
    assert ": format: " in str(exc.value)


def test_gemma_scope_neuronpedia_id(tmp_path: Path) -> None:
    sae = load_sae(write_gemma_scope(tmp_path, D_IN, 16384 // 256, layer=12) / "params.npz")
    assert sae.hook_point == "layers.12"
    assert sae.neuronpedia_id == "gemma-2-2b/12-gemmascope-res-0k"


def test_sparsify_checkpoint_root_with_one_hookpoint(tmp_path: Path) -> None:
    write_sparsify(tmp_path / "ckpt", D_IN, 2, K, "layers.3")
    assert load_sae(tmp_path / "ckpt").hook_point == "layers.3"


# --- bad input ------------------------------------------------------------------------------


def one_line(exc: pytest.ExceptionInfo[FeatureError], *needles: str) -> None:
    message = str(exc.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00junk" * 9}[how])


@pytest.mark.parametrize("how", ["truncate", "garbage"])
@pytest.mark.parametrize(
    ("case", "file", "needle"),
    [
        ("gemma-scope", "params.npz", "corrupt"),
        ("gemma-scope-2", "params.safetensors", "corrupt"),
        ("sparsify", "sae.safetensors", "corrupt"),
        ("dictionary-learning-AutoEncoder", "ae.pt", "corrupt"),
        ("openai-topk", "", "corrupt"),
    ],
)
def test_corrupt_weights(tmp_path: Path, how: str, case: str, file: str, needle: str) -> None:
    path = CASES[case][1](tmp_path)
    target = path / file if file else path
    _damage(target, how)
    with pytest.raises(SAEFormatError) as exc:
        load_sae(path, format=CASES[case][0])
    one_line(exc, target.name, needle)


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (print, ("unpickled!",))

    state: dict[str, Any] = dict(openai_state(D_IN, D_SAE))
    state["activation"] = Evil()
    path = tmp_path / "evil.pt"
    torch.save(state, path)
    with pytest.raises(SAEFormatError) as exc:
        load_sae(path)
    one_line(exc, "evil.pt", "weights-only")


def _edit_json(path: Path, **changes: Any) -> None:
    document = json.loads(path.read_text())
    target = document.get("trainer", document)
    target.update(changes)
    path.write_text(json.dumps(document))


@pytest.mark.parametrize(
    ("case", "edit", "field", "needle"),
    [
        ("gemma-scope-2", {"width": 99}, "w_enc", "width is 99"),
        ("gemma-scope-2", {"architecture": "topk"}, "architecture", "unknown architecture"),
        ("gemma-scope-2", {"type": "transcoder"}, "type", "residual"),
        (
            "gemma-scope-2",
            {"hf_hook_point_in": "model.layers.5.mlp.output"},
            "hf_hook_point_in",
            "mlp",
        ),
        ("sparsify", {"activation": "groupmax"}, "activation", "topk only"),
        ("sparsify", {"transcode": True}, "transcode", "MLP input"),
        ("sparsify", {"k": 0}, "k", "positive integer"),
        ("sparsify", {"expansion_factor": 3}, "encoder.weight", "96 latents"),
        ("sparsify", {"d_in": 31}, "encoder.weight", "d_in 31"),
        (
            "dictionary-learning-AutoEncoder",
            {"dict_class": "GatedSAE"},
            "trainer.dict_class",
            "unknown architecture",
        ),
        ("dictionary-learning-AutoEncoder", {"dict_size": 65}, "encoder.weight", "[65, 32]"),
        (
            "dictionary-learning-AutoEncoderTopK",
            {"submodule_name": "mlp_out_layer_3"},
            "trainer.submodule_name",
            "residual",
        ),
    ],
)
def test_bad_config(
    tmp_path: Path, case: str, edit: dict[str, Any], field: str, needle: str
) -> None:
    path = CASES[case][1](tmp_path)
    cfg = next(p for p in (path / "config.json", path / "cfg.json") if p.is_file())
    _edit_json(cfg, **edit)
    with pytest.raises(SAEFormatError) as exc:
        load_sae(path)
    one_line(exc, f": {field}: ", needle)


@pytest.mark.parametrize(
    ("case", "file", "tensor", "value", "needle"),
    [
        (
            "gemma-scope-2",
            "params.safetensors",
            "threshold",
            torch.zeros(D_SAE + 1),
            f"[{D_SAE + 1}]",
        ),
        (
            "gemma-scope-2",
            "params.safetensors",
            "w_enc",
            torch.full((D_IN, D_SAE), math.nan),
            "NaN",
        ),
        ("gemma-scope-2", "params.safetensors", "b_dec", ..., "missing tensor"),
        ("sparsify", "sae.safetensors", "encoder.bias", torch.full((D_SAE,), math.inf), "Inf"),
        (
            "gemma-scope",
            "params.npz",
            "b_enc",
            np.zeros(D_SAE + 2, dtype=np.float32),
            f"[{D_SAE + 2}]",
        ),
        ("gemma-scope", "params.npz", "threshold", ..., "missing tensor"),
        (
            "dictionary-learning-JumpReluAutoEncoder",
            "ae.pt",
            "threshold",
            torch.full((D_SAE,), math.nan),
            "NaN",
        ),
        ("dictionary-learning-BatchTopKSAE", "ae.pt", "threshold", ..., "missing tensor"),
        ("openai-topk", "", "latent_bias", torch.zeros(3), "[3]"),
        ("openai-topk", "", "activation", "Sigmoid", "unknown architecture"),
        (
            "openai-topk",
            "",
            "activation_state_dict",
            {"k": D_SAE + 1, "postact_fn": "ReLU"},
            "exceeds",
        ),
    ],
)
def test_bad_tensors(
    tmp_path: Path, case: str, file: str, tensor: str, value: Any, needle: str
) -> None:
    path = CASES[case][1](tmp_path)
    target = path / file if file else path
    if target.suffix == ".safetensors":
        tensors = load_file(str(target))
        _apply(tensors, tensor, value)
        save_file(tensors, str(target))
    elif target.suffix == ".npz":
        arrays = dict(np.load(target))
        _apply(arrays, tensor, value)
        np.savez(target, **arrays)
    else:
        state = torch.load(target, weights_only=True)
        _apply(state, tensor, value)
        torch.save(state, target)
    with pytest.raises(SAEFormatError) as exc:
        load_sae(path)
    one_line(exc, target.name, f": {tensor}", needle)


def _apply(mapping: dict[str, Any], key: str, value: Any) -> None:
    if value is ...:
        del mapping[key]
    else:
        mapping[key] = value


def test_sparsify_root_with_several_hookpoints(tmp_path: Path) -> None:
    write_sparsify(tmp_path / "ckpt", D_IN, 2, K, "layers.3")
    write_sparsify(tmp_path / "ckpt", D_IN, 2, K, "layers.4")
    with pytest.raises(SAEFormatError) as exc:
        load_sae(tmp_path / "ckpt")
    one_line(exc, "2 hookpoints", "layers.3, layers.4")


def test_sparsify_non_residual_hookpoint(tmp_path: Path) -> None:
    directory = write_sparsify(tmp_path / "ckpt", D_IN, 2, K, "embed_tokens")
    with pytest.raises(SAEFormatError) as exc:
        load_sae(directory)
    one_line(exc, "embed_tokens")


def test_unknown_directory(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    with pytest.raises(SAEFormatError) as exc:
        load_sae(tmp_path / "x")
    one_line(exc, "known SAE format")


@pytest.mark.parametrize("indices", [[D_SAE], [2, 2]])
def test_topk_modes_validate_indices(tmp_path: Path, indices: list[int]) -> None:
    sae = load_sae(CASES["sparsify"][1](tmp_path))
    for mode in ("exact", "approx"):
        with pytest.raises(FeatureError) as exc:
            sae.restrict(indices, topk_mode=mode)
        one_line(exc, "indices")
