"""`pooled()` in a running sidecar: rules that pool as their pack recorded fire byte for byte
as the hand-written equivalent over gRPC, and a sidecar restarted on a refitted pack serves the
same rule file with the new pack's pooling."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import grpc
import torch

from monitor.features import save_pack
from monitor.features.build.probes import ProbeFit, probe_encoder
from monitor.features.pack import FeatureInfo, FeaturePack, HookPointEncoder
from monitor.fixtures import SidecarProcess, start_sidecar
from monitor.wire import encode_tensor, pb, pb_grpc

HOOK = "layers.1"
D_MODEL = 16
ROLES = (("system", 6), ("user", 30), ("assistant", 20), ("user", 25), ("assistant", 15))

POOLED = """\
features: {p: probes/p}
rules:
  - rule: pooled-probe
    severity: warning
    condition: pooled(p) > 0.2
    cooldown: 8 tokens
    labels: {team: t}
    output: "p {value:.4f} at {position} ({start}-{end}) of {conversation_id}"
"""
# What pooled(p) stands for with the pack's `max_rolling_mean:6,for:3,roles` (labeled: user).
HAND = """\
features: {p: probes/p}
rules:
  - rule: pooled-probe
    severity: warning
    condition: rolling_mean(p, 6) > 0.2
    for: 3 tokens
    roles: [user]
    window_roles: [user]
    cooldown: 8 tokens
    labels: {team: t}
    output: "p {value:.4f} at {position} ({start}-{end}) of {conversation_id}"
"""


def _pack(path: Path, aggregation: str) -> Path:
    weight = torch.randn(D_MODEL, generator=torch.Generator().manual_seed(7)) / 4
    fit = ProbeFit(HOOK, weight, 0.1, "logistic-token", 1.0)
    info = FeatureInfo(
        name="p",
        hook_point=HOOK,
        activation="identity",
        sae_index=None,
        alert_threshold=0.2,
        aggregation=aggregation,
        threshold_pooling=aggregation,
        labeled_roles=("user",),
    )
    save_pack(
        FeaturePack("probes", {HOOK: HookPointEncoder(HOOK, probe_encoder(fit), [info])}), path
    )
    return path


def _batches(prefix: str = "c") -> list[pb.StepBatch]:
    """Three conversations, each turn one batch (as the capture client sends a prefill)."""
    g = torch.Generator().manual_seed(11)
    batches = []
    for c in range(3):
        position = 0
        for role, rows in ROLES:
            batch = pb.StepBatch(seq_no=len(batches) + 1, model="m")
            acts = torch.randn(rows, D_MODEL, generator=g) + 0.3 * (c + 1)
            batch.layers.append(pb.Layer(hook_point=HOOK, activations=encode_tensor(acts)))
            batch.sequences.append(
                pb.Sequence(conversation_id=f"{prefix}{c}", rows=rows, position=position, role=role)
            )
            batches.append(batch)
            position += rows
    return batches


def _events(sidecar: SidecarProcess, prefix: str = "c") -> list[bytes]:
    with grpc.insecure_channel(sidecar.target) as channel:
        stub = pb_grpc.SafetyMonitorStub(channel)
        events = list(stub.Monitor(iter(_batches(prefix)), timeout=60))
    return [event.SerializeToString(deterministic=True) for event in events]


def _alerts(events: list[bytes]) -> list[tuple[str, int, float]]:
    """(conversation index, position, value) of each alert: comparable across id prefixes."""
    parsed = [pb.MonitorEvent.FromString(e) for e in events]
    return [
        (e.alert.conversation_id[-1:], e.alert.position, e.alert.value)
        for e in parsed
        if e.HasField("alert")
    ]


def _serve(workdir: Path, pack: Path, rules: str, reload_seconds: float = 2) -> SidecarProcess:
    workdir.mkdir()
    (workdir / "rules.yaml").write_text(rules)
    config = {
        "packs": [str(pack)],
        "rules": [str(workdir / "rules.yaml")],
        "rules_reload_seconds": reload_seconds,
    }
    return start_sidecar(config, workdir, cwd=Path(__file__).resolve().parents[2])


def _stop(sidecar: SidecarProcess) -> None:
    sidecar.process.send_signal(signal.SIGTERM)
    try:
        sidecar.process.wait(30)
    finally:
        if sidecar.process.poll() is None:
            sidecar.process.kill()
            sidecar.process.wait(10)


def test_pooled_rules_fire_as_the_hand_written_ones_over_grpc(tmp_path: Path) -> None:
    pack = _pack(tmp_path / "probes.safetensors", "max_rolling_mean:6,for:3,roles")
    streams = []
    for name, rules in (("pooled", POOLED), ("hand", HAND)):
        sidecar = _serve(tmp_path / name, pack, rules)
        try:
            streams.append(_events(sidecar))
        finally:
            _stop(sidecar)
    pooled, hand = streams
    assert pooled == hand  # byte for byte: alerts (rule, position, value, output) and acks
    alerts = [pb.MonitorEvent.FromString(e) for e in pooled]
    alerts = [e.alert for e in alerts if e.HasField("alert")]
    assert alerts, "the test data must make the rule fire"
    # Only at the user's tokens (roles from the pack's labeled roles), never at the first 2
    # of a turn (`for: 3` from the pack: another role's tokens break the run).
    starts, position = [], 0
    for role, rows in ROLES:
        if role == "user":
            starts.append(range(position + 2, position + rows))
        position += rows
    assert all(any(a.position in turn for turn in starts) for a in alerts), alerts


def test_a_restart_on_a_refitted_pack_serves_its_pooling(tmp_path: Path) -> None:
    """The sidecar loads packs at start; the same rule file on a refitted pack (another
    window, no guard, not role-masked) fires as that pack's hand-written rule does."""
    pack = _pack(tmp_path / "refit.safetensors", "max_rolling_mean:3")
    hand = (
        HAND.replace("rolling_mean(p, 6)", "rolling_mean(p, 3)")
        .replace("    for: 3 tokens\n", "")
        .replace("    window_roles: [user]\n", "")
    )
    streams = []
    for name, rules in (("pooled", POOLED), ("hand", hand)):
        sidecar = _serve(tmp_path / name, pack, rules)
        try:
            streams.append(_events(sidecar))
        finally:
            _stop(sidecar)
    assert streams[0] == streams[1]
    first = [pb.MonitorEvent.FromString(e) for e in streams[0]]
    assert any(e.HasField("alert") for e in first)


