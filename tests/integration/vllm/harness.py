"""A real vLLM engine (CPU build, tiny random-weight Llama) in a subprocess, and a real sidecar
with counting rules, for the vLLM integration tests.

The counting-rule technique of the transformers tests: rule seen-L fires when a conversation
has shown L consecutive tokens (`for: L`, always-true condition), so a conversation the sidecar
saw as positions P..P+N-1 with no gap fires exactly seen-1..seen-N, seen-L at position P+L-1;
a missing, repeated or misplaced token shows up as a wrong set or a wrong position.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from monitor.bench.workdir import engine_tmp_env
from tests.conftest import REPO_ROOT, build_pack_with_cli

HIDDEN = 256
LAYERS = 2
VOCAB = 512
# One more than the engine's context (max_model_len 128): the counting rules count any
# conversation the engine can hold exactly. At 100, a hung-up request whose abort landed late on
# a busy machine (vLLM logged the abort after it had computed 100 or more of its 124 tokens)
# could not be counted, and the test of aborts failed though the abort had stopped it.
MAX_COUNTED = 129
ENGINE_START_TIMEOUT_S = 900.0

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": HIDDEN,
    "intermediate_size": 512,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,  # the CPU attention backend refuses 16
    "num_hidden_layers": LAYERS,
    "vocab_size": VOCAB,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "torch_dtype": "float32",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
}


def write_model(directory: Path) -> Path:
    """A model directory holding only config.json (weights: load_format='dummy')."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(TINY_LLAMA))
    return directory


# A real tokenizer for the tiny model, built here offline (no hub): a word-level vocabulary of
# exactly VOCAB entries (every id the random-weight model can sample decodes to a word), split
# on whitespace, with role markers as special tokens and a chat template that uses them.
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>")
TOKENIZER_TEXT = (
    "hello how are you today the monitor watches every token of this conversation "
    "please summarise my account history and tell me what to do next thanks"
)
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} "
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tokenizer_vocabulary() -> dict[str, int]:
    """Special tokens first (ids 0-2 are the config's unk/bos/eos), then the words, then
    filler words up to VOCAB."""
    tokens = [*SPECIAL_TOKENS, *dict.fromkeys(TOKENIZER_TEXT.split())]
    tokens += [f"w{i}" for i in range(VOCAB - len(tokens))]
    return {token: index for index, token in enumerate(tokens)}


def write_tokenizer(directory: Path) -> Path:
    """tokenizer.json + tokenizer_config.json (with the chat template) in `directory`, as
    `save_pretrained` writes them, so vLLM's frontend loads them as for any hub model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocabulary = tokenizer_vocabulary()
    assert len(vocabulary) == VOCAB
    backend = Tokenizer(models.WordLevel(vocab=vocabulary, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=list(SPECIAL_TOKENS[3:]),
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(directory))
    return directory


def engine_kwargs(model: Path, *, eager: bool, **overrides: Any) -> dict[str, Any]:
    kwargs = {
        "model": str(model),
        "load_format": "dummy",
        "skip_tokenizer_init": True,
        "dtype": "float32",
        "seed": 0,
        "max_model_len": 128,
        "max_num_seqs": 8,
        # Small, so prompts longer than this are prefilled in chunks.
        "max_num_batched_tokens": 32,
        # Room for 10 blocks of 32 tokens (2 layers x K and V x 2 heads x 64 x fp32 = 2 KiB a
        # token): four 90-token requests do not fit at once, so the scheduler preempts.
        "block_size": 32,
        "kv_cache_memory_bytes": 10 * 32 * 2048,
        "enable_prefix_caching": True,
        "enforce_eager": eager,
    }
    kwargs.update(overrides)
    return kwargs


# Guard mode: stop a request of role "guarded" once it has shown 12 tokens, and one of role
# "intruder" at its first token.
GUARD_FIRES_AT = 11
GUARD_RULE = f"""  - rule: guard-stop
    category: misuse
    severity: critical
    condition: abs(f) >= 0
    for: {GUARD_FIRES_AT + 1}
    roles: [guarded]
    actions: [alert, block]
  - rule: intruder-stop
    category: misuse
    severity: critical
    condition: abs(f) >= 0
    for: 1
    roles: [intruder]
    actions: [alert, block]
"""
# Roles: `role-<role>` evaluates only that role's tokens and fires (`for: 1`) at the first token
# of each run of them (a token of another role breaks the run). A request tagged right fires
# `role-<prompt role>` once, at its first computed prompt position, and `role-<output role>`
# once, at the prompt's length; a mis-tagged row anywhere adds a firing or moves one.
ROLES_SEEN = ("user", "assistant", "system")
ROLE_RULES = "".join(
    f"""  - rule: role-{role}
    category: accounting
    severity: info
    condition: abs(f) >= 0
    for: 1
    roles: [{role}]
