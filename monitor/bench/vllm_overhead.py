"""`safety-monitor bench overhead --engine vllm`: what the vLLM plugin costs generation.

Three engines of the same tiny random-weight Llama run side by side (each in its own process
tree, started by `monitor.bench.vllm_engine`): monitor off, on with a real sidecar, and on with
nothing listening (fail-open). Rounds are interleaved, the order rotating each round, so drift
hits every mode alike; each round is the same batch of greedy requests. Reported per mode:
generation throughput (output tokens/s), the median engine step time in the decode phase
(inter-token latency) and the overhead: the median over rounds of each round's time against
the same round's monitor-off time. Compiled (vLLM's default) and eager are measured one after
the other. Needs vLLM installed (the project's `make vllm-venv`).
"""

from __future__ import annotations

import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

ENGINE_MODES = ("off", "sidecar-up", "sidecar-down")
HIDDEN = 256

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": HIDDEN,
    "intermediate_size": 704,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "num_hidden_layers": 4,
    "vocab_size": 8192,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "torch_dtype": "float32",
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
}


class _Engine:
    def __init__(self, kwargs: dict[str, Any], env: dict[str, str], log: Path) -> None:
        self._log = log.open("wb")
        self._out = log.with_suffix(".out")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "monitor.bench.vllm_engine", json.dumps(kwargs)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env={**os.environ, "OMP_NUM_THREADS": "1", **env},
            start_new_session=True,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        with self._out.open("wb") as out:  # vLLM logs to stdout; replies are JSON lines
            for line in self.process.stdout:
                text = line.decode(errors="replace").strip()
                if text.startswith("{"):
                    self._lines.put(text)
                else:
                    out.write(line)
        self._lines.put(None)

    def reply(self, timeout: float) -> Any:
        line = self._lines.get(timeout=timeout)
        if line is None:
            raise RuntimeError(f"a vLLM engine exited ({self.process.poll()}); see {self._out}")
        return json.loads(line)

    def call(self, command: dict[str, Any], timeout: float = 600.0) -> Any:
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps(command) + "\n").encode())
        self.process.stdin.flush()
        return self.reply(timeout)["reply"]

    def stop(self) -> None:
        try:
            if self.process.poll() is None:
                self.call({"op": "quit"}, timeout=60)
                self.process.wait(60)
        except Exception:
            pass
        if self.process.poll() is None:
            os.killpg(self.process.pid, 9)
            self.process.wait(30)
        self._log.close()


