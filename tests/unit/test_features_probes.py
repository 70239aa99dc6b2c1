"""Probe fitting, activation capture from a transformers model, and FPR calibration."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from monitor.features import FeatureError, load_pack, save_pack
from monitor.features.build.probes import (
    calibrate_pack,
    calibrate_thresholds,
    fit_probe,
    fit_probes,
    load_labeled_jsonl,
    pool,
    sample_scores,
    token_activations,
)

WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "ran",
    "on",
    "mat",
    "hid",
    "secret",
    "plan",
    "told",
    "truth",
    "lie",
    "quietly",
]


def planted(
    n: int = 800, d: int = 48, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(d, generator=g)
    direction /= direction.norm()
    y = (torch.rand(n, generator=g) < 0.5).long()
    x = torch.randn(n, d, generator=g) + (2 * y - 1).unsqueeze(1) * 0.8 * direction + 5.0
    return x, y, direction


@pytest.mark.parametrize("method", ["logistic", "diff-means"])
def test_probe_recovers_planted_direction(method: str) -> None:
    x, y, direction = planted()
    fit = fit_probe(x, y, method=method)
    cosine = float(fit.weight @ direction / fit.weight.norm())
    assert cosine > 0.9, cosine
    assert fit.train_accuracy > 0.75
    # The folded weight applies to raw (unstandardised) activations.
    x_test, y_test, _ = planted(n=2000, seed=0)
    assert ((x_test @ fit.weight + fit.bias > 0).long() == y_test).float().mean() > 0.75


def test_one_class_is_a_clear_error() -> None:
    x, _, _ = planted(n=20)
    with pytest.raises(FeatureError, match="both labels 0 and 1"):
        fit_probe(x, torch.ones(20, dtype=torch.long))


@pytest.mark.parametrize("fpr", [0.01, 0.05, 0.2])
def test_calibration_hits_fpr_on_held_out_benign(fpr: float) -> None:
    g = torch.Generator().manual_seed(7)
    n = 5000
    calibration = torch.randn(n, 3, generator=g) * torch.tensor([1.0, 3.0, 0.2]) + 1.0
    held_out = torch.randn(n, 3, generator=g) * torch.tensor([1.0, 3.0, 0.2]) + 1.0
    thresholds = calibrate_thresholds(calibration, fpr)
    observed = (held_out > thresholds).float().mean(dim=0)
    # Two independent samples of size n: the rate's standard error is sqrt(2 p (1 - p) / n).
    tolerance = 4 * math.sqrt(2 * fpr * (1 - fpr) / n)
    assert ((observed - fpr).abs() < tolerance).all(), observed
    assert ((calibration > thresholds).float().mean(dim=0) <= fpr).all()


def test_calibration_needs_enough_samples() -> None:
    with pytest.raises(FeatureError, match="cannot resolve"):
        calibrate_thresholds(torch.randn(50, 1), 0.001)
    with pytest.raises(FeatureError, match="not in"):
        calibrate_thresholds(torch.randn(50, 1), 1.5)


@pytest.mark.parametrize("pooling", ["mean", "last", "max"])
def test_pool(pooling: str) -> None:
    tokens = torch.tensor([[1.0, 5.0], [3.0, -1.0]])
    expected = {"mean": [2.0, 2.0], "last": [3.0, -1.0], "max": [3.0, 5.0]}[pooling]
    assert pool(tokens, pooling).tolist() == expected


# --- end to end on a tiny transformers model -----------------------------------------------


def tiny_model_and_tokenizer() -> tuple[torch.nn.Module, object]:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from monitor.fixtures import build_tiny_llama

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", *WORDS, "user:", "assistant:"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]")
    model = build_tiny_llama(
        0,
        hidden=32,
        layers=3,
        vocab_size=len(vocab),
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return model, tokenizer


def write_dataset(path: Path, n: int = 60) -> Path:
    g = torch.Generator().manual_seed(1)
    lines = []
    for i in range(n):
        words = [WORDS[int(j)] for j in torch.randint(0, 8, (6,), generator=g)]
        label = i % 2
        if label:
            words.insert(int(torch.randint(0, 6, (1,), generator=g)), "secret")
        text = " ".join(words)
        if i % 3 == 0:
            lines.append({"messages": [{"role": "user", "content": text}], "label": bool(label)})
        else:
            lines.append({"text": text, "label": label})
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def test_fit_probes_on_a_model(tmp_path: Path) -> None:
    model, tokenizer = tiny_model_and_tokenizer()
    examples = load_labeled_jsonl(write_dataset(tmp_path / "train.jsonl"))
    pack = fit_probes(
        model,
        tokenizer,
        examples,
        [0, 2],
        name="probes",
        feature_name="secrecy",
        method="logistic",
        pooling="max",
        category="deception",
    )
    assert sorted(pack.hook_points) == ["layers.0", "layers.2"]
    feature = pack.hook_points["layers.0"].features[0]
    # The first layer keeps the plain name the rules refer to ('probes/secrecy').
    assert feature.name == "secrecy" and feature.activation == "identity"
    assert pack.hook_points["layers.2"].features[0].name == "secrecy.layers.2"
    assert feature.aggregation == "max"
    assert feature.source == "probe:logistic:max" and feature.category == "deception"
    # The probe's logit per token, max-pooled, separates the classes it was fit on.
    texts = [e.text or e.messages[0]["content"] for e in examples]  # type: ignore[index]
    acts = token_activations(model, tokenizer, texts, [0])["layers.0"]
    scores = sample_scores(pack, "layers.0", acts, "max").squeeze(1)
    labels = torch.tensor([e.label for e in examples])
    assert ((scores > 0).long() == labels).float().mean() > 0.9
    calibrated = calibrate_pack(pack, {"layers.0": sample_scores(pack, "layers.0", acts)}, 0.1)
    save_pack(calibrated, tmp_path / "p.safetensors")
    info = load_pack(tmp_path / "p.safetensors").hook_points["layers.0"].features[0]
    assert info.target_fpr == 0.1 and info.alert_threshold is not None


def test_token_activations_match_the_layer_output() -> None:
    model, tokenizer = tiny_model_and_tokenizer()
    acts = token_activations(model, tokenizer, ["the cat sat", "a dog"], [1])["layers.1"]
    assert [a.shape for a in acts] == [(3, 32), (2, 32)]  # padding is dropped
    ids = tokenizer(["the cat sat"], return_tensors="pt")
    hidden = model(**ids, output_hidden_states=True).hidden_states[2][0]
    torch.testing.assert_close(acts[0], hidden)


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ('{"text": "x"}', "label"),
        ('{"text": "x", "label": 2}', "label"),
        ('{"label": 1}', "text"),
        ('{"messages": [{"role": "user"}], "label": 1}', "messages"),
        ("not json", "invalid JSON"),
    ],
)
def test_bad_datasets(tmp_path: Path, line: str, needle: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok", "label": 0}\n' + line + "\n")
    with pytest.raises(FeatureError) as exc:
        load_labeled_jsonl(path)
    assert f"{path}:2" in str(exc.value) and needle in str(exc.value)


def test_fit_probes_one_class_dataset(tmp_path: Path) -> None:
    model, tokenizer = tiny_model_and_tokenizer()
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "the cat", "label": 1}\n{"text": "a dog", "label": 1}\n')
    with pytest.raises(FeatureError, match="both labels"):
        fit_probes(model, tokenizer, load_labeled_jsonl(path), [0], name="p")
