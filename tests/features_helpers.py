"""Write tiny SAEs for tests, in every supported library's on-disk format (exact key names)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file


def write_saelens_sae(
    directory: Path,
    d_in: int,
    d_sae: int,
    *,
    architecture: str = "standard",
    apply_b_dec_to_input: bool = True,
    normalize_activations: str = "none",
    hook_name: str | None = "blocks.1.hook_resid_post",
    seed: int = 0,
    v6: bool = True,
    neuronpedia_id: str | None = None,
    k: int = 6,
    rescale_acts_by_decoder_norm: bool = False,
) -> Path:
    """A random SAE as SAELens saves it: ``cfg.json`` + ``sae_weights.safetensors``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(
        random_weights(d_in, d_sae, architecture=architecture, seed=seed),
        str(directory / "sae_weights.safetensors"),
    )
    make_cfg = v6_cfg if v6 else pre6_cfg
    cfg = make_cfg(
        d_in,
        d_sae,
        architecture=architecture,
        apply_b_dec_to_input=apply_b_dec_to_input,
        normalize_activations=normalize_activations,
        hook_name=hook_name,
        neuronpedia_id=neuronpedia_id,
    )
    if architecture == "topk" and v6:
        cfg.update(k=k, rescale_acts_by_decoder_norm=rescale_acts_by_decoder_norm)
    elif architecture == "topk":
        # Pre-6 SAELens: a 'standard' SAE whose activation function is topk.
        cfg.update(architecture="standard", activation_fn_str="topk")
        cfg["activation_fn_kwargs"] = {"k": k}
    (directory / "cfg.json").write_text(json.dumps(cfg, indent=2))
    return directory


def random_weights(
    d_in: int, d_sae: int, *, architecture: str = "standard", seed: int = 0
) -> dict[str, torch.Tensor]:
    """Weights at a realistic scale: pre-activations O(1), biases clearly nonzero."""
    generator = torch.Generator().manual_seed(seed)
    weights = {
        "W_enc": torch.randn(d_in, d_sae, generator=generator) / d_in**0.5,
        "W_dec": torch.randn(d_sae, d_in, generator=generator) / d_sae**0.5,
        "b_enc": torch.randn(d_sae, generator=generator) * 0.2,
        "b_dec": torch.randn(d_in, generator=generator) * 0.5,
    }
    if architecture == "jumprelu":
        # Small positive thresholds, so some activations land between 0 and the threshold.
        weights["threshold"] = 0.05 + 0.5 * torch.rand(d_sae, generator=generator)
    if architecture == "gated":
        # SAELens GatedSAE: no b_enc; the gate and magnitude paths share W_enc.
        del weights["b_enc"]
        weights["b_gate"] = torch.randn(d_sae, generator=generator) * 0.3
        weights["b_mag"] = torch.randn(d_sae, generator=generator) * 0.3
        weights["r_mag"] = torch.randn(d_sae, generator=generator) * 0.3
    return weights


def v6_cfg(
    d_in: int,
    d_sae: int,
    *,
    architecture: str,
    apply_b_dec_to_input: bool,
    normalize_activations: str,
    hook_name: str | None,
    neuronpedia_id: str | None = None,
) -> dict[str, Any]:
    """cfg.json as SAELens >= 6 writes it (``SAEConfig.to_dict``)."""
    return {
        "architecture": architecture,
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": apply_b_dec_to_input,
        "normalize_activations": normalize_activations,
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": "6.5.0",
            "sae_lens_training_version": "6.5.0",
            "model_name": "tiny-llama",
            "model_class_name": "HookedTransformer",
            "hook_name": hook_name,
            "hook_head_index": None,
            "context_size": 128,
            "prepend_bos": True,
            "dataset_path": "tiny/dataset",
            "seqpos_slice": [None],
            "model_from_pretrained_kwargs": {},
            "neuronpedia_id": neuronpedia_id,
        },
    }


