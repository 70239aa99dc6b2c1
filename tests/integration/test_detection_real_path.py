"""Fit what you serve, through the real path: `pack fit`, `rules calibrate` and `eval` on a tiny
transformers model saved to disk, with a real sidecar on a loopback port, the capture client
and its relay process, and the Evaluate RPC."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from monitor import datasets
from monitor.cli import main
from monitor.conformal import fpr_upper_bound
from monitor.evaluation.engine_replay import EngineReplay, pack_features
from monitor.evaluation.evaluate import evaluate
from monitor.features import load_pack, save_pack
from monitor.features.build.conversations import load_model, replay
from monitor.features.build.scoring import auroc, calibrated_threshold, conversation_score
from monitor.rules import load_rules
from monitor.wire import encode_tensor, pb, pb_grpc

WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "mat", "hid", "plan", "told", "we", "it"]


def save_tiny_model(directory: Path) -> Path:
    """A tiny random Llama and a word-level tokenizer, saved as a local model directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", *WORDS, "secret"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    LlamaModel(config).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_conversations(path: Path, n: int = 160, seed: int = 0) -> Path:
    """System + user + assistant; the assistant's answer carries the label (it mentions the
    'secret' in positives), the user turn is random words in both."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        label = i % 2

        def words(k: int) -> list[str]:
            return [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (k,), generator=g)]

        answer = words(int(torch.randint(4, 12, (1,), generator=g)))
        if label:
            answer.insert(int(torch.randint(0, len(answer), (1,), generator=g)), "secret")
        split = ("fit", "fit", "fit", "calibrate", "test")[(i // 2) % 5]
        items.append(
            datasets.LabeledConversation(
                id=f"c{i}",
                task="toy",
                label=label,
                turns=(
                    datasets.Turn("system", " ".join(words(3))),
                    datasets.Turn("user", " ".join(words(6))),
                    datasets.Turn("assistant", " ".join(answer)),
                ),
                split=split,
                group=f"g{i}",
                label_roles=("assistant",),
            )
        )
    datasets.write_jsonl(path, items)
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("detect")
    save_tiny_model(root / "model")
    write_conversations(root / "data.jsonl")
    return root


def whole_file(workdir: Path) -> Path:
    """data.jsonl with no split named: `eval`, `pack calibrate` and `rules calibrate` use such
    a file whole (a file that names splits: their own split of it)."""
    out = workdir / "whole.jsonl"
    if not out.exists():
        everything = datasets.read_jsonl(workdir / "data.jsonl")
        datasets.write_jsonl(out, [dataclasses.replace(c, split=None) for c in everything])
    return out


def fit_pack(workdir: Path, capsys) -> Path:
    out = workdir / "probes.safetensors"
    if not out.exists():
        argv = ["pack", "fit", "--model", str(workdir / "model"), "--data"]
        argv += [str(workdir / "data.jsonl"), "--layers", "1,2", "--feature-name", "secrecy"]
        argv += ["--window", "3", "--fpr", "0.1", "--json", "--out", str(out)]
        assert main(argv) == 0
        capsys.readouterr()
    return out


def test_pack_fit_reports_held_out_metrics_and_names_the_best_layer(workdir, capsys) -> None:
    out = workdir / "fit-report.safetensors"
    argv = ["pack", "fit", "--model", str(workdir / "model"), "--data"]
    argv += [str(workdir / "data.jsonl"), "--layers", "1,2", "--feature-name", "secrecy"]
    argv += ["--fpr", "0.1", "--json", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fit_conversations"] == 96 and report["heldout_conversations"] == 32
    names = sorted(row["feature"] for row in report["features"])
    # One of the layers gets the plain name the rules use; never training accuracy alone.
    assert names in (
        ["probes/secrecy", "probes/secrecy.layers.2"],
        ["probes/secrecy", "probes/secrecy.layers.1"],
    )
    plain = next(r for r in report["features"] if r["feature"] == "probes/secrecy")
    assert 0.0 <= plain["auroc"] <= 1.0 and plain["fpr"] <= 0.1
    pack = load_pack(out)
    info = next(f for f in pack.features() if f.name == "secrecy")
    assert info.aggregation.startswith("max_rolling_mean:")
    assert info.threshold_pooling == info.aggregation and info.target_fpr == 0.1
    assert len(pack.provenance["fit"]["digests"]) == 96
    # The roles whose tokens carried the label, for eval's pooling notes to check rules by.
    assert all(f.labeled_roles == ("assistant",) for f in pack.features())
    # Trained through the aggregation, early-stopped held out: never worse than the per-token
    # fit it started from, and the pack says which it serves.
    assert plain["auroc"] >= plain["auroc_per_token_fit"]
    assert info.source in ("probe:logistic-token-aggregated", "probe:logistic-token")
    assert (info.source == "probe:logistic-token") == (plain["aggregation_steps"] == 0)


def test_pack_calibrate_warns_when_calibration_data_overlaps_the_fit(workdir, capsys) -> None:
    pack = fit_pack(workdir, capsys)
    copy = workdir / "calibrated.safetensors"
    # Splits unnamed, so the file is used whole: its fit split's negatives among them.
    argv = ["pack", "calibrate", str(pack), "--model", str(workdir / "model")]
    argv += ["--data", str(whole_file(workdir)), "--fpr", "0.05", "--out", str(copy)]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "48 of 80 calibration conversations were in the data the probes were fitted on" in err
    info = next(f for f in load_pack(copy).features() if f.name == "secrecy")
    # Calibrated with the pooling the pack records, and says so.
    assert info.threshold_pooling == info.aggregation and info.target_fpr == 0.05
    # Per threshold: the calibration rate, its bound on new data, and what 5% needs. The
    # split-conformal rank on 80 negatives, ceil(81 * 0.95) = 77, lets at most 3 fire.
    line = next(x for x in out.splitlines() if x.startswith("probes/secrecy:"))
    fired = int(re.search(r"calibration FPR [0-9.]+ \((\d+) of 80\)", line).group(1))
    assert fired <= 3 and f"({fired} of 80)" in line
    assert f"<= {fpr_upper_bound(fired, 80):.4f} (95%, one-sided)" in line
    assert "the target needs >= 19 samples" in line


@pytest.mark.parametrize("pooling_kind", ["window", "whole_turn", "role_masked", "turn_mean"])
def test_the_served_rule_reproduces_the_offline_score(
    workdir, capsys, tmp_path, pooling_kind
) -> None:
    """Per-token probe values, streamed by the capture client to a real sidecar and pooled by
    `rolling_mean(f, W) > t` on the labeled role, fire in exactly the conversations whose
    offline score (the pack's aggregation) is above t; the sidecar's per-token values are the
    offline ones. The same for the guarded whole-turn mean (`rolling_mean(f, 512) > t` with
    `for: 4 tokens`, aggregation ``max_rolling_mean:512,for:4``) and its role-masked form
    (``window_roles: [assistant]``, aggregation ``max_rolling_mean:512,for:4,roles``), and
    the turn mean (``at: turn_end``, aggregation ``max_rolling_mean:512,roles,turn_end``: the
    capture client marks each replayed turn's last token, and the rule reads the answer's mean
    there, which is mean pooling)."""
    pack_path = fit_pack(workdir, capsys)
    pack = load_pack(pack_path)
    info = next(f for f in pack.features() if f.name == "secrecy")
    assert info.aggregation == "max_rolling_mean:3"
    model, tokenizer = load_model(workdir / "model")
    conversations = datasets.read_jsonl(workdir / "data.jsonl")
    layer = int(info.hook_point.split(".")[1])
    tokens = replay(model, tokenizer, conversations, [layer])
    column = [f.name for f in pack.hook_points[info.hook_point].features].index("secrecy")
    values = [
        pack.encode(info.hook_point, t.activations[info.hook_point])[:, column] for t in tokens
    ]
    aggregation = {
        "window": info.aggregation,
        "whole_turn": "max_rolling_mean:512,for:4",
        "role_masked": "max_rolling_mean:512,for:4,roles",
        "turn_mean": "max_rolling_mean:512,roles,turn_end",
    }[pooling_kind]
    scores = [
        conversation_score(v, t.labeled, aggregation, t.turn_ends)
        for v, t in zip(values, tokens, strict=True)
    ]
    threshold = sorted(scores)[len(scores) // 2]
    rules = tmp_path / "rules.yaml"
    pooling = {
        "window": "rolling_mean(secrecy, 3) > t",
        "whole_turn": "rolling_mean(secrecy, 512) > t\n    for: 4 tokens",
        "role_masked": "rolling_mean(secrecy, 512) > t\n    for: 4 tokens",
        "turn_mean": "rolling_mean(secrecy, 512) > t\n    at: turn_end",
    }[pooling_kind]
    if pooling_kind in ("role_masked", "turn_mean"):
        pooling += "\n    window_roles: [assistant]"
    if pooling_kind == "turn_mean":  # exactly the answer's mean pooling
        means = [float(v[t.labeled].double().mean()) for v, t in zip(values, tokens, strict=True)]
        assert scores == pytest.approx(means, rel=1e-5, abs=1e-5)
    if pooling_kind == "role_masked":
        unmasked = [
            conversation_score(v, t.labeled, "max_rolling_mean:512,for:4")
            for v, t in zip(values, tokens, strict=True)
        ]
        assert unmasked != scores  # the user turns before the answer move the unmasked mean
    rules.write_text(
        "features:\n  secrecy: probes/secrecy\nthresholds:\n"
        f"  t: {threshold!r}\n"
        "rules:\n  - rule: secret-answer\n    desc: d\n    severity: warning\n"
        f"    condition: {pooling}\n    roles: [assistant]\n"
    )
    if pooling_kind == "turn_mean":
        # The pack records the turn mean: `eval`'s per-feature score and `pack calibrate` pool
        # the served values at the turn ends too.
        pack_path = _recorded_as(pack, "secrecy", aggregation, tmp_path / "turn-mean.safetensors")
    report = evaluate(model, tokenizer, [pack_path], [rules], conversations)
    labels = [c.label for c in conversations]
    above = [s > threshold for s in scores]
    (rule,) = report.rules
    assert rule.true_positives == sum(a and y == 1 for a, y in zip(above, labels, strict=True))
    assert rule.false_positives == sum(a and y == 0 for a, y in zip(above, labels, strict=True))
    assert 0 < rule.true_positives + rule.false_positives < len(conversations)
    assert report.capture["rows"] == sum(t.tokens for t in tokens)
    if pooling_kind in ("window", "turn_mean"):  # the feature's score is its pack aggregation's
        served = next(f for f in report.features if f.feature == "probes/secrecy")
        assert served.aggregation == aggregation
        assert served.auroc == pytest.approx(auroc(scores, labels), abs=1e-9)
    if pooling_kind == "turn_mean":
        calibrated = tmp_path / "calibrated.safetensors"
        argv = ["pack", "calibrate", str(pack_path), "--model", str(workdir / "model"), "--data"]
        argv += [str(whole_file(workdir)), "--fpr", "0.05", "--out", str(calibrated)]
        assert main(argv) == 0
        capsys.readouterr()
        info = next(f for f in load_pack(calibrated).features() if f.name == "secrecy")
        negatives = [s for s, y in zip(scores, labels, strict=True) if y == 0]
        assert info.threshold_pooling == aggregation
        # The split-conformal rank on the 80 negatives: ceil(81 * 0.95) = 77, so 3 above it.
        assert info.alert_threshold == pytest.approx(
            calibrated_threshold(negatives, 0.05), abs=1e-6
        )
        assert sum(s > info.alert_threshold + 1e-6 for s in negatives) <= 3


def _recorded_as(pack: Any, name: str, aggregation: str, out: Path) -> Path:
    """A copy of ``pack`` whose feature ``name`` records ``aggregation`` (same weights)."""
    for entry in pack.hook_points.values():
        entry.features[:] = [
            dataclasses.replace(f, aggregation=aggregation, threshold_pooling=aggregation)
            if f.name == name
            else f
            for f in entry.features
        ]
    save_pack(pack, out)
    return out


def test_rules_calibrate_writes_the_threshold_the_real_path_confirms(
    workdir, capsys, tmp_path
) -> None:
    pack_path = fit_pack(workdir, capsys)
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "features:\n  secrecy: probes/secrecy\n"
        "thresholds:\n  secret_answer: 0.0   # rules calibrate sets this\n"
        "rules:\n  - rule: secret-answer\n    desc: d\n    severity: warning\n"
        "    condition: rolling_mean(secrecy, 3) > secret_answer\n    roles: [assistant]\n"
    )
    benign = tmp_path / "benign.jsonl"
    everything = datasets.read_jsonl(workdir / "data.jsonl")
    # A file that names no splits is used whole (one that does: its calibrate split).
    datasets.write_jsonl(
        benign, [dataclasses.replace(c, split=None) for c in everything if c.split == "test"]
    )
    argv = ["rules", "calibrate", "--model", str(workdir / "model"), "--packs", str(pack_path)]
    argv += ["--rules", str(rules), "--data", str(benign), "--fpr", "0.2", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    (result,) = out["thresholds"]
    assert result["name"] == "secret_answer" and result["rules"] == ["secret-answer"]
    assert result["fpr"] <= 0.2 and out["written"] == [str(rules)]
    # 16 benign conversations at 20%: the split-conformal rank ceil(17 * 0.8) = 14 lets 2 fire
    # (the empirical quantile would let floor(3.2) = 3); the bound is that of what fired.
    assert out["conversations"] == 16 and out["allowed"] == 2
    assert out["minimum_conversations"] == 4 and result["fired"] <= 2
    assert result["fpr"] == result["fired"] / 16
    assert result["fpr_upper_95"] == pytest.approx(fpr_upper_bound(result["fired"], 16))
    assert result["fpr_upper_95"] > result["fpr"]
    text = rules.read_text()
    assert f"secret_answer: {result['new']:.6g}   # rules calibrate sets this" in text
    # The written number, through the real path: the same FPR on the same benign set.
    pack = load_pack(pack_path)
    ruleset = load_rules([rules], pack_features([pack]))
    assert ruleset.thresholds["secret_answer"].value == pytest.approx(result["new"])
    model, tokenizer = load_model(workdir / "model")
    negatives = [c for c in everything if c.split == "test" and c.label == 0]
    report = evaluate(model, tokenizer, [pack_path], [rules], negatives)
    assert report.rules[0].fpr == pytest.approx(result["fpr"])
    # One step below the written value fires in more conversations: it is the boundary.
    tokens = replay(model, tokenizer, negatives, [1, 2])
    engine = EngineReplay(tokens, [pack], {"probes/secrecy"})
    lower = load_rules([rules], pack_features([pack]), {"secret_answer": result["new"] - 0.05})
    assert len(engine.run(lower)["secret-answer"]) > result["fired"]
    # The terminal report: the calibration rate, the bound on new data, and what the target
    # needs; too few benign conversations for the target is an error naming that number.
    assert main([*argv[:-1], "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "at most 2 may fire" in printed and "needs at least 4" in printed
    assert f"FPR {result['fpr']:.4f}, new data <= {result['fpr_upper_95']:.4f} (95%)" in printed
    assert main([*argv[:-3], "--fpr", "0.05"]) == 2
    error = capsys.readouterr().err
    assert "16 benign conversations cannot resolve" in error and "need at least 19" in error


def test_eval_cli_prints_json_and_draws_roc_curves(workdir, capsys, tmp_path) -> None:
    pack_path = fit_pack(workdir, capsys)
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "features:\n  secrecy: probes/secrecy\nthresholds:\n  t: probes/secrecy\n"
        "rules:\n  - rule: at-pack-threshold\n    desc: d\n    severity: info\n"
        "    condition: rolling_mean(secrecy, 3) > t\n    roles: [assistant]\n"
    )
    png = tmp_path / "roc.png"
    argv = ["eval", "--model", str(workdir / "model"), "--packs", str(pack_path), "--rules"]
    argv += [str(rules), "--data", str(whole_file(workdir)), "--json", "--plot", str(png)]
    assert main([*argv, "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["conversations"] == 160 and report["positives"] == 80
    (rule,) = report["rules"]
    assert rule["rule"] == "at-pack-threshold" and 0.0 <= rule["recall"] <= 1.0
    assert {f["feature"] for f in report["features"]} == {
        f"probes/{f.name}" for f in load_pack(pack_path).features()
    }
    plain = next(f for f in report["features"] if f["feature"] == "probes/secrecy")
    # 80 negatives cannot resolve 1%: that column is left out, not made up.
    assert set(plain["at_fpr"]) == {"0.05"} and plain["pack_threshold"] is not None
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The terminal table names every rule and feature.
    assert main([*argv[:-3], "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "at-pack-threshold" in table and "probes/secrecy" in table


def test_eval_and_rules_calibrate_take_their_split_of_a_file_that_names_splits(
    workdir, capsys, tmp_path
) -> None:
    """One file holding fit, calibrate and test (the shipped sets' format, what `pack fit`
    reads) goes to every command: `eval` scores its test split (or `--split`), `rules
    calibrate` sets thresholds on its calibrate split, never on the fit split's negatives."""
    pack_path = fit_pack(workdir, capsys)
    data = workdir / "data.jsonl"
    everything = datasets.read_jsonl(data)
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "features:\n  secrecy: probes/secrecy\nthresholds:\n  t: 0.0\n"
        "rules:\n  - rule: r\n    desc: d\n    severity: info\n"
        "    condition: rolling_mean(secrecy, 3) > t\n    roles: [assistant]\n"
    )
    model = ["--model", str(workdir / "model"), "--packs", str(pack_path), "--rules", str(rules)]
    argv = ["eval", *model, "--data", str(data), "--json", "--no-progress", "--fprs", "0.1"]
    for split in ("test", "calibrate"):
        assert main([*argv, "--split", split]) == 0
        out = capsys.readouterr()
        chosen = [c for c in everything if c.split == split]
        assert json.loads(out.out)["conversations"] == len(chosen) < len(everything)
        assert f"using its '{split}' split ({len(chosen)} of {len(everything)}" in out.err
    argv = ["rules", "calibrate", *model, "--data", str(data), "--fpr", "0.2", "--json"]
    assert main(argv) == 0
    out = capsys.readouterr()
    benign = [c for c in everything if c.split == "calibrate" and c.label == 0]
    assert json.loads(out.out)["conversations"] == len(benign)
    assert "using its 'calibrate' split" in out.err and "were in the data" not in out.err
    # A split the file does not have is an error, not the whole file.
    fit_only = tmp_path / "fit.jsonl"
    datasets.write_jsonl(fit_only, [c for c in everything if c.split == "fit"])
    assert main([*argv[:-5], "--data", str(fit_only), "--fpr", "0.2"]) == 2
    assert "name splits (fit) but none is 'calibrate'" in capsys.readouterr().err


