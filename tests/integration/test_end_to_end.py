"""The walking skeleton end to end: a real sidecar process, a transformers model generating
with the capture client attached, a rule crafted to fire at a known token and one crafted to
stay silent. Nothing is mocked."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc
import torch

from monitor.capture import CaptureClient
from monitor.features.build import load_sae
from monitor.fixtures import build_tiny_llama
from monitor.wire import encode_tensor, pb, pb_grpc
from tests.conftest import build_pack_with_cli

HIDDEN = 64
HOOK_LAYER = 1
FEATURES = list(range(0, 64, 4))  # 16 SAE features out of 256
PROMPTS = {"conv-alpha": 11, "conv-beta": 17}  # conversation id -> prompt length
NEW_TOKENS = 12


@dataclass(frozen=True)
class CraftedRule:
    feature: int
    threshold: float
    conversation_id: str
    position: int
    silent_feature: int
    silent_threshold: float


def _generate(model: torch.nn.Module, prompt: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(
            prompt,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
        )


def _prompts() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return {c: torch.randint(1, 256, (1, n), generator=generator) for c, n in PROMPTS.items()}


def _reference_features(model, sae_dir: Path, outputs: dict[str, torch.Tensor]):
    """Feature values at every position the model ran forward on (all but the last token)."""
    encoder = load_sae(sae_dir).restrict(FEATURES)
    values = {}
    hidden_states = {}
    for conversation, tokens in outputs.items():
        with torch.no_grad():
            hidden = model(tokens[:, :-1], output_hidden_states=True).hidden_states
        hidden_states[conversation] = hidden[HOOK_LAYER + 1][0]
        values[conversation] = encoder.encode(hidden_states[conversation])
    return values, hidden_states


def _craft_rule(values: dict[str, torch.Tensor]) -> CraftedRule:
    """Pick the feature and conversation whose maximum stands out most, so a threshold just
    below it fires exactly once, at a known token, in that conversation only."""
    best = None
    for column, feature in enumerate(FEATURES):
        for conversation, series in values.items():
            others = [v[:, column].max() for c, v in values.items() if c != conversation]
            top2 = series[:, column].topk(2).values
            margin = float(top2[0] - max(top2[1], *others))
            if best is None or margin > best[0]:
                position = int(series[:, column].argmax())
                best = (margin, feature, conversation, position, float(top2[0]))
    margin, feature, conversation, position, peak = best
    assert margin > 1e-3, f"no feature separates the conversations (margin {margin})"
    everything = torch.cat(list(values.values()))
    silent_column = 1 if FEATURES[0] == feature else 0
    return CraftedRule(
        feature=feature,
        threshold=peak - margin / 2,
        conversation_id=conversation,
        position=position,
        silent_feature=FEATURES[silent_column],
        silent_threshold=float(everything[:, silent_column].max()) + 1.0,
    )


def _write_rules(path: Path, crafted: CraftedRule) -> Path:
    path.write_text(
        f"""
features:
  hot: bars/{crafted.feature}
  cold: bars/{crafted.silent_feature}
rules:
  - rule: crafted-to-fire
    desc: Fires once, at the token where the chosen feature peaks.
    category: misuse
    severity: critical
    condition: hot > {crafted.threshold!r}
    output: "hot {{value:.3f}} at token {{position}} of {{conversation_id}}"
  - rule: crafted-silent
    desc: Threshold above every value the model produced.
    category: bias
    severity: warning
    condition: cold > {crafted.silent_threshold!r}
    for: 2 tokens