"""
    for role in ROLES_SEEN
)
# Guard mode with an enforced bound: each step's sampled tokens wait for the sidecar's verdict
# on all but the last BLOCK_WITHIN steps (a generous timeout: this machine is busy).
BLOCK_WITHIN = 0
GUARD_TIMEOUT_S = 30


def counting_rules(extra: str = "") -> str:
    lines = ["features: {f: bars/0}", "rules:"]
    for length in range(1, MAX_COUNTED + 1):
        lines += [
            f"  - rule: seen-{length}",
            "    category: accounting",
            "    severity: info",
            "    condition: abs(f) >= 0",
            f"    for: {length}",
        ]
    return "\n".join(lines) + "\n" + extra


def sidecar_config(workdir: Path, extra_rules: str = "") -> dict:
    pack = workdir / "bars.pack.safetensors"
    if not pack.exists():
        build_pack_with_cli(workdir, d_in=HIDDEN, d_sae=32, hook_layer=1, features=[0, 1])
    rules = workdir / "counting.yaml"
    rules.write_text(counting_rules(extra_rules))
    return {"packs": [str(pack)], "rules": [str(rules)]}


class Engine:
    """The driver subprocess (monitor/bench/vllm_engine.py) and its JSON-lines protocol."""

    def __init__(self, kwargs: dict[str, Any], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        # vLLM's temporary files (its ZeroMQ IPC sockets, the `vllm_dist_*` store) go into a
        # short directory of this engine's own, removed at stop: left in /tmp they pile up by
        # the hundred over test runs. Short, because a Unix socket's path must fit 108 bytes.
        self._tmp = Path(tempfile.mkdtemp(prefix="sm-vllm-test-"))
        full_env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": str(REPO_ROOT),
            # The hook probe is a function sent to the workers (pickled): tests only.
            "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
            **engine_tmp_env(self._tmp),
            **env,
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "monitor.bench.vllm_engine", json.dumps(kwargs)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            cwd=REPO_ROOT,
            env=full_env,
            start_new_session=True,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        try:
            ready = self._reply(ENGINE_START_TIMEOUT_S)
        except BaseException:
            self.stop()
            raise
        assert ready == {"ready": True}, ready

    def _call_raw(self, command: dict[str, Any], timeout: float) -> Any:
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps(command) + "\n").encode())
        self.process.stdin.flush()
        return self._reply(timeout)

    def _read(self) -> None:
        assert self.process.stdout is not None
        # vLLM logs to stdout too: keep it next to the log, the replies are JSON lines.
        with self.log_path.with_suffix(".out").open("wb") as out:
            for line in self.process.stdout:
                text = line.decode(errors="replace").strip()
                if text.startswith("{"):
                    self._lines.put(text)
                else:
                    out.write(line)
                    out.flush()
        self._lines.put(None)

    def _reply(self, timeout: float) -> Any:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            message = f"engine did not answer in {timeout}s; log: {self.log_tail()}"
            raise TimeoutError(message) from None
        if line is None:
            raise RuntimeError(f"engine exited {self.process.poll()}; log: {self.log_tail()}")
        return json.loads(line)

    def full_log(self) -> str:
        out_path = self.log_path.with_suffix(".out")
        out = out_path.read_text(errors="replace") if out_path.exists() else ""
        return out + self.log_path.read_text(errors="replace")

    def log_tail(self, chars: int = 4000) -> str:
        self._log.flush()
        err = self.log_path.read_text(errors="replace")[-chars:]
        out_path = self.log_path.with_suffix(".out")
        out = out_path.read_text(errors="replace")[-chars:] if out_path.exists() else ""
        return f"{out}\n--- stderr ---\n{err}"

    def call(self, command: dict[str, Any], timeout: float = 300.0) -> Any:
        return self._call_raw(command, timeout)["reply"]

    def run(self, requests: list[dict[str, Any]], timeout: float = 300.0) -> dict[str, Any]:
        return self.call({"op": "run", "requests": requests}, timeout)["results"]

    def report(self) -> dict[str, Any]:
        (report,) = self.call({"op": "report"})
        return report

    def flush(self) -> None:
        assert self.call({"op": "flush", "timeout": 30.0}, timeout=60) == [True]

    def stop(self) -> None:
        try:
            if self.process.poll() is None:
                self.call({"op": "quit"}, timeout=60)
                self.process.wait(60)
        except (TimeoutError, RuntimeError, OSError, subprocess.TimeoutExpired):
            pass
        finally:
            if self.process.poll() is None:
                os.killpg(self.process.pid, 9)  # its own session: the engine's children too
                self.process.wait(30)
            if not self._log.closed:
                self._log.close()
            shutil.rmtree(self._tmp, ignore_errors=True)


def monitor_env(target: str, layers: str = "1", **extra: str) -> dict[str, str]:
    return {"SAFETY_MONITOR_TARGET": target, "SAFETY_MONITOR_LAYERS": layers, **extra}


def seen(alerts: list[dict[str, Any]], conversation_id: str, start: int = 0) -> int:
    """How many contiguous tokens from position `start` the sidecar saw for a conversation
    (asserting each counting alert sits at its exact position)."""
    lengths = []
    for alert in alerts:
        if alert["conversation_id"] != conversation_id or not alert["rule"].startswith("seen-"):
            continue
        length = int(alert["rule"].removeprefix("seen-"))
        assert alert["position"] == start + length - 1, (conversation_id, alert)
        lengths.append(length)
    assert sorted(lengths) == list(range(1, len(lengths) + 1)), (conversation_id, lengths)
    assert len(lengths) < MAX_COUNTED, "conversation too long for the counting rules"
    return len(lengths)


def role_starts(alerts: list[dict[str, Any]], conversation_id: str) -> dict[str, list[int]]:
    """Where each role's runs of tokens start in a conversation (see ROLE_RULES)."""
    starts: dict[str, list[int]] = {}
    for alert in alerts:
        if alert["conversation_id"] == conversation_id and alert["rule"].startswith("role-"):
            starts.setdefault(alert["rule"].removeprefix("role-"), []).append(alert["position"])
    return {role: sorted(positions) for role, positions in starts.items()}


def greedy(max_tokens: int, **params: Any) -> dict[str, Any]:
    return {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True, **params}


def wait_until(predicate: Any, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False