def pre6_cfg(
    d_in: int,
    d_sae: int,
    *,
    architecture: str,
    apply_b_dec_to_input: bool,
    normalize_activations: str,
    hook_name: str | None,
    neuronpedia_id: str | None = None,
) -> dict[str, Any]:
    """Flat cfg.json as SAELens < 6 wrote it (oldest versions: boolean normalize_activations)."""
    return {
        "architecture": architecture,
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "device": "cpu",
        "model_name": "tiny-llama",
        "hook_name": hook_name,
        "hook_layer": 1,
        "hook_head_index": None,
        "activation_fn_str": "relu",
        "activation_fn_kwargs": {},
        "apply_b_dec_to_input": apply_b_dec_to_input,
        "finetuning_scaling_factor": False,
        "sae_lens_training_version": "3.13.0",
        "prepend_bos": True,
        "dataset_path": "tiny/dataset",
        "context_size": 128,
        "normalize_activations": (
            False if normalize_activations == "none" else normalize_activations
        ),
        "neuronpedia_id": neuronpedia_id,
    }


def _rand(generator: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=generator) * scale


def write_gemma_scope(root: Path, d_in: int, d_sae: int, layer: int = 5, seed: int = 0) -> Path:
    """Gemma Scope 1: ``<release>/layer_<L>/width_<W>/average_l0_<N>/params.npz``, float32."""
    g = torch.Generator().manual_seed(seed)
    directory = (
        Path(root) / "gemma-scope-2b-pt-res" / f"layer_{layer}" / "width_16k" / "average_l0_9"
    )
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {
        "W_enc": _rand(g, d_in, d_sae, scale=d_in**-0.5),
        "W_dec": _rand(g, d_sae, d_in, scale=d_sae**-0.5),
        "b_enc": _rand(g, d_sae, scale=0.2),
        "b_dec": _rand(g, d_in, scale=0.5),
        "threshold": 0.05 + 0.5 * torch.rand(d_sae, generator=g),
    }
    np.savez(
        directory / "params.npz", **{k: v.numpy().astype(np.float32) for k, v in arrays.items()}
    )
    return directory


