"""Shared fixtures: a real sidecar process on loopback, tiny models, metric scraping."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from prometheus_client.parser import text_string_to_metric_families

from monitor.demo import write_saelens_sae

REPO_ROOT = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 60.0


@dataclass
class SidecarProcess:
    process: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    log_path: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_events(self) -> list[dict]:
        events = []
        for line in self.log_path.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return events

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of /metrics keyed by (name, sorted labels)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


def start_sidecar(config: dict, workdir: Path) -> SidecarProcess:
    """Run `safety-monitor serve` as a subprocess and wait for its 'sidecar started' log line."""
    config = {"listen": "127.0.0.1:0", "metrics_port": 0, "log_format": "json", **config}
    config_path = workdir / "sidecar.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = workdir / "sidecar.log"
    log_file = log_path.open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "monitor.cli", "serve", "--config", str(config_path)],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        for line in log_path.read_text().splitlines():
            if '"sidecar started"' in line:
                event = json.loads(line)
                return SidecarProcess(process, event["grpc_port"], event["metrics_port"], log_path)
        if process.poll() is not None:
            raise RuntimeError(f"sidecar exited {process.returncode}: {log_path.read_text()}")
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"sidecar did not start in {STARTUP_TIMEOUT_S}s: {log_path.read_text()}")


@pytest.fixture
def sidecar_factory(tmp_path: Path) -> Iterator[Callable[[dict], SidecarProcess]]:
    started: list[SidecarProcess] = []

    def factory(config: dict) -> SidecarProcess:
        sidecar = start_sidecar(config, tmp_path)
        started.append(sidecar)
        return sidecar

    yield factory
    for sidecar in started:
        if sidecar.process.poll() is None:
            sidecar.process.kill()
            sidecar.process.wait(10)


def build_tiny_llama(seed: int = 0, hidden: int = 64, layers: int = 3) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


def build_pack_with_cli(
    tmp_path: Path,
    *,
    d_in: int,
    d_sae: int,
    hook_layer: int,
    features: list[int],
    name: str = "bars",
    seed: int = 5,
) -> Path:
    """Write a SAELens SAE and compile a pack from it with the real CLI."""
    sae_dir = write_saelens_sae(tmp_path / f"{name}-sae", d_in, d_sae, hook_layer, seed=seed)
    out = tmp_path / f"{name}.pack.safetensors"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "monitor.cli",
            "pack",
            "build",
            "--sae",
            str(sae_dir),
            "--features",
            ",".join(map(str, features)),
            "--name",
            name,
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return out