def _start_sidecar(workdir: Path) -> tuple[Any, str]:
    from monitor.fixtures import start_sidecar, write_layer_sae

    sae = write_layer_sae(workdir / "sae", HIDDEN, 64, 1, seed=5)
    pack = workdir / "bench.pack.safetensors"
    build = ["pack", "build", "--sae", str(sae), "--features", "0,1,2,3", "--name", "bench"]
    subprocess.run(
        [sys.executable, "-m", "monitor.cli", *build, "--out", str(pack)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    rules = workdir / "rules.yaml"
    rules.write_text(
        "features: {f: bench/0}\nrules:\n"
        "  - rule: sustained\n    severity: info\n    condition: f > 1000\n    for: 8\n"
    )
    sidecar = start_sidecar({"packs": [str(pack)], "rules": [str(rules)]}, workdir)
    return sidecar, sidecar.target


def run_vllm_overhead_bench(
    rounds: int = 7,
    requests: int = 4,
    prompt_tokens: int = 32,
    new_tokens: int = 48,
    layers: str = "1",
    eager_modes: tuple[bool, ...] = (False, True),
) -> dict[str, Any]:
    """Measure the three engine modes for each execution mode; returns the results."""
    workdir = Path(tempfile.mkdtemp(prefix="sm-bench-vllm-"))
    model = workdir / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(TINY_LLAMA))
    sidecar, target = _start_sidecar(workdir)
    batch = [
        {
            "id": f"r{i}",
            "prompt": [(7 * i + j) % 8000 + 10 for j in range(prompt_tokens)],
            "params": {"max_tokens": new_tokens, "temperature": 0.0, "ignore_eos": True},
        }
        for i in range(requests)
    ]
    results: dict[str, Any] = {
        "model": f"Llama-style, hidden {HIDDEN}, 4 layers, float32, random weights",
        "requests": requests,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "layers": layers,
        "rounds": rounds,
        "execution": {},
    }
    try:
        for eager in eager_modes:
            name = "eager" if eager else "compiled"
            results["execution"][name] = _measure(
                workdir / name, model, eager, target, layers, batch, rounds
            )
    finally:
        sidecar.stop()
    return results


def _measure(
    workdir: Path,
    model: Path,
    eager: bool,
    target: str,
    layers: str,
    batch: list[dict[str, Any]],
    rounds: int,
) -> dict[str, Any]:
    workdir.mkdir(parents=True)
    kwargs = {
        "model": str(model),
        "load_format": "dummy",
        "skip_tokenizer_init": True,
        "dtype": "float32",
        "seed": 0,
        "max_model_len": 256,
        "max_num_seqs": 8,
        "enforce_eager": eager,
        "enable_prefix_caching": False,  # every round computes every token
        # A fixed KV cache: vLLM's CPU default is a fraction of the machine's memory, and three
        # engines run side by side.
        "kv_cache_memory_bytes": 256 * 1024 * 1024,
    }
    from monitor.fixtures import free_port

    down = f"127.0.0.1:{free_port()}"  # nothing listens there
    envs = {
        "off": {},
        "sidecar-up": {"SAFETY_MONITOR_TARGET": target, "SAFETY_MONITOR_LAYERS": layers},
        "sidecar-down": {"SAFETY_MONITOR_TARGET": down, "SAFETY_MONITOR_LAYERS": layers},
    }
    engines: dict[str, _Engine] = {}
    try:
        # One at a time: three compilations at once on a small machine only slow each other.
        for mode in ENGINE_MODES:
            engines[mode] = _Engine(kwargs, envs[mode], workdir / f"{mode}.log")
            engines[mode].reply(timeout=1800)
        for engine in engines.values():
            engine.call({"op": "run", "requests": _renamed(batch, "warmup")})
        seconds: dict[str, list[float]] = {mode: [] for mode in ENGINE_MODES}
        steps: dict[str, list[float]] = {mode: [] for mode in ENGINE_MODES}
        tokens = 0
        for index in range(rounds):
            order = ENGINE_MODES[index % 3 :] + ENGINE_MODES[: index % 3]
            for mode in order:
                reply = engines[mode].call({"op": "run", "requests": _renamed(batch, str(index))})
                seconds[mode].append(reply["seconds"])
                # decode-phase steps: the prefill step(s) come first
                steps[mode].extend(reply["step_seconds"][2:])
                tokens = sum(len(r["outputs"][0]["token_ids"]) for r in reply["results"].values())
        reports = {mode: engines[mode].call({"op": "report"})[0] for mode in ENGINE_MODES}
    finally:
        for engine in engines.values():
            engine.stop()
    rows = {}
    for mode in ENGINE_MODES:
        ratios = [m / b - 1 for m, b in zip(seconds[mode], seconds["off"], strict=True)]
        report = reports[mode]
        rows[mode] = {
            "tokens_per_s": tokens / statistics.median(seconds[mode]),
            "itl_ms_p50": 1000 * statistics.median(steps[mode]),
            "overhead_pct": 100 * statistics.median(ratios),
            "steps_captured": report.get("steps_captured", 0),
            "acked": report.get("batches_acked", 0),
            "dropped": sum(report.get("dropped", {}).values()),
            "op_calls": report["op_calls"],
        }
    return rows


def _renamed(batch: list[dict[str, Any]], tag: str) -> list[dict[str, Any]]:
    return [{**request, "id": f"{request['id']}-{tag}"} for request in batch]


def format_vllm_table(result: dict[str, Any]) -> str:
    lines = [
        f"vLLM plugin overhead: {result['model']}; {result['requests']} requests x "
        f"{result['prompt_tokens']} prompt + {result['new_tokens']} new tokens per round, "
        f"capture on layers {result['layers']}, {result['rounds']} interleaved rounds",
        f"{'execution':<10}{'mode':<14}{'tokens/s':>10}{'ITL ms':>9}{'overhead':>10}"
        f"{'captured':>10}{'acked':>8}{'dropped':>9}",
    ]
    for execution, rows in result["execution"].items():
        for mode, row in rows.items():
            lines.append(
                f"{execution:<10}{mode:<14}{row['tokens_per_s']:>10.1f}{row['itl_ms_p50']:>9.2f}"
                f"{row['overhead_pct']:>9.2f}%{row['steps_captured']:>10}{row['acked']:>8}"
                f"{row['dropped']:>9}"
            )
    return "\n".join(lines)
