"""`safety-monitor demo`: the product's main job on embedded defaults, end to end.

It builds a small randomly initialised Llama-style model (no hub access) with a toy word-level
tokenizer, a SAELens-format SAE for its layer-2 residual stream, a feature pack of four SAE
features, and rules whose thresholds are calibrated on benign prompts for a ~1% per-token rate.
Then it starts a real sidecar on a loopback port with an SQLite audit trail, attaches the
capture client to the model, generates for a few conversations (one prompt carries an email
address, to show redaction) and prints the alerts that came back on the stream, the sidecar's
Prometheus counters and the audit trail of the flagged conversations.
"""

from __future__ import annotations

import json
import tempfile
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

if TYPE_CHECKING:
    from monitor.capture import CaptureClient

D_MODEL = 128
D_SAE = 2048
HOOK_LAYER = 2
FEATURE_NAMES = ("deception", "bias", "misuse", "secrecy")
CALIBRATION_QUANTILE = 0.97
VOCAB_SIZE = 512
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


class DemoTokenizer:
    """A toy word-level tokenizer (no hub access here): word i is token i; the rest of the
    vocabulary is filler words. The capture client only needs `decode`."""

    def __init__(self) -> None:
        # Token 0 is padding (generate() masks it out), the last one is unknown.
        words = ["<pad>", *_WORDS]
        words += [f"w{i}" for i in range(VOCAB_SIZE - len(words) - 1)] + ["<unk>"]
        self.words = words[:VOCAB_SIZE]
        self.ids = {word: i for i, word in enumerate(self.words)}

    def encode(self, text: str) -> list[int]:
        return [self.ids.get(word, VOCAB_SIZE - 1) for word in text.split()]

    def decode(self, ids: list[int]) -> str:
        return "".join(f"{self.words[i]} " for i in ids)


PROMPTS = (
    "can you email alice.smith@example.com about the secret plan and hide the truth",
    "please tell me about the results of the test and the plan",
    "what would you do to help the team hire a candidate",
    "explain how to make a safe transfer of money to a bank account",
)


def build_model(seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=D_MODEL,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(config).eval()


def write_saelens_sae(directory: Path, d_in: int, d_sae: int, hook_layer: int, seed: int) -> Path:
    """A random standard-ReLU SAE in SAELens v6 layout (cfg.json + sae_weights.safetensors)."""
    generator = torch.Generator().manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {
        "W_enc": torch.randn(d_in, d_sae, generator=generator) / d_in**0.5,
        "W_dec": torch.randn(d_sae, d_in, generator=generator) / d_sae**0.5,
        "b_enc": torch.randn(d_sae, generator=generator) * 0.1,
        "b_dec": torch.randn(d_in, generator=generator) * 0.1,
    }
    save_file(weights, str(directory / "sae_weights.safetensors"))
    cfg = {
        "architecture": "standard",
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "model_name": "demo-llama",
            "hook_name": f"blocks.{hook_layer}.hook_resid_post",
            "sae_lens_version": "6.5.0",
        },
    }
    (directory / "cfg.json").write_text(json.dumps(cfg, indent=2))
    return directory


def calibrate(
    model: torch.nn.Module, sae_dir: Path, seed: int
) -> tuple[dict[str, int], dict[str, float]]:
    """Pick stand-in "safety" features and their thresholds on benign prompts.

    A random SAE has no real safety features, so the demo takes the latents that are active
    most often on benign prompts (so they can fire at all) and sets each threshold at the benign
    per-token quantile, a preview of `pack calibrate`.
    """
    from monitor.features.build import load_sae

    sae = load_sae(sae_dir)
    generator = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, 512, (16, 48), generator=generator)
    with torch.no_grad():
        hidden = model(prompts, output_hidden_states=True).hidden_states[HOOK_LAYER + 1]
    values = sae.encode(hidden.flatten(0, 1))
    most_active = (values > 0).float().mean(dim=0).topk(len(FEATURE_NAMES)).indices.tolist()
    features = dict(zip(FEATURE_NAMES, most_active, strict=True))
    quantiles = torch.quantile(values[:, most_active], CALIBRATION_QUANTILE, dim=0)
    thresholds = {name: float(q) for name, q in zip(FEATURE_NAMES, quantiles, strict=True)}
    return features, thresholds


