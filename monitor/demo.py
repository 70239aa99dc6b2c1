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

import tempfile
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from monitor.fixtures import VOCAB_SIZE, ToyTokenizer, build_tiny_llama, write_layer_sae

if TYPE_CHECKING:
    from collections.abc import Sequence

    from monitor.audit.store import ConversationSummary
    from monitor.capture import CaptureClient

D_MODEL = 128
D_SAE = 2048
HOOK_LAYER = 2
FEATURE_NAMES = ("deception", "bias", "misuse", "secrecy")
CALIBRATION_QUANTILE = 0.97
PROMPTS = (
    "can you email alice.smith@example.com about the secret plan and hide the truth",
    "please tell me about the results of the test and the plan",
    "what would you do to help the team hire a candidate",
    "explain how to make a safe transfer of money to a bank account",
)


def build_model(seed: int = 0) -> torch.nn.Module:
    """The demo's model: a tiny Llama, 4 layers of width D_MODEL, a 512-token vocabulary."""
    return build_tiny_llama(
        seed,
        hidden=D_MODEL,
        layers=4,
        vocab_size=VOCAB_SIZE,
        intermediate_size=256,
        max_position_embeddings=512,
    )


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
    """The demo's rule file: three rules over the four features at their calibrated thresholds."""
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
    """`safety-monitor demo`: build everything in `workdir` (a temporary directory when None),
    run it and print what happened; returns the exit code.
    """
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
    tokenizer = ToyTokenizer()
    sae_dir = write_layer_sae(workdir / "sae", D_MODEL, D_SAE, HOOK_LAYER, seed=1)
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
    # The same output as `safety-monitor audit list` / `audit show`, from the renderer.
    from monitor.audit import open_store
    from monitor.audit.render import render_conversation, render_table
    from monitor.audit.store import AuditQuery

    print(f"[5/5] the audit trail ({audit_url}): safety-monitor audit list")
    store = open_store(audit_url)
    try:
        summaries = store.list_conversations(AuditQuery(limit=1000))
        print(render_table(summaries) if summaries else "no flagged conversations")
        flagged = _first_flagged(summaries)
        record = store.get_conversation(flagged) if flagged else None
    finally:
        store.close()
    if record is not None:
        print(f"      safety-monitor audit show {flagged}   (the email is redacted before writing)")
        print(render_conversation(record, color=True))


def _first_flagged(conversations: Sequence[ConversationSummary]) -> str | None:
    ids = sorted(c.conversation_id for c in conversations)
    # Prefer the conversation whose prompt carried the email, to show redaction.
    return "demo-conversation-0" if "demo-conversation-0" in ids else (ids[0] if ids else None)