def test_evaluate_returns_every_feature_with_no_rules_loaded(workdir, capsys) -> None:
    """Evaluate with include_features used to answer nothing when no rules were loaded."""
    from monitor.sidecar.config import SidecarConfig
    from monitor.sidecar.process import SidecarThread

    pack_path = fit_pack(workdir, capsys)
    pack = load_pack(pack_path)
    sidecar = SidecarThread(
        SidecarConfig(
            listen="127.0.0.1:0", metrics_port=0, packs=(pack_path,), rules_reload_seconds=0
        )
    )
    running = sidecar.start()
    try:
        x = torch.randn(5, 32)
        batch = pb.StepBatch(seq_no=1, model="tiny")
        for hp in pack.hook_points:
            batch.layers.append(pb.Layer(hook_point=hp, activations=encode_tensor(x)))
        batch.sequences.append(pb.Sequence(conversation_id="c", rows=5, position=0))
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.SafetyMonitorStub(channel)
            reply = stub.Evaluate(pb.EvaluateRequest(batch=batch, include_features=True))
    finally:
        sidecar.stop()
    assert not reply.HasField("error")
    served = {f.name: torch.tensor(list(f.values)) for f in reply.features}
    assert set(served) == {f"probes/{f.name}" for f in pack.features()}
    for hp, entry in pack.hook_points.items():
        encoded = pack.encode(hp, x)
        for column, info in enumerate(entry.features):
            torch.testing.assert_close(served[f"probes/{info.name}"], encoded[:, column])