def test_a_reload_after_a_pack_change_keeps_the_running_packs_pooling(tmp_path: Path) -> None:
    """Packs load at start. A pack file rewritten with another aggregation is logged as
    changed; a rule reload (here SIGHUP) expands pooled() from the pack being served, so the
    alerts stay those of the running probe and its pooling, not a mix of old weights and new
    pooling."""
    pack = _pack(tmp_path / "probes.safetensors", "max_rolling_mean:6,for:3,roles")
    sidecar = _serve(tmp_path / "s", pack, POOLED, reload_seconds=0)
    try:
        before = _alerts(_events(sidecar, "a"))
        assert before
        _pack(pack, "max_rolling_mean:3")  # a refit on disk: another pooling
        sidecar.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while not any(e.get("event") == "rules reloaded" for e in sidecar.log_events()):
            assert time.monotonic() < deadline, "SIGHUP did not reload the rules"
            time.sleep(0.1)
        (warning,) = [e for e in sidecar.log_events() if "pack file changed" in e["event"]]
        assert warning["pack"] == str(pack)
        assert _alerts(_events(sidecar, "b")) == before
    finally:
        _stop(sidecar)


def test_the_demo_checks_a_turn_end_pooled_rule_at_each_turn_end(
    tmp_path: Path, monkeypatch, capsys
) -> None:  # type: ignore[no-untyped-def]
    """The real-weights demo marks each replayed turn's end: with a pack whose misuse probe
    pools at turn ends (and a threshold every score clears), its pooled() rule is `at:
    turn_end` and fires once at every user turn's end, so every misuse conversation alerts.
    Without the marks it would never be checked (no alert at all)."""
    import dataclasses
    import re

    import monitor.demo_minilm
    from monitor.cli import main
    from monitor.features import load_pack

    aggregation = "max_rolling_mean:512,roles,turn_end"
    pack = load_pack(monitor.demo_minilm.PACK)
    hooks = {}
    for hook, encoder in pack.hook_points.items():
        features = [
            dataclasses.replace(
                f, aggregation=aggregation, threshold_pooling=aggregation, alert_threshold=-1e9
            )
            if f.name == "misuse"
            else f
            for f in encoder.features
        ]
        hooks[hook] = HookPointEncoder(hook, encoder.encoder, features)
    path = tmp_path / "turn-end.safetensors"
    save_pack(FeaturePack(pack.name, hooks, provenance=pack.provenance), path)
    monkeypatch.setattr(monitor.demo_minilm, "PACK", path)
    assert main(["demo", "--workdir", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    misuse = re.search(r"misuse: (\d+) of (\d+) label-1 alerted, (\d+) of (\d+) label-0", out)
    assert misuse is not None, out
    hits, positives, silent, _ = map(int, misuse.groups())
    assert hits == positives > 0 and silent == 0  # every conversation's user turn end fired
    rules = (tmp_path / "demo" / "demo-rules.yaml").read_text()
    assert "pooled(misuse)" in rules
