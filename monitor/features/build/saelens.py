"""SAELens SAE directories: ``cfg.json`` (v6 nested or pre-6 flat) + ``sae_weights.safetensors``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from monitor.features.build._io import (
    as_bool,
    optional_str,
    positive_int,
    read_json,
    read_safetensors,
    take,
)
from monitor.features.build.sae import SAE
from monitor.features.errors import FeatureError, SAEFormatError
from monitor.hookpoints import canonical_hook_point

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SUPPORTED_ARCHITECTURES = ("standard", "jumprelu", "topk", "gated")
# Training-time architectures: SAELens saves them as jumprelu for inference.
TRAINING_ONLY = ("batchtopk", "matryoshka_batchtopk")
NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")


@dataclass
class SAELensConfig:
    """The fields of cfg.json the encode depends on, whatever the SAELens version."""

    architecture: str
    d_in: int
    d_sae: int
    apply_b_dec_to_input: bool
    normalize_activations: str
    hook_point: str | None
    neuronpedia_id: str | None
    k: int | None
    rescale_acts_by_decoder_norm: bool


def load_saelens(directory: Path) -> SAE:
    """Load a SAELens SAE directory."""
    if not directory.is_dir():
        raise SAEFormatError("not a directory (expected a SAELens SAE directory)", where=directory)
    cfg_path = directory / CFG_FILE
    cfg = parse_cfg(read_json(cfg_path), cfg_path)
    weights_path = directory / WEIGHTS_FILE
    tensors = _read_weights(weights_path, cfg)
    scale = None
    if cfg.rescale_acts_by_decoder_norm:
        scale = tensors["W_dec"].norm(dim=-1)
    gated = cfg.architecture == "gated"
    return SAE(
        W_enc=tensors["W_enc"],
        b_enc=tensors["b_mag" if gated else "b_enc"],
        b_dec=tensors["b_dec"],
        threshold=tensors.get("threshold"),
        architecture=cfg.architecture,
        apply_b_dec_to_input=cfg.apply_b_dec_to_input,
        normalize_activations=cfg.normalize_activations,
        hook_point=cfg.hook_point,
        source=str(directory),
        neuronpedia_id=cfg.neuronpedia_id,
        k=cfg.k,
        latent_scale=scale,
        b_gate=tensors.get("b_gate"),
        r_mag=tensors.get("r_mag"),
        format="saelens",
    )


def parse_cfg(cfg: dict[str, Any], cfg_path: Path) -> SAELensConfig:
    """Read v6 (nested ``metadata``) and pre-6 (flat) SAELens configs into one shape."""
    metadata = cfg.get("metadata")
    is_v6 = metadata is not None
    if is_v6 and not isinstance(metadata, dict):
        raise SAEFormatError("expected a JSON object", where=cfg_path, field="metadata")
    meta: dict[str, Any] = metadata if is_v6 else cfg
    _reject_non_residual(cfg, meta, cfg_path)
    d_sae = positive_int(cfg, "d_sae", cfg_path)
    architecture = _architecture(cfg, cfg_path, is_v6)
    return SAELensConfig(
        architecture=architecture,
        d_in=positive_int(cfg, "d_in", cfg_path),
        d_sae=d_sae,
        apply_b_dec_to_input=as_bool(cfg, "apply_b_dec_to_input", cfg_path, default=True),
        normalize_activations=_normalization(cfg, cfg_path),
        hook_point=_hook_point(meta, cfg_path, is_v6),
        neuronpedia_id=optional_str(meta, "neuronpedia_id", cfg_path),
        k=_k(cfg, cfg_path, is_v6, d_sae) if architecture == "topk" else None,
        rescale_acts_by_decoder_norm=architecture == "topk"
        and as_bool(cfg, "rescale_acts_by_decoder_norm", cfg_path, default=False),
    )


def _architecture(cfg: dict[str, Any], cfg_path: Path, is_v6: bool) -> str:
    # v6 always writes `architecture`; pre-6 configs before JumpReLU support may omit it.
    if is_v6 and "architecture" not in cfg:
        raise SAEFormatError("missing", where=cfg_path, field="architecture")
    arch = cfg.get("architecture", "standard")
    field = "architecture"
    # Pre-6 standard SAEs chose their activation with activation_fn_str (relu / topk).
    activation = cfg.get("activation_fn_str")
    if not is_v6 and arch == "standard" and activation not in (None, "relu"):
        arch, field = activation, "activation_fn_str"
    if arch in SUPPORTED_ARCHITECTURES:
        return arch
    if arch in TRAINING_ONLY:
        raise SAEFormatError(
            f"{arch!r} is a training architecture; SAELens saves it as 'jumprelu' for inference",
            where=cfg_path,
            field=field,
        )
    raise SAEFormatError(
        f"unknown architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})",
        where=cfg_path,
        field=field,
    )


def _k(cfg: dict[str, Any], cfg_path: Path, is_v6: bool, d_sae: int) -> int:
    if is_v6 or "k" in cfg:
        k, field = positive_int(cfg, "k", cfg_path), "k"
    else:
        kwargs = cfg.get("activation_fn_kwargs")
        if not isinstance(kwargs, dict):
            raise SAEFormatError(
                "expected an object with k", where=cfg_path, field="activation_fn_kwargs"
            )
        field = "activation_fn_kwargs.k"
        k = positive_int(kwargs, "k", cfg_path, field=field)
    if k > d_sae:
        raise SAEFormatError(f"{k} exceeds d_sae {d_sae}", where=cfg_path, field=field)
    return k


def _reject_non_residual(cfg: dict[str, Any], meta: dict[str, Any], cfg_path: Path) -> None:
    # Per-head (hook_z) SAEs reshape their input; the sidecar only sees the residual stream.
    reshape = cfg.get("reshape_activations", "none")
    if reshape != "none":
        raise SAEFormatError(
            f"{reshape!r} is not supported (residual-stream SAEs only)",
            where=cfg_path,
            field="reshape_activations",
        )
    if meta.get("hook_head_index") is not None:
        raise SAEFormatError(
            "per-head SAEs are not supported (residual-stream SAEs only)",
            where=cfg_path,
            field="hook_head_index",
        )


def _hook_point(meta: dict[str, Any], cfg_path: Path, is_v6: bool) -> str | None:
    key = "hook_name" if "hook_name" in meta or is_v6 else "hook_point"
    field = f"metadata.{key}" if is_v6 else key
    name = optional_str(meta, key, cfg_path, field=field)
    if name is None:
        return None
    try:
        return canonical_hook_point(name)
    except FeatureError as exc:
        raise SAEFormatError(exc.detail, where=cfg_path, field=field) from None


def _normalization(cfg: dict[str, Any], cfg_path: Path) -> str:
    value = cfg.get("normalize_activations", "none")
    # Old pre-6 configs stored a boolean; False is unambiguous, True is not.
    if value is False or value is None:
        return "none"
    if value not in NORMALIZATIONS:
        raise SAEFormatError(
            f"{value!r}, expected one of {', '.join(NORMALIZATIONS)}",
            where=cfg_path,
            field="normalize_activations",
        )
    return value


def _read_weights(weights_path: Path, cfg: SAELensConfig) -> dict[str, torch.Tensor]:
    """Read only the encoder tensors, checking shape and finiteness against cfg."""
    d_in, d_sae = cfg.d_in, cfg.d_sae
    shapes: dict[str, tuple[int, ...]] = {"W_enc": (d_in, d_sae), "b_dec": (d_in,)}
    if cfg.architecture == "gated":
        shapes.update(b_gate=(d_sae,), b_mag=(d_sae,), r_mag=(d_sae,))
    else:
        shapes["b_enc"] = (d_sae,)
    if cfg.architecture == "jumprelu":
        shapes["threshold"] = (d_sae,)
    if cfg.rescale_acts_by_decoder_norm:
        shapes["W_dec"] = (d_sae, d_in)
    raw = read_safetensors(weights_path, list(shapes))
    return {name: take(raw, name, shape, weights_path) for name, shape in shapes.items()}
