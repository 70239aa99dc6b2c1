"""Loaders for the non-SAELens formats: Gemma Scope 1 and 2, EleutherAI sparsify,
saprmarks/dictionary_learning and OpenAI sparse_autoencoder.

Each maps its library's tensors onto :class:`SAE` so that ``SAE.encode`` is that library's
math: which bias is subtracted, whether inputs are layer-normed, ReLU before or after TopK.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from monitor.features.build._io import (
    as_bool,
    optional_str,
    positive_int,
    read_json,
    read_npz,
    read_safetensors,
    read_state_dict,
    take,
)
from monitor.features.build.sae import SAE
from monitor.features.errors import FeatureError, SAEFormatError
from monitor.hookpoints import canonical_hook_point, hook_point_name

_LAYER_DIR = re.compile(r"layer_(\d+)")
_GEMMA_SCOPE_RELEASE = re.compile(r"gemma-scope-(2b|9b|27b)-pt-res(?:-canonical)?")
_NON_RESIDUAL = re.compile(r"(att|mlp|transcoder)", re.IGNORECASE)


def _file_in(path: Path, name: str) -> tuple[Path, Path]:
    """``(directory, file)`` for a path naming either the directory or the file itself."""
    if path.is_dir():
        return path, path / name
    return path.parent, path


def _shape_of(tensors: dict[str, Any], name: str, ndim: int, path: Path) -> tuple[int, ...]:
    tensor = tensors.get(name)
    if not isinstance(tensor, torch.Tensor):
        raise SAEFormatError("missing tensor", where=path, field=name)
    if tensor.ndim != ndim:
        raise SAEFormatError(f"expected {ndim}-d, got {list(tensor.shape)}", where=path, field=name)
    return tuple(tensor.shape)


def _canonical(name: str, path: Path, field: str) -> str:
    try:
        return canonical_hook_point(name)
    except FeatureError as exc:
        raise SAEFormatError(exc.detail, where=path, field=field) from None


# --- Gemma Scope 1 -------------------------------------------------------------------------


def load_gemma_scope(path: Path) -> SAE:
    """``params.npz`` (JumpReLU; no ``b_dec`` subtraction; hook point from ``layer_<L>``)."""
    _, npz = _file_in(path, "params.npz")
    tensors = read_npz(npz)
    d_in, d_sae = _shape_of(tensors, "W_enc", 2, npz)
    return SAE(
        W_enc=take(tensors, "W_enc", (d_in, d_sae), npz),
        b_enc=take(tensors, "b_enc", (d_sae,), npz),
        b_dec=take(tensors, "b_dec", (d_in,), npz),
        threshold=take(tensors, "threshold", (d_sae,), npz),
        architecture="jumprelu",
        apply_b_dec_to_input=False,
        normalize_activations="none",
        hook_point=_gemma_scope_hook_point(npz),
        source=str(npz),
        neuronpedia_id=_gemma_scope_neuronpedia(npz, d_sae),
        format="gemma-scope",
    )


def _gemma_scope_hook_point(npz: Path) -> str | None:
    # Releases are laid out as <release>/layer_<L>/width_<W>/average_l0_<N>/params.npz;
    # residual SAEs at layer L read the output of model.layers[L].
    parts = npz.parts
    if any(_NON_RESIDUAL.search(p) for p in parts):
        return None
    layers = [m.group(1) for p in parts if (m := _LAYER_DIR.fullmatch(p))]
    return hook_point_name(int(layers[-1])) if layers else None


def _gemma_scope_neuronpedia(npz: Path, d_sae: int) -> str | None:
    releases = [m.group(1) for p in npz.parts if (m := _GEMMA_SCOPE_RELEASE.fullmatch(p))]
    hook_point = _gemma_scope_hook_point(npz)
    if not releases or hook_point is None:
        return None
    layer = hook_point.split(".")[1]
    return f"gemma-2-{releases[-1]}/{layer}-gemmascope-res-{d_sae // 1024}k"


# --- Gemma Scope 2 -------------------------------------------------------------------------


def load_gemma_scope_2(path: Path) -> SAE:
    """``config.json`` + ``params.safetensors`` with lowercase ``w_enc`` (JumpReLU, no b_dec)."""
    directory, weights = _file_in(path, "params.safetensors")
    cfg_path = directory / "config.json"
    cfg = read_json(cfg_path)
    _check_gemma_scope_2_cfg(cfg, cfg_path)
    raw = read_safetensors(weights, ["w_enc", "b_enc", "b_dec", "threshold"])
    d_in, d_sae = _shape_of(raw, "w_enc", 2, weights)
    if "width" in cfg and positive_int(cfg, "width", cfg_path) != d_sae:
        raise SAEFormatError(
            f"w_enc has {d_sae} latents, config.json width is {cfg['width']}",
            where=weights,
            field="w_enc",
        )
    hook = optional_str(cfg, "hf_hook_point_in", cfg_path)
    return SAE(
        W_enc=take(raw, "w_enc", (d_in, d_sae), weights),
        b_enc=take(raw, "b_enc", (d_sae,), weights),
        b_dec=take(raw, "b_dec", (d_in,), weights),
        threshold=take(raw, "threshold", (d_sae,), weights),
        architecture="jumprelu",
        apply_b_dec_to_input=False,
        normalize_activations="none",
        # 'model.layers.<L>.output' is the output of decoder layer L.
        hook_point=None
        if hook is None
        else _canonical(hook.removesuffix(".output"), cfg_path, "hf_hook_point_in"),
        source=str(directory),
        neuronpedia_id=None,
        format="gemma-scope-2",
    )


def _check_gemma_scope_2_cfg(cfg: dict[str, Any], cfg_path: Path) -> None:
    architecture = cfg.get("architecture", "jump_relu")
    if architecture not in ("jump_relu", "jumprelu"):
        raise SAEFormatError(
            f"unknown architecture {architecture!r} (Gemma Scope 2 SAEs are jump_relu)",
            where=cfg_path,
            field="architecture",
        )
    kind = cfg.get("type", "sae")
    if kind != "sae":
        raise SAEFormatError(
            f"{kind!r} is not supported (residual-stream SAEs only)", where=cfg_path, field="type"
        )


# --- EleutherAI sparsify -------------------------------------------------------------------


def load_sparsify(path: Path) -> SAE:
    """A sparsify hookpoint directory (``cfg.json`` + ``sae.safetensors``): ReLU, then TopK."""
    directory = _sparsify_hookpoint_dir(path)
    cfg_path = directory / "cfg.json"
    cfg = read_json(cfg_path)
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise SAEFormatError(
            f"activation {activation!r} is not supported (topk only)",
            where=cfg_path,
            field="activation",
        )
    if as_bool(cfg, "transcode", cfg_path, default=False):
        raise SAEFormatError(
            "transcoders read the MLP input, not the residual stream",
            where=cfg_path,
            field="transcode",
        )
    weights = directory / "sae.safetensors"
    raw = read_safetensors(weights, ["encoder.weight", "encoder.bias", "b_dec"])
    d_sae, d_in = _sparsify_sizes(cfg, cfg_path, raw, weights)
    k = positive_int(cfg, "k", cfg_path)
    if k > d_sae:
        raise SAEFormatError(f"{k} exceeds num_latents {d_sae}", where=cfg_path, field="k")
    return SAE(
        W_enc=take(raw, "encoder.weight", (d_sae, d_in), weights).T.contiguous(),
        b_enc=take(raw, "encoder.bias", (d_sae,), weights),
        b_dec=take(raw, "b_dec", (d_in,), weights),
        threshold=None,
        architecture="topk",
        apply_b_dec_to_input=True,
        normalize_activations="none",
        hook_point=_canonical(directory.name, directory, "hookpoint"),
        source=str(directory),
        neuronpedia_id=None,
        k=k,
        relu_before_topk=True,
        format="sparsify",
    )


def _sparsify_hookpoint_dir(path: Path) -> Path:
    if (path / "sae.safetensors").is_file() or (path / "cfg.json").is_file():
        return path
    hookpoints = sorted(
        c.name for c in path.iterdir() if c.is_dir() and (c / "sae.safetensors").is_file()
    )
    if len(hookpoints) == 1:
        return path / hookpoints[0]
    raise SAEFormatError(
        f"a sparsify checkpoint with {len(hookpoints)} hookpoints "
        f"({', '.join(hookpoints) or 'none'}): pass one hookpoint directory",
        where=path,
        field="hookpoint",
    )


def _sparsify_sizes(
    cfg: dict[str, Any], cfg_path: Path, raw: dict[str, torch.Tensor], weights: Path
) -> tuple[int, int]:
    d_sae, d_in = _shape_of(raw, "encoder.weight", 2, weights)
    if "d_in" in cfg and positive_int(cfg, "d_in", cfg_path) != d_in:
        raise SAEFormatError(
            f"cfg.json d_in {cfg['d_in']} but encoder.weight is {[d_sae, d_in]}",
            where=weights,
            field="encoder.weight",
        )
    # num_latents 0 means d_in * expansion_factor.
    num_latents = cfg.get("num_latents") or d_in * cfg.get("expansion_factor", 0)
    if num_latents != d_sae:
        raise SAEFormatError(
            f"cfg.json gives {num_latents} latents but encoder.weight is {[d_sae, d_in]}",
            where=weights,
            field="encoder.weight",
        )
    return d_sae, d_in


# --- saprmarks/dictionary_learning ---------------------------------------------------------


DICT_CLASSES = ("AutoEncoder", "JumpReluAutoEncoder", "AutoEncoderTopK", "BatchTopKSAE")


def load_dictionary_learning(path: Path) -> SAE:
    """``ae.pt`` + ``config.json`` (``trainer.dict_class`` picks the encode)."""
    directory, weights = _file_in(path, "ae.pt")
    cfg_path = directory / "config.json"
    trainer = read_json(cfg_path).get("trainer")
    if not isinstance(trainer, dict):
        raise SAEFormatError("missing or not an object", where=cfg_path, field="trainer")
    dict_class = trainer.get("dict_class")
    if dict_class not in DICT_CLASSES:
        raise SAEFormatError(
            f"unknown architecture {dict_class!r} (supported: {', '.join(DICT_CLASSES)})",
            where=cfg_path,
            field="trainer.dict_class",
        )
    d_in = positive_int(trainer, "activation_dim", cfg_path, "trainer.activation_dim")
    d_sae = positive_int(trainer, "dict_size", cfg_path, "trainer.dict_size")
    state = read_state_dict(weights)
    fields = _DICT_LOADERS[dict_class](state, d_in, d_sae, weights)
    return SAE(
        **fields,
        normalize_activations="none",
        hook_point=_dictionary_hook_point(trainer, cfg_path),
        source=str(directory),
        neuronpedia_id=None,
        format="dictionary-learning",
    )


def _dict_autoencoder(state: dict[str, Any], d_in: int, d_sae: int, path: Path) -> dict[str, Any]:
    # relu(encoder(x - bias)), encoder an nn.Linear [dict_size, activation_dim].
    return {
        "W_enc": take(state, "encoder.weight", (d_sae, d_in), path).T.contiguous(),
        "b_enc": take(state, "encoder.bias", (d_sae,), path),
        "b_dec": take(state, "bias", (d_in,), path),
        "threshold": None,
        "architecture": "standard",
        "apply_b_dec_to_input": True,
    }


def _dict_jumprelu(state: dict[str, Any], d_in: int, d_sae: int, path: Path) -> dict[str, Any]:
    # relu(pre * (pre > threshold)) with pre = x @ W_enc + b_enc: no b_dec subtraction.
    return {
        "W_enc": take(state, "W_enc", (d_in, d_sae), path),
        "b_enc": take(state, "b_enc", (d_sae,), path),
        "b_dec": take(state, "b_dec", (d_in,), path),
        "threshold": take(state, "threshold", (d_sae,), path),
        "architecture": "jumprelu",
        "apply_b_dec_to_input": False,
    }


def _dict_topk(state: dict[str, Any], d_in: int, d_sae: int, path: Path) -> dict[str, Any]:
    # relu(encoder(x - b_dec)), then TopK of the post-ReLU values.
    k = positive_int(state, "k", path)
    if k > d_sae:
        raise SAEFormatError(f"{k} exceeds dict_size {d_sae}", where=path, field="k")
    return {**_dict_linear(state, d_in, d_sae, path), "architecture": "topk", "k": k}


def _dict_batch_topk(state: dict[str, Any], d_in: int, d_sae: int, path: Path) -> dict[str, Any]:
    # Inference uses the learned global threshold: post_relu * (post_relu > threshold), which
    # is relu(h) * (h > threshold) for any threshold: a JumpReLU with one shared threshold.
    threshold = take(state, "threshold", (), path)
    return {
        **_dict_linear(state, d_in, d_sae, path),
        "architecture": "jumprelu",
        "threshold": threshold.expand(d_sae).contiguous(),
    }


def _dict_linear(state: dict[str, Any], d_in: int, d_sae: int, path: Path) -> dict[str, Any]:
    return {
        "W_enc": take(state, "encoder.weight", (d_sae, d_in), path).T.contiguous(),
        "b_enc": take(state, "encoder.bias", (d_sae,), path),
        "b_dec": take(state, "b_dec", (d_in,), path),
        "threshold": None,
        "apply_b_dec_to_input": True,
        "relu_before_topk": True,
    }


_DICT_LOADERS = {
    "AutoEncoder": _dict_autoencoder,
    "JumpReluAutoEncoder": _dict_jumprelu,
    "AutoEncoderTopK": _dict_topk,
    "BatchTopKSAE": _dict_batch_topk,
}


def _dictionary_hook_point(trainer: dict[str, Any], cfg_path: Path) -> str | None:
    submodule = trainer.get("submodule_name") or ""
    if not isinstance(submodule, str) or _NON_RESIDUAL.search(submodule):
        raise SAEFormatError(
            f"{submodule!r} is not supported (residual-stream SAEs only)",
            where=cfg_path,
            field="trainer.submodule_name",
        )
    layer = trainer.get("layer")
    if layer is None:
        return None
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise SAEFormatError(
            f"expected a layer index, got {layer!r}", where=cfg_path, field="trainer.layer"
        )
    return hook_point_name(layer)


# --- OpenAI sparse_autoencoder -------------------------------------------------------------


def load_openai(path: Path) -> SAE:
    """An OpenAI ``Autoencoder`` state dict: layer-norm (TopK models), ``x - pre_bias``,
    ``encoder.weight`` (no bias) + ``latent_bias``, TopK of raw values, then ReLU."""
    state = read_state_dict(path)
    d_sae, d_in = _shape_of(state, "encoder.weight", 2, path)
    activation = state.get("activation", "ReLU")
    if activation not in ("ReLU", "TopK"):
        raise SAEFormatError(
            f"unknown architecture {activation!r} (supported: ReLU, TopK)",
            where=path,
            field="activation",
        )
    k = _openai_k(state, path, d_sae) if activation == "TopK" else None
    return SAE(
        W_enc=take(state, "encoder.weight", (d_sae, d_in), path).T.contiguous(),
        b_enc=take(state, "latent_bias", (d_sae,), path),
        b_dec=take(state, "pre_bias", (d_in,), path),
        threshold=None,
        architecture="topk" if activation == "TopK" else "standard",
        apply_b_dec_to_input=True,
        # Autoencoder.from_state_dict enables its LN preprocessing exactly for TopK models.
        normalize_activations="layer_norm" if activation == "TopK" else "none",
        hook_point=_openai_hook_point(path),
        source=str(path),
        neuronpedia_id=None,
        k=k,
        format="openai",
    )


def _openai_k(state: dict[str, Any], path: Path, d_sae: int) -> int:
    sub = state.get("activation_state_dict")
    if not isinstance(sub, dict):
        raise SAEFormatError("missing (TopK needs k)", where=path, field="activation_state_dict")
    postact = sub.get("postact_fn", "ReLU")
    if postact != "ReLU":
        raise SAEFormatError(
            f"postact_fn {postact!r} is not supported (ReLU only)",
            where=path,
            field="activation_state_dict.postact_fn",
        )
    k = positive_int(sub, "k", path, "activation_state_dict.k")
    if k > d_sae:
        raise SAEFormatError(
            f"{k} exceeds n_latents {d_sae}", where=path, field="activation_state_dict.k"
        )
    return k


def _openai_hook_point(path: Path) -> str | None:
    # Released as .../resid_post_mlp_<version>/autoencoders/<layer>.pt: resid_post_mlp of
    # block L is the output of layer L. Other locations are not the residual stream.
    if not any("resid_post_mlp" in p for p in path.parts):
        return None
    match = re.fullmatch(r"(?:layer_)?(\d+)", path.stem)
    return hook_point_name(int(match.group(1))) if match else None
