"""Test and demo fixtures, in one place for the demo, the benches and the tests: tiny
randomly initialised Llama models (`build_tiny_llama`), a toy word-level tokenizer
(`ToyTokenizer`), synthetic SAEs in every supported library's on-disk format (exact key
names; `write_saelens_sae` and friends), and a launcher that runs `safety-monitor serve` as a
subprocess on loopback and waits until it serves (`start_sidecar`).

Nothing in the product's runtime imports this module.

    >>> model = build_tiny_llama(hidden=64, layers=3)
    >>> sae_dir = write_saelens_sae(tmp / "sae", 64, 256, hook_name="blocks.1.hook_resid_post")
    >>> sidecar = start_sidecar({"packs": [...], "rules": [...]}, tmp)
    >>> sidecar.target
    '127.0.0.1:...'
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
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
    bias_scale: tuple[float, float] = (0.2, 0.5),
) -> Path:
    """A random SAE as SAELens saves it: ``cfg.json`` + ``sae_weights.safetensors``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(
        random_weights(d_in, d_sae, architecture=architecture, seed=seed, bias_scale=bias_scale),
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


def write_layer_sae(directory: Path, d_in: int, d_sae: int, hook_layer: int, seed: int) -> Path:
    """A random standard-ReLU SAE in SAELens v6 layout reading the output of decoder layer
    `hook_layer` (small biases): what the demo, the benches and the sidecar tests build
    their packs from."""
    return write_saelens_sae(
        directory,
        d_in,
        d_sae,
        hook_name=f"blocks.{hook_layer}.hook_resid_post",
        seed=seed,
        bias_scale=(0.1, 0.1),
    )


def random_weights(
    d_in: int,
    d_sae: int,
    *,
    architecture: str = "standard",
    seed: int = 0,
    bias_scale: tuple[float, float] = (0.2, 0.5),
) -> dict[str, torch.Tensor]:
    """Weights at a realistic scale: pre-activations O(1), biases clearly nonzero
    (``bias_scale``: the standard deviations of ``b_enc`` and ``b_dec``)."""
    generator = torch.Generator().manual_seed(seed)
    weights = {
        "W_enc": torch.randn(d_in, d_sae, generator=generator) / d_in**0.5,
        "W_dec": torch.randn(d_sae, d_in, generator=generator) / d_sae**0.5,
        "b_enc": torch.randn(d_sae, generator=generator) * bias_scale[0],
        "b_dec": torch.randn(d_in, generator=generator) * bias_scale[1],
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
    """A random OpenAI sparse_autoencoder state dict at `path` (TopK when `k` is set)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(openai_state(d_in, d_sae, k, seed), path)
    return path


# --- tiny models and a toy tokenizer ----------------------------------------------------------


def build_tiny_llama(
    seed: int = 0, hidden: int = 64, layers: int = 3, **config: Any
) -> torch.nn.Module:
    """A randomly initialised LlamaForCausalLM (no hub access): `hidden` wide, `layers` deep;
    `config` overrides other LlamaConfig fields (vocab_size, intermediate_size, heads...)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    settings: dict[str, Any] = {
        "vocab_size": 256,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
    }
    settings.update(config)
    return LlamaForCausalLM(
        LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, **settings)
    ).eval()


VOCAB_SIZE = 512  # the toy tokenizer's and the demo model's vocabulary
_WORDS = [
    "and",
    "you",
    "the",
    "a",
    "model",
    "user",
    "said",
    "please",
    "tell",
    "me",
    "about",
    "how",
    "why",
    "what",
    "is",
    "are",
    "was",
    "not",
    "no",
    "yes",
    "can",
    "will",
    "would",
    "should",
    "could",
    "do",
    "does",
    "did",
    "make",
    "help",
    "write",
    "explain",
    "secret",
    "plan",
    "hide",
    "truth",
    "lie",
    "honest",
    "report",
    "results",
    "data",
    "email",
    "send",
    "contact",
    "reach",
    "at",
    "on",
    "in",
    "of",
    "to",
    "for",
    "with",
    "alice.smith@example.com",
    "+1-415-555-0134",
    "password",
    "account",
    "bank",
    "transfer",
    "money",
    "safe",
    "risk",
    "harm",
    "test",
    "check",
    "review",
    "policy",
    "team",
    "people",
    "job",
    "hire",
    "candidate",
    "age",
    "gender",
]


class ToyTokenizer:
    """A toy word-level tokenizer (no hub access here): word i is token i; the rest of the
    vocabulary is filler words. The capture client only needs `decode`."""

    def __init__(self) -> None:
        # Token 0 is padding (generate() masks it out), the last one is unknown.
        words = ["<pad>", *_WORDS]
        words += [f"w{i}" for i in range(VOCAB_SIZE - len(words) - 1)] + ["<unk>"]
        self.words = words[:VOCAB_SIZE]
        self.ids = {word: i for i, word in enumerate(self.words)}

    def encode(self, text: str) -> list[int]:
        """Word ids of `text` split on spaces (unknown words get the last id)."""
        return [self.ids.get(word, VOCAB_SIZE - 1) for word in text.split()]

    def decode(self, ids: list[int]) -> str:
        """The words of `ids`, each followed by a space (what the capture client stores as token
        text)."""
        return "".join(f"{self.words[i]} " for i in ids)


# --- a real sidecar process on loopback -------------------------------------------------------

STARTUP_TIMEOUT_S = 60.0


@dataclass
class SidecarProcess:
    """A `safety-monitor serve` subprocess started by `start_sidecar`."""

    process: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    log_path: Path

    @property
    def target(self) -> str:
        """The gRPC target, ``127.0.0.1:<port>``."""
        return f"127.0.0.1:{self.port}"

    def log_events(self) -> list[dict]:
        """The sidecar's JSON log lines so far, parsed (other lines are skipped)."""
        events = []
        for line in self.log_path.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return events

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of /metrics keyed by (name, sorted labels)."""
        from prometheus_client.parser import text_string_to_metric_families

        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples

    def metric(self, name: str, **labels: str) -> float:
        """One sample of /metrics (0.0 when absent)."""
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful drain) and wait; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


def start_sidecar(
    config: dict,
    workdir: Path,
    *,
    cwd: Path | None = None,
    preexec_fn: Callable[[], None] | None = None,
    timeout: float = STARTUP_TIMEOUT_S,
) -> SidecarProcess:
    """Run `safety-monitor serve` as a subprocess with `config` (written to
    ``workdir/sidecar.yaml``, JSON logs to ``workdir/sidecar.log``) and wait until it serves:
    its 'sidecar started' log line, or, with a fixed ``listen`` port and a log level that
    hides that line, its port accepting connections."""
    import yaml

    config = {"listen": "127.0.0.1:0", "metrics_port": 0, "log_format": "json", **config}
    config_path = workdir / "sidecar.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = workdir / "sidecar.log"
    log_file = log_path.open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "monitor.cli", "serve", "--config", str(config_path)],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        cwd=cwd,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=preexec_fn,
    )
    fixed_port = int(config["listen"].rsplit(":", 1)[1])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log_path.read_text().splitlines():
            if '"sidecar started"' in line:
                event = json.loads(line)
                return SidecarProcess(process, event["grpc_port"], event["metrics_port"], log_path)
        if process.poll() is not None:
            raise RuntimeError(f"sidecar exited {process.returncode}: {log_path.read_text()}")
        if fixed_port and _accepts(fixed_port):
            return SidecarProcess(process, fixed_port, config["metrics_port"], log_path)
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"sidecar did not start in {timeout}s: {log_path.read_text()}")


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def free_port() -> int:
    """A loopback port nothing listens on (now): for a sidecar to bind, or for a client to
    find closed."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll `predicate` every 20 ms until it holds; AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("condition not reached in time")