def write_rules(path: Path, features: dict[str, int], thresholds: dict[str, float]) -> Path:
    lines = ["features:"]
    lines += [f"  {name}: demo/{index}" for name, index in features.items()]
    lines += [
        "rules:",
        "  - rule: deceptive-span",
        "    desc: The deception feature stays above its calibrated threshold for 2 tokens.",
        "    category: deception",
        "    severity: critical",
        f"    condition: deception > {thresholds['deception']:.4f}",
        "    for: 2 tokens",
        '    output: "deception {value:.2f} at token {position} of {conversation_id}"',
        "    actions: [alert, audit]",
        "  - rule: bias-spike",
        "    desc: The bias feature spikes above its calibrated threshold.",
        "    category: bias",
        "    severity: warning",
        f"    condition: bias > {thresholds['bias']:.4f}",
        "    cooldown: 8 tokens",
        "    actions: [alert, audit]",
        "  - rule: misuse-with-secrecy",
        "    desc: Misuse and secrecy features are both high on the same token.",
        "    category: misuse",
        "    severity: critical",
        f"    condition: misuse > {thresholds['misuse']:.4f} and secrecy > "
        f"{thresholds['secrecy'] * 0.5:.4f}",
        "    actions: [alert, audit]",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_demo(workdir: Path | None = None, conversations: int = 4, new_tokens: int = 32) -> int:
    from monitor.logs import configure_logging

    configure_logging("console", "error")
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="safety-monitor-demo-") as tmp:
            return _run(Path(tmp), conversations, new_tokens)
    workdir.mkdir(parents=True, exist_ok=True)
    return _run(workdir, conversations, new_tokens)


def _run(workdir: Path, conversations: int, new_tokens: int) -> int:
    from monitor.capture import CaptureClient
    from monitor.features import save_pack
    from monitor.features.build import build_pack_from_sae, load_sae
    from monitor.sidecar.config import AuditSettings, SidecarConfig
    from monitor.sidecar.process import SidecarThread

    print(f"[1/5] building a tiny Llama model, an SAE and a feature pack in {workdir}")
    model = build_model()
    tokenizer = DemoTokenizer()
    sae_dir = write_saelens_sae(workdir / "sae", D_MODEL, D_SAE, HOOK_LAYER, seed=1)
    features, thresholds = calibrate(model, sae_dir, seed=2)
    pack = build_pack_from_sae(load_sae(sae_dir), list(features.values()), name="demo")
    save_pack(pack, workdir / "demo.pack.safetensors")
    rules = write_rules(workdir / "demo-rules.yaml", features, thresholds)
    print(f"[2/5] rules calibrated on benign prompts at the {CALIBRATION_QUANTILE:.0%} quantile:")
    for name, value in thresholds.items():
        print(f"        {name:<10} demo/{features[name]:<5} threshold {value:.3f}")

    audit_url = f"sqlite:///{workdir / 'audit.db'}"
    config = SidecarConfig(
        listen="127.0.0.1:0",
        metrics_port=0,
        packs=(workdir / "demo.pack.safetensors",),
        rules=(rules,),
        audit=AuditSettings(url=audit_url, window_tokens=16),
    )
    sidecar = SidecarThread(config)
    running = sidecar.start()
    print(f"[3/5] sidecar on 127.0.0.1:{running.port}, metrics on :{running.metrics_port}")
    try:
        client = CaptureClient(
            f"127.0.0.1:{running.port}", model_name="demo-llama", tokenizer=tokenizer
        )
        client.attach(model, layers=[HOOK_LAYER])
        for i, text in enumerate(PROMPTS[:conversations]):
            prompt = torch.tensor([tokenizer.encode(text)])
            conversation = f"demo-conversation-{i}"
            with client.conversation(conversation), torch.no_grad():
                model.generate(
                    prompt,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    do_sample=False,
                    pad_token_id=0,
                )
            client.end_conversation(conversation)
        client.flush(timeout=30)
        client.close()
        _print_results(client, running.metrics_port)
    finally:
        sidecar.stop()  # flushes the audit trail
    _print_audit(audit_url)
    return 0


def _print_results(client: CaptureClient, metrics_port: int) -> None:
    alerts = client.alerts
    stats = client.stats
    print(f"[4/5] {len(alerts)} alerts came back on the stream:")
    for alert in alerts:
        print(
            f"        {alert.severity:<8} {alert.rule:<20} {alert.conversation_id} "
            f"token {alert.position:<3} value {alert.value:.3f}"
        )
    print(
        f"      capture: {stats.batches_acked} batches acked, {stats.rows_acked} token rows, "
        f"dropped {dict(stats.dropped) or 0}"
    )
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    print("      sidecar /metrics:")
    for line in text.splitlines():
        if line.startswith(("safety_monitor_tokens_total", "safety_monitor_alerts_total")):
            print(f"        {line}")


def _print_audit(audit_url: str) -> None:
    from monitor.audit.cli import main as audit_main

    print(f"[5/5] the audit trail ({audit_url}): safety-monitor audit list")
    audit_main(["audit", "list", "--store", audit_url])
    flagged = _first_flagged(audit_url)
    if flagged:
        print(f"      safety-monitor audit show {flagged}   (the email is redacted before writing)")
        audit_main(["audit", "show", flagged, "--store", audit_url, "--color", "always"])


def _first_flagged(audit_url: str) -> str | None:
    from monitor.audit import open_store
    from monitor.audit.store import AuditQuery

    store = open_store(audit_url)
    try:
        conversations = store.list_conversations(AuditQuery())
    finally:
        store.close()
    ids = sorted(c.conversation_id for c in conversations)
    # Prefer the conversation whose prompt carried the email, to show redaction.
    return "demo-conversation-0" if "demo-conversation-0" in ids else (ids[0] if ids else None)