"""
    )
    return path


def test_generate_streams_to_sidecar_and_the_crafted_rule_fires(tmp_path, sidecar_factory):
    model = build_tiny_llama(seed=0, hidden=HIDDEN)
    prompts = _prompts()
    unmonitored = {c: _generate(model, p) for c, p in prompts.items()}
    pack = build_pack_with_cli(
        tmp_path, d_in=HIDDEN, d_sae=256, hook_layer=HOOK_LAYER, features=FEATURES
    )
    values, _ = _reference_features(model, tmp_path / "bars-sae", unmonitored)
    crafted = _craft_rule(values)
    rules = _write_rules(tmp_path / "rules.yaml", crafted)
    sidecar = sidecar_factory({"packs": [str(pack)], "rules": [str(rules)]})

    client = CaptureClient(sidecar.target, model_name="tiny-llama")
    client.attach(model, layers=[HOOK_LAYER])
    monitored = {}
    for conversation, prompt in prompts.items():
        with client.conversation(conversation):
            monitored[conversation] = _generate(model, prompt)
    assert client.flush(timeout=60)
    client.close()

    # The hook never changes what the model computes.
    for conversation in prompts:
        assert torch.equal(monitored[conversation], unmonitored[conversation])

    # Tokens counted = positions the model ran forward on: prompt + generated, less the last.
    expected_tokens = sum(out.shape[1] - 1 for out in monitored.values())
    assert client.stats.rows_acked == expected_tokens
    assert client.stats.dropped.total() == 0
    assert sidecar.metric("safety_monitor_tokens_total") == expected_tokens
    # One message per forward: a prefill plus one per decode step, per conversation.
    assert client.stats.batches_acked == len(prompts) * NEW_TOKENS

    # The alert on the stream: right rule, conversation and token position; nothing else.
    fired = [(a.rule, a.conversation_id, a.position) for a in client.alerts]
    assert fired == [("crafted-to-fire", crafted.conversation_id, crafted.position)]
    alert = client.alerts[0]
    assert (alert.category, alert.severity) == ("misuse", "critical")
    assert alert.value > crafted.threshold
    assert alert.message == (
        f"hot {alert.value:.3f} at token {crafted.position} of {crafted.conversation_id}"
    )

    # ... in /metrics ...
    labels = {"rule": "crafted-to-fire", "category": "misuse", "severity": "critical"}
    assert sidecar.metric("safety_monitor_alerts_total", **labels) == 1
    silent = {"rule": "crafted-silent", "category": "bias", "severity": "warning"}
    assert sidecar.metric("safety_monitor_alerts_total", **silent) == 0

    # ... and in the structured log, with the conversation id on the line.
    fired_lines = [e for e in sidecar.log_events() if e.get("event") == "rule fired"]
    assert [(e["rule"], e["conversation_id"], e["position"]) for e in fired_lines] == fired
    assert sidecar.stop() == 0


def test_evaluate_scores_a_whole_conversation_in_one_message(tmp_path, sidecar_factory):
    """The unary Evaluate RPC: the same crafted rule fires at the same token when the whole
    conversation arrives as one prefill-sized message (chunking invariance end to end)."""
    model = build_tiny_llama(seed=0, hidden=HIDDEN)
    outputs = {c: _generate(model, p) for c, p in _prompts().items()}
    pack = build_pack_with_cli(
        tmp_path, d_in=HIDDEN, d_sae=256, hook_layer=HOOK_LAYER, features=FEATURES
    )
    values, hidden = _reference_features(model, tmp_path / "bars-sae", outputs)
    crafted = _craft_rule(values)
    rules = _write_rules(tmp_path / "rules.yaml", crafted)
    sidecar = sidecar_factory({"packs": [str(pack)], "rules": [str(rules)]})

    batch = pb.StepBatch(seq_no=1, model="tiny-llama")
    activations = torch.cat([hidden[c] for c in outputs])
    batch.layers.append(
        pb.Layer(hook_point=f"layers.{HOOK_LAYER}", activations=encode_tensor(activations))
    )
    for conversation in outputs:
        batch.sequences.append(
            pb.Sequence(
                conversation_id=conversation, rows=hidden[conversation].shape[0], position=0
            )
        )
    with grpc.insecure_channel(sidecar.target) as channel:
        stub = pb_grpc.SafetyMonitorStub(channel)
        reply = stub.Evaluate(pb.EvaluateRequest(batch=batch, include_features=True), timeout=30)
        status = stub.GetStatus(pb.StatusRequest(), timeout=10)
    assert not reply.HasField("error")
    assert [(a.rule, a.conversation_id, a.position) for a in reply.alerts] == [
        ("crafted-to-fire", crafted.conversation_id, crafted.position)
    ]
    served = {f.name: torch.tensor(list(f.values)) for f in reply.features}
    expected = torch.cat([values[c] for c in outputs])[:, FEATURES.index(crafted.feature)]
    torch.testing.assert_close(served[f"bars/{crafted.feature}"], expected, rtol=1e-5, atol=1e-5)
    # Evaluate changes no stream state and counts no stream tokens.
    assert sidecar.metric("safety_monitor_tokens_total") == 0
    assert [p.name for p in status.packs] == ["bars"]
    assert dict(status.packs[0].hook_points) == {f"layers.{HOOK_LAYER}": HIDDEN}
    assert status.rules == 2
    assert [Path(f.path).name for f in status.rule_files] == ["rules.yaml"]
    assert len(status.rule_files[0].sha256) == 64
    assert status.limits.max_rows_per_batch > 0