def write_gemma_scope_2(
    directory: Path, d_in: int, d_sae: int, layer: int = 5, seed: int = 0
) -> Path:
    """Gemma Scope 2: ``config.json`` + ``params.safetensors`` with lowercase tensor names."""
    g = torch.Generator().manual_seed(seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {
        "w_enc": _rand(g, d_in, d_sae, scale=d_in**-0.5),
        "w_dec": _rand(g, d_sae, d_in, scale=d_sae**-0.5),
        "b_enc": _rand(g, d_sae, scale=0.2),
        "b_dec": _rand(g, d_in, scale=0.5),
        "threshold": 0.05 + 0.5 * torch.rand(d_sae, generator=g),
    }
    save_file(tensors, str(directory / "params.safetensors"))
    config = {
        "hf_hook_point_in": f"model.layers.{layer}.output",
        "hf_hook_point_out": f"model.layers.{layer}.output",
        "width": d_sae,
        "model_name": "google/gemma-3-tiny-pt",
        "architecture": "jump_relu",
        "l0": 9,
        "affine_connection": False,
        "type": "sae",
    }
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def write_sparsify(
    root: Path, d_in: int, expansion: int, k: int, hookpoint: str = "layers.6", seed: int = 0
) -> Path:
    """An EleutherAI sparsify checkpoint with one hookpoint directory; returns that directory."""
    g = torch.Generator().manual_seed(seed)
    directory = Path(root) / hookpoint
    directory.mkdir(parents=True, exist_ok=True)
    latents = d_in * expansion
    tensors = {
        "encoder.weight": _rand(g, latents, d_in, scale=d_in**-0.5),
        "encoder.bias": _rand(g, latents, scale=0.2),
        "W_dec": _rand(g, latents, d_in, scale=latents**-0.5),
        "b_dec": _rand(g, d_in, scale=0.5),
    }
    save_file(tensors, str(directory / "sae.safetensors"))
    cfg = {
        "activation": "topk",
        "expansion_factor": expansion,
        "normalize_decoder": True,
        "num_latents": 0,
        "k": k,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": d_in,
    }
    (directory / "cfg.json").write_text(json.dumps(cfg))
    (Path(root) / "config.json").write_text(json.dumps({"hookpoints": [hookpoint]}))
    return directory


def dictionary_learning_state(
    dict_class: str, d_in: int, d_sae: int, k: int = 6, seed: int = 0
) -> dict[str, torch.Tensor]:
    """``ae.state_dict()`` of each dictionary_learning class, with its exact key names."""
    g = torch.Generator().manual_seed(seed)
    if dict_class == "AutoEncoder":
        return {
            "bias": _rand(g, d_in, scale=0.5),
            "encoder.weight": _rand(g, d_sae, d_in, scale=d_in**-0.5),
            "encoder.bias": _rand(g, d_sae, scale=0.2),
            "decoder.weight": _rand(g, d_in, d_sae, scale=d_sae**-0.5),
        }
    if dict_class == "JumpReluAutoEncoder":
        return {
            "W_enc": _rand(g, d_in, d_sae, scale=d_in**-0.5),
            "b_enc": _rand(g, d_sae, scale=0.2),
            "W_dec": _rand(g, d_sae, d_in, scale=d_sae**-0.5),
            "b_dec": _rand(g, d_in, scale=0.5),
            "threshold": 0.05 + 0.5 * torch.rand(d_sae, generator=g),
        }
    threshold = 0.3 if dict_class == "BatchTopKSAE" else -1.0
    return {
        "k": torch.tensor(k, dtype=torch.int),
        "threshold": torch.tensor(threshold, dtype=torch.float32),
        "decoder.weight": _rand(g, d_in, d_sae, scale=d_sae**-0.5),
        "encoder.weight": _rand(g, d_sae, d_in, scale=d_in**-0.5),
        "encoder.bias": _rand(g, d_sae, scale=0.2),
        "b_dec": _rand(g, d_in, scale=0.5),
    }


def write_dictionary_learning(
    directory: Path,
    dict_class: str,
    d_in: int,
    d_sae: int,
    k: int = 6,
    layer: int = 3,
    seed: int = 0,
) -> Path:
    """``ae.pt`` (a plain state dict) + ``config.json`` as dictionary_learning's trainers save."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(dictionary_learning_state(dict_class, d_in, d_sae, k, seed), directory / "ae.pt")
    trainer = {
        "dict_class": dict_class,
        "trainer_class": "TopKTrainer",
        "activation_dim": d_in,
        "dict_size": d_sae,
        "lm_name": "EleutherAI/pythia-70m-deduped",
        "layer": layer,
        "submodule_name": f"resid_post_layer_{layer}",
        "device": "cpu",
    }
    if "TopK" in dict_class:
        trainer["k"] = k
    config = {"trainer": trainer, "buffer": {"d_submodule": d_in, "ctx_len": 128}}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def openai_state(d_in: int, d_sae: int, k: int | None = 6, seed: int = 0) -> dict[str, object]:
    """``Autoencoder.state_dict()`` of openai/sparse_autoencoder (TopK when k is given)."""
    g = torch.Generator().manual_seed(seed)
    state: dict[str, object] = {
        "pre_bias": _rand(g, d_in, scale=0.5),
        "latent_bias": _rand(g, d_sae, scale=0.2),
        "stats_last_nonzero": torch.zeros(d_sae, dtype=torch.long),
        "latents_activation_frequency": torch.ones(d_sae),
        "latents_mean_square": torch.zeros(d_sae),
        "encoder.weight": _rand(g, d_sae, d_in, scale=d_in**-0.5),
        "decoder.weight": _rand(g, d_in, d_sae, scale=d_sae**-0.5),
        "activation": "TopK" if k else "ReLU",
    }
    if k:
        state["activation_state_dict"] = {"k": k, "postact_fn": "ReLU"}
    return state


def write_openai(path: Path, d_in: int, d_sae: int, k: int | None = 6, seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(openai_state(d_in, d_sae, k, seed), path)
    return path
