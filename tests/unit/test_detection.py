"""Detection you can measure, the parts without a model: conversation scores against the real
rules engine, metrics, per-token probe fitting, named thresholds in rule files, and the
threshold search of `rules calibrate`."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from monitor.evaluation.calibrate import _search, replace_thresholds, thresholds_used
from monitor.features import load_pack, save_pack
from monitor.features.build.conversations import ConversationTokens
from monitor.features.build.probes import ProbeFit, probe_encoder
from monitor.features.build.scoring import (
    aggregation_guard,
    aggregation_masked,
    auroc,
    conversation_score,
    parse_aggregation,
    recall_at_fpr,
    rolling_mean,
    threshold_at_fpr,
)
from monitor.features.build.token_probes import (
    _Padded,
    fit_layers,
    fit_through_aggregation,
    fit_token_probe,
    score_conversations,
    token_values,
    window_reads_other_roles,
)
from monitor.features.errors import FeatureError
from monitor.features.pack import FeatureInfo, FeaturePack, HookPointEncoder
from monitor.rules import RuleEngine, RuleLoadError, SequenceSlice, load_rules

RULE = """
features:
  f: probes/f
thresholds:
  t: {threshold}
rules:
  - rule: r
    desc: the rule calibrate sets
    severity: info
    condition: rolling_mean(f, {window}) > t
    roles: [assistant]
    for: {guard} tokens{window_roles}
"""
MASKED = "\n    window_roles: [assistant]"


def _conversation(g: torch.Generator, turns: list[tuple[str, int]]) -> tuple[torch.Tensor, list]:
    values = torch.randn(sum(n for _, n in turns), generator=g) * 2
    return values, turns


def _engine_fires(
    rules_path: Path, conversations: list[tuple[torch.Tensor, list[tuple[str, int]]]]
) -> dict[str, list[tuple[int, float]]]:
    """Feed each conversation turn by turn (one message per turn, as capture does)."""
    engine = RuleEngine(load_rules([rules_path]))
    fired: dict[str, list[tuple[int, float]]] = {}
    for index, (values, turns) in enumerate(conversations):
        start = 0
        for role, n in turns:
            result = engine.evaluate(
                {"probes/f": values[start : start + n]},
                [SequenceSlice(f"c{index}", 0, n, start, role=role)],
            )
            for firing in result.firings:
                fired.setdefault(firing.conversation_id, []).append((firing.position, firing.value))
            start += n
    return fired


@pytest.mark.parametrize("window", [1, 4, 16])
def test_rule_fires_exactly_when_the_offline_score_is_above_its_threshold(tmp_path, window):
    """The value a rule sees per token, pooled by the rule, is the offline conversation score:
    `rolling_mean(f, W) > t` on the labeled role fires in a conversation iff
    max_rolling_mean:W over its labeled tokens is above t (windows cross turns)."""
    g = torch.Generator().manual_seed(window)
    conversations = [
        _conversation(g, [("system", 5), ("user", 7), ("assistant", int(n))])
        for n in torch.randint(1, 30, (60,), generator=g)
    ]
    scores = []
    for values, turns in conversations:
        labeled = torch.tensor([r == "assistant" for r, n in turns for _ in range(n)])
        scores.append(conversation_score(values, labeled, f"max_rolling_mean:{window}"))
    threshold = sorted(scores)[len(scores) // 2]
    path = tmp_path / "r.yaml"
    path.write_text(RULE.format(threshold=repr(threshold), window=window, guard=1, window_roles=""))
    fired = _engine_fires(path, conversations)
    expected = {f"c{i}" for i, s in enumerate(scores) if s > threshold}
    assert set(fired) == expected and 20 < len(expected) < 40
    # Every value the rule reported is a rolling mean of the stream, as scoring computes it.
    for index, (values, _) in enumerate(conversations):
        reference = rolling_mean(values, window)
        for position, value in fired.get(f"c{index}", []):
            assert value == pytest.approx(float(reference[position]), rel=1e-6, abs=1e-6)


@pytest.mark.parametrize(
    ("window", "guard", "masked"),
    [(512, 4, False), (512, 8, False), (4, 3, False), (512, 4, True), (512, 8, True),
     (512, 1, True), (4, 3, True)],
)  # fmt: skip
def test_a_guarded_whole_turn_mean_rule_reproduces_its_score(tmp_path, window, guard, masked):
    """`rolling_mean(f, 512) > t` with `for: K tokens` on the labeled role: the whole-turn mean
    (everything seen so far), which the first K - 1 tokens of a turn cannot fire on alone.
    It fires in a conversation iff max_rolling_mean:512,for:K is above t, also when the
    labeled role comes in several turns (another role breaks a `for` run) or is shorter
    than K (never fires: the score is -inf). With `window_roles: [assistant]` the mean takes
    in the labeled role's tokens alone: it fires iff max_rolling_mean:512,for:K,roles is."""
    g = torch.Generator().manual_seed(guard)
    conversations = []
    for n in torch.randint(1, 24, (80,), generator=g).tolist():
        turns = [("system", 5), ("assistant", n)]
        if n % 3 == 0:  # a second labeled turn after a user turn
            turns += [("user", 4), ("assistant", n // 3 + 1)]
        values = torch.randn(sum(k for _, k in turns), generator=g) + 0.3 * torch.randn(
            (), generator=g
        )  # a per-conversation offset, so whole-turn means differ between conversations
        conversations.append((values, turns))
    aggregation = f"max_rolling_mean:{window},for:{guard}" + (",roles" if masked else "")
    scores = []
    for values, turns in conversations:
        labeled = torch.tensor([r == "assistant" for r, n in turns for _ in range(n)])
        scores.append(conversation_score(values, labeled, aggregation))
    finite = sorted(s for s in scores if s > -math.inf)
    # some conversations have no run of K labeled tokens
    assert len(finite) < len(scores) or guard == 1
    threshold = finite[len(finite) // 2]
    path = tmp_path / "r.yaml"
    extra = MASKED if masked else ""
    path.write_text(
        RULE.format(threshold=repr(threshold), window=window, guard=guard, window_roles=extra)
    )
    fired = _engine_fires(path, conversations)
    expected = {f"c{i}" for i, s in enumerate(scores) if s > threshold}
    assert set(fired) == expected and 10 < len(expected) < 60
    # Served training score (hard max of the padded grid) is the same score.
    tokens = [
        ConversationTokens(
            f"c{i}", i % 2, {"layers.0": values[:, None]}, [r for r, n in turns for _ in range(n)],
            torch.tensor([r == "assistant" for r, n in turns for _ in range(n)]),
            [n for _, n in turns],
        )
        for i, (values, turns) in enumerate(conversations)
    ]  # fmt: skip
    grid = _Padded(tokens, "layers.0")
    served = grid.pooled(grid.x[:, 0], window, None, guard, masked)
    torch.testing.assert_close(
        served, torch.tensor(scores, dtype=torch.float64), rtol=1e-5, atol=1e-5
    )


def test_a_guard_scores_the_smallest_mean_of_each_run() -> None:
    values = torch.tensor([5.0, -1.0, 1.0, 1.0, 0.0, 9.0])
    labeled = torch.tensor([True, True, True, True, False, True])
    # cumulative means 5, 2, 5/3, 1.5, 1.2, 2.5; runs of 2 labeled tokens end at 1, 2, 3.
    assert conversation_score(values, labeled, "max_rolling_mean:512,for:2") == pytest.approx(2.0)
    assert conversation_score(values, labeled, "max_rolling_mean:512,for:4") == pytest.approx(1.5)
    assert conversation_score(values, labeled, "max_rolling_mean:512,for:5") == -math.inf
    assert conversation_score(values, labeled, "max_rolling_mean:512") == pytest.approx(5.0)


def test_rolling_mean_counts_only_the_tokens_seen() -> None:
    values = torch.tensor([2.0, 4.0, 6.0, 8.0])
    assert rolling_mean(values, 2).tolist() == [2.0, 3.0, 5.0, 7.0]
    assert rolling_mean(values, 10).tolist() == [2.0, 3.0, 4.0, 5.0]


def test_aggregations_parse_and_reject() -> None:
    assert parse_aggregation("max_rolling_mean:8") == ("max_rolling_mean", 8)
    assert parse_aggregation("max") == ("max_rolling_mean", 1)
    assert parse_aggregation("mean") == ("mean", 0)
    assert parse_aggregation("max_rolling_mean:512,for:8") == ("max_rolling_mean", 512)
    assert aggregation_guard("max_rolling_mean:512,for:8") == 8
    assert aggregation_guard("max_rolling_mean:8") == 1
    assert parse_aggregation("max_rolling_mean:512,for:8,roles") == ("max_rolling_mean", 512)
    assert aggregation_guard("max_rolling_mean:512,for:8,roles") == 8
    assert aggregation_masked("max_rolling_mean:512,for:8,roles")
    assert aggregation_masked("max_rolling_mean:4,roles")
    assert not aggregation_masked("max_rolling_mean:512,for:8")
    for bad in (
        "max_rolling_mean", "max_rolling_mean:0", "median", "mean:3", "mean,for:2",
        "max_rolling_mean:8,for:0", "max_rolling_mean:8,for:65", "max_rolling_mean:8,after:2",
        "mean,roles", "max_rolling_mean:8,roles,roles", "max_rolling_mean:8,for:2,for:3",
        "max_rolling_mean:8,role",
    ):  # fmt: skip
        with pytest.raises(FeatureError):
            parse_aggregation(bad)
    assert conversation_score(torch.ones(3), torch.zeros(3, dtype=torch.bool), "max") == -math.inf


def test_auroc_matches_counting_pairs() -> None:
    g = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 6, (80,), generator=g).float().tolist()  # many ties
    labels = torch.randint(0, 2, (80,), generator=g).tolist()
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    pairs = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
    assert auroc(scores, labels) == pytest.approx(pairs)
    assert math.isnan(auroc([1.0, 2.0], [1, 1]))


def test_threshold_at_fpr_allows_at_most_that_many_negatives() -> None:
    negatives = [float(i) for i in range(200)]
    t = threshold_at_fpr(negatives, 0.01)
    assert sum(n > t for n in negatives) == 2
    point = recall_at_fpr([*negatives, 198.5, 500.0, 1.0], [0] * 200 + [1, 1, 1], 0.01)
    assert point.fpr == 0.01 and point.recall == pytest.approx(2 / 3)


def _planted_tokens(n: int, d: int, seed: int) -> tuple[list[ConversationTokens], torch.Tensor]:
    """Conversations whose labeled (assistant) tokens carry a direction when label is 1; the
    user turn carries it in every conversation (an unlabeled role must not teach the probe)."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(d, generator=g)
    direction /= direction.norm()
    result = []
    for i in range(n):
        label = i % 2
        user, assistant = 6, int(torch.randint(4, 20, (1,), generator=g))
        x = torch.randn(user + assistant, d, generator=g)
        x[:user] += 3 * direction
        if label:
            x[user + 2 : user + 5] += 3 * direction  # a short span, not the whole answer
        roles = ["user"] * user + ["assistant"] * assistant
        result.append(
            ConversationTokens(
                f"c{i}",
                label,
                {"layers.0": x},
                roles,
                torch.tensor([r == "assistant" for r in roles]),
                [user, assistant],
            )
        )
    return result, direction


def test_token_probe_learns_the_planted_direction_from_labeled_tokens_only() -> None:
    tokens, direction = _planted_tokens(400, 24, seed=0)
    fit = fit_token_probe(tokens, "layers.0")
    cosine = float(torch.nn.functional.cosine_similarity(fit.weight, direction, dim=0))
    assert cosine > 0.8
    # The served value is the pack's encoder output.
    values = token_values(tokens[0], "layers.0", fit)
    encoded = probe_encoder(fit).encode(tokens[0].activations["layers.0"])[:, 0]
    torch.testing.assert_close(values, encoded)


def test_fit_layers_reports_held_out_metrics_and_chooses_a_window() -> None:
    fit_tokens, _ = _planted_tokens(300, 24, seed=1)
    heldout, _ = _planted_tokens(300, 24, seed=1)  # same direction, fresh noise below
    heldout = [
        ConversationTokens(
            t.id, t.label, {"layers.0": t.activations["layers.0"] + 0.1}, t.roles, t.labeled,
            t.turn_rows,
        )
        for t in heldout
    ]  # fmt: skip
    (result,) = fit_layers(fit_tokens, heldout, ["layers.0"], fpr=0.01, windows=(1, 3, 32))
    assert result.heldout["auroc"] > 0.95 and result.heldout["fpr"] <= 0.01
    assert set(result.by_window) == {1, 3, 32}
    # A 3-token span: a 32-token mean dilutes it, so 32 is not the chosen window.
    assert result.aggregation in ("max_rolling_mean:1", "max_rolling_mean:3")
    # 20 negatives cannot resolve 1%: the threshold is their highest score, and it says so.
    (small,) = fit_layers(fit_tokens, heldout[:40], ["layers.0"], fpr=0.01)
    assert small.heldout["threshold_at_max_negative"] == 1.0 and small.heldout["fpr"] == 0.0


def test_pack_records_aggregation_threshold_pooling_and_provenance(tmp_path: Path) -> None:
    fit = ProbeFit("layers.1", torch.randn(8), 0.5, "logistic-token", 1.0)
    info = FeatureInfo(
        name="misuse",
        hook_point="layers.1",
        activation="identity",
        sae_index=None,
        alert_threshold=1.25,
        target_fpr=0.01,
        aggregation="max_rolling_mean:8",
        threshold_pooling="max_rolling_mean:8",
    )
    pack = FeaturePack(
        "probes",
        {"layers.1": HookPointEncoder("layers.1", probe_encoder(fit), [info])},
        provenance={"fit": {"digests": ["abc"], "conversations": 1}},
    )
    save_pack(pack, tmp_path / "p.safetensors")
    loaded = load_pack(tmp_path / "p.safetensors")
    assert loaded.features()[0] == info
    assert loaded.provenance == {"fit": {"digests": ["abc"], "conversations": 1}}


# --- named thresholds in rule files ---------------------------------------------------------


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    return path


PACK_RULES = """
features:
  f: probes/f
thresholds:
  calibrated: 2.5
  from_pack: probes/f
rules:
  - rule: by-number
    desc: d
    severity: info
    condition: f > calibrated
  - rule: by-pack
    desc: d
    severity: info
    condition: f > from_pack
"""


def test_thresholds_are_numbers_or_a_pack_features_calibrated_value(tmp_path: Path) -> None:
    path = _write(tmp_path, PACK_RULES)
    ruleset = load_rules([path], {"probes/f": 1.75})
    assert ruleset.thresholds["calibrated"].value == 2.5
    assert ruleset.thresholds["from_pack"].value == 1.75
    assert ruleset.thresholds["from_pack"].feature == "probes/f"
    engine = RuleEngine(ruleset)
    result = engine.evaluate(
        {"probes/f": torch.tensor([2.0, 3.0])}, [SequenceSlice("c", 0, 2, 0, role="user")]
    )
    assert [(f.rule, f.position) for f in result.firings] == [
        ("by-pack", 0),
        ("by-number", 1),
    ]
    assert thresholds_used(ruleset) == {"calibrated": ["by-number"], "from_pack": ["by-pack"]}
    overridden = load_rules([path], {"probes/f": 1.75}, {"calibrated": 0.0})
    assert overridden.thresholds["calibrated"].value == 0.0


@pytest.mark.parametrize(
    ("known", "message"),
    [
        (None, "rules.yaml:6:14: threshold 'from_pack' is probes/f's calibrated alert threshold"),
        ({"probes/f": None}, "6:14: threshold 'from_pack': feature 'probes/f' has no calibrated"),
        ({"probes/g": 1.0}, "6:14: threshold 'from_pack': unknown feature 'probes/f'"),
    ],
)
def test_a_threshold_naming_a_pack_feature_needs_its_calibrated_value(
    tmp_path: Path, known, message
) -> None:
    path = _write(tmp_path, PACK_RULES)
    with pytest.raises(RuleLoadError) as caught:
        load_rules([path], known)
    text = str(caught.value)
    assert message in text
    assert "unknown feature 'from_pack'" not in text  # no second error for the same name


@pytest.mark.parametrize(
    ("value", "message"),
    [(".nan", "must be finite"), ("[1]", "must be a number or"), ("'a b'", "must be a number")],
)
def test_bad_thresholds_are_located_errors(tmp_path: Path, value: str, message: str) -> None:
    path = _write(tmp_path, PACK_RULES.replace("calibrated: 2.5", f"calibrated: {value}"))
    with pytest.raises(RuleLoadError, match=message):
        load_rules([path], {"probes/f": 1.0})


def test_a_threshold_name_is_one_name_among_aliases_and_macros(tmp_path: Path) -> None:
    path = _write(tmp_path, PACK_RULES.replace("calibrated: 2.5", "f: 2.5"))
    with pytest.raises(RuleLoadError, match="'f' is already defined"):
        load_rules([path], {"probes/f": 1.0})
    with pytest.raises(RuleLoadError, match="no threshold named 'nope'"):
        load_rules([_write(tmp_path, PACK_RULES)], {"probes/f": 1.0}, {"nope": 1.0})


def test_replace_thresholds_changes_only_the_numbers(tmp_path: Path) -> None:
    text = (
        "# header comment\nthresholds:\n  a: 1.5   # set by calibrate\n  b: -2\n"
        "  c: probes/f\nrules: []\n"
    )
    updated = replace_thresholds(text, {"a": 0.123456, "b": 3.0})
    assert updated == (
        "# header comment\nthresholds:\n  a: 0.123456   # set by calibrate\n  b: 3\n"
        "  c: probes/f\nrules: []\n"
    )
    with pytest.raises(ValueError, match="no threshold 'z'"):
        replace_thresholds(text, {"z": 1.0})


@pytest.mark.parametrize("direction", [1, -1])
def test_search_finds_the_boundary_either_way(direction: int) -> None:
    """`x > t` fires less as t grows, `x < t` more: the search measures which."""
    critical = sorted(torch.randn(500, generator=torch.Generator().manual_seed(5)).tolist())

    def rate(value: float) -> int:
        return sum((c > value) if direction == 1 else (c < value) for c in critical)

    value, fired, note = _search(rate, 10.0, 5)
    assert fired <= 5 and not note
    # One step further towards more firings exceeds the allowance.
    assert rate(value - direction * 1e-3) > 5 or rate(value - direction * 1e-2) > 5


# --- capture tagging: what `eval` streams must be what the rules engine is fed offline ------


def test_one_role_and_request_id_apply_to_every_row_unsuffixed() -> None:
    """Per-row conversation ids with the default role and request id: every row is 'assistant'
    with request '' (they used to become 'assistant/0', '/1', ...: no `roles:` rule matched,
    and `scope: request` rules restarted whenever a conversation's row index changed)."""
    from monitor.capture.hooks import ConversationContext, PositionLedger, StepAssembler

    assembler = StepAssembler(
        ["layers.0"], PositionLedger(), emit=lambda step: None, drop=print, want_token_ids=False
    )
    per_row = ConversationContext(("a", "b", "c"), ("assistant",), ("",))
    tagging = assembler._tagging(per_row, 3)
    assert tagging is not None
    assert tagging.conversation_ids == ("a", "b", "c")
    assert tagging.roles == ("assistant",) * 3 and tagging.request_ids == ("",) * 3
    # One id over two rows (num_return_sequences): only the ids get '/<j>'.
    shared = ConversationContext(("a",), ("user",), ("r1",))
    tagging = assembler._tagging(shared, 2)
    assert tagging is not None
    assert tagging.conversation_ids == ("a/0", "a/1")
    assert tagging.roles == ("user", "user") and tagging.request_ids == ("r1", "r1")


def _span_tokens(n: int, seed: int) -> list[ConversationTokens]:
    """Only a 2-token span carries the harm (direction s) in label-1 conversations; a weak
    direction c runs through every token of them (a template: "How do I ...") and spikes on a
    few tokens of label-0 ones (hard negatives). Per token, c predicts the label; pooled by a
    max, its spikes make false alarms."""
    g = torch.Generator().manual_seed(seed)
    d = 16
    s, c = torch.eye(d)[0], torch.eye(d)[1]
    result = []
    for i in range(n):
        label = i % 2
        length = int(torch.randint(12, 30, (1,), generator=g))
        x = torch.randn(length, d, generator=g)
        at = int(torch.randint(0, length - 2, (1,), generator=g))
        if label:
            x += 1.5 * c
            x[at : at + 2] += 3 * s
        else:
            x[at : at + 2] += 5 * c
        roles = ["user"] * length
        result.append(
            ConversationTokens(
                f"c{i}", label, {"layers.0": x}, roles, torch.ones(length, dtype=torch.bool),
                [length],
            )
        )  # fmt: skip
    return result


def test_training_through_the_aggregation_improves_the_served_score() -> None:
    """Fitted per token, the probe leans on the template direction and its max fires on hard
    negatives; trained through max-of-rolling-means it finds the span, and the served (hard
    max) score, measured on fresh data, is much better."""
    fit_tokens, heldout, test = _span_tokens(300, 1), _span_tokens(200, 2), _span_tokens(200, 3)
    labels = [t.label for t in test]
    per_token = fit_token_probe(fit_tokens, "layers.0")
    trained = fit_through_aggregation(fit_tokens, heldout, per_token, 1)
    assert trained.steps > 0 and trained.auroc > trained.initial_auroc
    before = auroc(score_conversations(test, "layers.0", per_token, "max"), labels)
    after = auroc(score_conversations(test, "layers.0", trained.fit, "max"), labels)
    assert after > 0.95 and after > before + 0.05
    # What is served is the folded probe: the pack's encoder gives the same per-token values.
    encoded = probe_encoder(trained.fit).encode(test[0].activations["layers.0"])[:, 0]
    torch.testing.assert_close(token_values(test[0], "layers.0", trained.fit), encoded)


def test_fit_layers_trains_through_the_aggregation_unless_told_not_to() -> None:
    fit_tokens, heldout = _span_tokens(200, 4), _span_tokens(120, 5)
    # The windowed candidate alone: every label-1 token carries the template direction, so the
    # turn mean would win here (see test_fit_layers_offers_the_turn_mean).
    (trained,) = fit_layers(
        fit_tokens, heldout, ["layers.0"], fpr=0.05, windows=(1, 4), guards=(), turn_mean=False
    )
    (plain,) = fit_layers(
        fit_tokens, heldout, ["layers.0"], fpr=0.05, windows=(1, 4), train_aggregation=False
    )
    assert (
        trained.fit.method == "logistic-token-aggregated" and plain.fit.method == "logistic-token"
    )
    assert "auroc_per_token_fit" not in plain.heldout
    assert trained.heldout["auroc_per_token_fit"] == pytest.approx(plain.heldout["auroc"])
    assert trained.heldout["auroc"] > plain.heldout["auroc"] + 0.05


def _diffuse_tokens(count: int, seed: int) -> list[ConversationTokens]:
    """Where mean pooling works: every token of a long user turn carries a weak signal
    (a small shift along one direction for label 1) under strong noise, so only the mean
    over the whole turn separates the classes; a short window's max does not."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.nn.functional.normalize(torch.ones(8), dim=0)
    result = []
    for i in range(count):
        label = i % 2
        n = int(torch.randint(80, 140, (1,), generator=g))
        x = torch.randn(n, 8, generator=g) + 0.35 * label * direction
        result.append(
            ConversationTokens(
                f"c{i}", label, {"layers.0": x}, ["user"] * n, torch.ones(n, dtype=torch.bool), [n]
            )
        )
    return result


def test_fit_layers_chooses_the_whole_turn_mean_where_mean_pooling_works() -> None:
    """The windowed candidates' best (32 tokens) sees part of the turn; the whole-turn mean
    (the labeled role's last 512 tokens, guarded), trained through, sees all of it and is
    chosen held out. It is
    still not mean pooling: a causal rule cannot know where the turn ends, so it fires on
    the best prefix of at least K tokens, and short noisy prefixes cost some AUROC against
    the same probe's mean over the finished turn (which no rule serves)."""
    fit_tokens, heldout, test = (_diffuse_tokens(240, s) for s in (6, 7, 8))
    (result,) = fit_layers(
        fit_tokens, heldout, ["layers.0"], fpr=0.05, windows=(1, 8, 32), turn_mean=False
    )
    assert result.aggregation.startswith("max_rolling_mean:512,for:")
    assert result.aggregation.endswith(",roles")
    assert result.heldout["auroc_whole_turn"] > result.heldout["auroc_windowed"] + 0.02
    labels = [t.label for t in test]
    served = auroc(score_conversations(test, "layers.0", result.fit, result.aggregation), labels)
    pooled = auroc(score_conversations(test, "layers.0", result.fit, "mean"), labels)
    windowed = auroc(
        score_conversations(test, "layers.0", result.fit, "max_rolling_mean:32"), labels
    )
    assert served > 0.9 and served > windowed + 0.1 and pooled >= served
    (fixed,) = fit_layers(
        fit_tokens, heldout, ["layers.0"], fpr=0.05, windows=(1, 8, 32), guards=(),
        turn_mean=False,
    )  # fmt: skip
    assert fixed.aggregation.startswith("max_rolling_mean:") and "for" not in fixed.aggregation
    assert "auroc_whole_turn" not in fixed.heldout


def test_a_rule_that_pools_unlike_its_pack_is_named(tmp_path: Path) -> None:
    """`eval` and `rules calibrate` say when a rule's `rolling_mean(f, W)` and `for:` differ
    from the aggregation the pack fitted and calibrated the probe with."""
    from monitor.evaluation.engine_replay import pack_features, pooling_notes

    fit = ProbeFit("layers.1", torch.randn(8), 0.5, "logistic-token", 1.0)
    info = FeatureInfo(
        name="f", hook_point="layers.1", activation="identity", sae_index=None,
        alert_threshold=1.0, aggregation="max_rolling_mean:512,for:8",
        threshold_pooling="max_rolling_mean:512,for:8",
    )  # fmt: skip
    pack = FeaturePack(
        "probes", {"layers.1": HookPointEncoder("layers.1", probe_encoder(fit), [info])}
    )
    matching = tmp_path / "matching.yaml"
    matching.write_text(RULE.format(threshold=1.0, window=512, guard=8, window_roles=""))
    assert pooling_notes(load_rules([matching], pack_features([pack])), [pack]) == []
    for window, guard, roles in ((8, 8, ""), (512, 1, ""), (512, 8, MASKED)):
        other = tmp_path / f"other-{window}-{guard}-{bool(roles)}.yaml"
        other.write_text(RULE.format(threshold=1.0, window=window, guard=guard, window_roles=roles))
        (line,) = pooling_notes(load_rules([other], pack_features([pack])), [pack])
        assert f"rolling_mean(., {window}) with for: {guard}" in line
        assert "max_rolling_mean:512,for:8" in line
    # A role-masked aggregation wants `window_roles:` on the rule.
    info = dataclasses.replace(info, aggregation="max_rolling_mean:512,for:8,roles")
    pack = FeaturePack(
        "probes", {"layers.1": HookPointEncoder("layers.1", probe_encoder(fit), [info])}
    )
    (line,) = pooling_notes(load_rules([matching], pack_features([pack])), [pack])
    assert "no window_roles" in line and "window_roles: the labeled roles" in line
    masked = tmp_path / "masked.yaml"
    masked.write_text(RULE.format(threshold=1.0, window=512, guard=8, window_roles=MASKED))
    assert pooling_notes(load_rules([masked], pack_features([pack])), [pack]) == []


def test_a_rule_on_roles_the_probe_was_not_labeled_on_is_named(tmp_path: Path) -> None:
    """A pack that records the roles its fit data labeled (`pack fit` writes them): a rule
    pooling the probe must name those roles in `roles:` and, for a role-masked aggregation,
    in `window_roles:`; an older pack without them is checked as before."""
    from monitor.evaluation.engine_replay import pack_features, pooling_notes

    fit = ProbeFit("layers.1", torch.randn(8), 0.5, "logistic-token", 1.0)
    info = FeatureInfo(
        name="f", hook_point="layers.1", activation="identity", sae_index=None,
        alert_threshold=1.0, aggregation="max_rolling_mean:512,for:8,roles",
        threshold_pooling="max_rolling_mean:512,for:8,roles", labeled_roles=("assistant",),
    )  # fmt: skip

    def notes(info: FeatureInfo, window_roles: str, roles: str = "assistant") -> list[str]:
        pack = FeaturePack(
            "probes", {"layers.1": HookPointEncoder("layers.1", probe_encoder(fit), [info])}
        )
        path = tmp_path / "rules.yaml"
        text = RULE.format(threshold=1.0, window=512, guard=8, window_roles=window_roles)
        path.write_text(text.replace("roles: [assistant]", f"roles: [{roles}]", 1))
        return pooling_notes(load_rules([path], pack_features([pack])), [pack])

    assert notes(info, MASKED) == []
    (line,) = notes(info, "\n    window_roles: [user]")
    assert "window_roles: [user]" in line
    assert "roles: [assistant] and window_roles: [assistant], the roles its fit data" in line
    (line,) = notes(info, "\n    window_roles: [assistant, tool]")
    assert "window_roles: [assistant, tool]" in line
    (line,) = notes(info, MASKED, roles="user")  # fires on the user's tokens
    assert "roles: [user] and window_roles: [assistant]" in line
    # Not role-masked: the labeled roles for `roles:` and no window_roles.
    plain = dataclasses.replace(info, aggregation="max_rolling_mean:512,for:8")
    assert notes(plain, "") == []
    (line,) = notes(plain, "", roles="user")
    assert "roles: [assistant] and no window_roles, the roles its fit data labeled" in line
    # A pack written before `labeled_roles` existed: any window_roles list passes.
    assert notes(dataclasses.replace(info, labeled_roles=()), "\n    window_roles: [user]") == []


def test_pack_fit_records_the_labeled_roles_of_its_fit_data() -> None:
    from monitor.datasets import LabeledConversation, Turn
    from monitor.features.build.labeled import SimpleConversation, SimpleTurn
    from monitor.features.build.token_probes import labeled_roles

    turns = (Turn("system", "s"), Turn("user", "u"), Turn("assistant", "a"))
    named = LabeledConversation("a", "t", 1, turns, label_roles=("assistant",))
    unnamed = SimpleConversation("b", 0, (SimpleTurn("user", "u"), SimpleTurn("tool", "t")))
    assert labeled_roles([named]) == ("assistant",)
    assert labeled_roles([named, unnamed]) == ("assistant", "tool", "user")  # all present


def _prompted(conversations: list[ConversationTokens], prompt: int) -> list[ConversationTokens]:
    """Each conversation behind a system prompt of `prompt` tokens that states its label
    outright (the shipped deception set's "Always lie to the user"): a shortcut no detector
    of the labeled text should learn."""
    result = []
    for c in conversations:
        x = c.activations["layers.0"]
        shortcut = torch.zeros(prompt, x.shape[1])
        shortcut[:, 0] = 3.0 * c.label
        roles = ["system"] * prompt + c.roles
        labeled = torch.cat([torch.zeros(prompt, dtype=torch.bool), c.labeled])
        result.append(
            ConversationTokens(
                c.id, c.label, {"layers.0": torch.cat([shortcut, x])}, roles, labeled,
                [prompt, *c.turn_rows],
            )
        )  # fmt: skip
    return result


def test_the_role_masked_whole_turn_mean_cannot_read_the_prompt() -> None:
    """Each conversation behind a system prompt that states its label outright: the
    role-masked whole-turn mean, which reads the labeled role's tokens alone, is trained to the
    same held-out AUROC as without the prompt, and its score does not move when the test set's
    prompts say the opposite label. A short window still reads the prompt's last tokens at
    the start of the turn (here it learns the shortcut and wins held out): `fit_layers`
    reports that, and the window's score does move."""
    fit_tokens, heldout, test = (_diffuse_tokens(120, s) for s in (6, 7, 8))
    windows = (1, 8, 32)
    (plain,) = fit_layers(fit_tokens, heldout, ["layers.0"], fpr=0.05, windows=windows)
    (prompted,) = fit_layers(
        _prompted(fit_tokens, 12), _prompted(heldout, 12), ["layers.0"], fpr=0.05,
        windows=windows,
    )  # fmt: skip
    # The turn mean (role-masked too) wins on this data, where mean pooling works.
    assert plain.aggregation == "max_rolling_mean:512,roles,turn_end"
    assert prompted.heldout["auroc_whole_turn"] == pytest.approx(plain.heldout["auroc_whole_turn"])
    assert prompted.heldout["auroc_turn_mean"] == pytest.approx(plain.heldout["auroc_turn_mean"])
    assert plain.heldout["windowed_reads_other_roles"] == 0.0
    assert prompted.heldout["windowed_reads_other_roles"] == 1.0
    assert window_reads_other_roles(_prompted(fit_tokens, 12), 2)  # the first labeled token
    swapped = [
        ConversationTokens(c.id, 1 - c.label, c.activations, c.roles, c.labeled, c.turn_rows)
        for c in test
    ]  # the prompt says the opposite label; then the true labels are put back
    swapped = [
        ConversationTokens(s.id, c.label, s.activations, s.roles, s.labeled, s.turn_rows)
        for s, c in zip(_prompted(swapped, 12), test, strict=True)
    ]
    labels = [c.label for c in test]
    for fit in (plain.fit, prompted.fit):
        honest = score_conversations(_prompted(test, 12), "layers.0", fit, plain.aggregation)
        lying = score_conversations(swapped, "layers.0", fit, plain.aggregation)
        assert honest == lying
    assert auroc(lying, labels) > 0.8
    windowed = "max_rolling_mean:32"
    honest = score_conversations(_prompted(test, 12), "layers.0", prompted.fit, windowed)
    lying = score_conversations(swapped, "layers.0", prompted.fit, windowed)
    assert auroc(lying, labels) < auroc(honest, labels) - 0.1


def test_the_demo_rules_pool_as_each_probe_was_fitted(tmp_path: Path) -> None:
    """`make demo` writes rules from the pack: a role-masked aggregation gets `window_roles:`
    on the labeled role, and the rules load and pool as the pack says (no pooling note)."""
    from monitor.demo_minilm import write_rules
    from monitor.evaluation.engine_replay import pack_features, pooling_notes

    aggregations = {
        "misuse": "max_rolling_mean:512,for:8,roles",
        "deception": "max_rolling_mean:1",
        "bias": "max_rolling_mean:4,for:2",
    }
    entries = []
    for i, (name, aggregation) in enumerate(aggregations.items()):
        fit = ProbeFit(f"layers.{i}", torch.randn(8), 0.5, "logistic-token", 1.0)
        info = FeatureInfo(
            name=name, hook_point=f"layers.{i}", activation="identity", sae_index=None,
            alert_threshold=1.0, aggregation=aggregation, threshold_pooling=aggregation,
        )  # fmt: skip
        entries.append((f"layers.{i}", HookPointEncoder(f"layers.{i}", probe_encoder(fit), [info])))
    pack = FeaturePack("probes", dict(entries))
    path = write_rules(tmp_path / "demo-rules.yaml", pack)
    ruleset = load_rules([path], pack_features([pack]))
    rules = {rule.name: rule for rule in ruleset.rules}
    assert rules["misuse-request"].window_roles == ("user",)
    assert rules["misuse-request"].for_tokens == 8
    assert rules["deceptive-answer"].window_roles == () == rules["biased-answer"].window_roles
    assert rules["biased-answer"].for_tokens == 2
    assert pooling_notes(ruleset, [pack]) == []
    # The rules follow the pack: a pack with other poolings (and recorded labeled roles) is
    # served with its own, from the same rule file.
    refit = FeaturePack(
        "probes",
        {
            hook: HookPointEncoder(
                hook,
                encoder.encoder,
                [
                    dataclasses.replace(
                        encoder.features[0],
                        aggregation="max_rolling_mean:16,for:4",
                        labeled_roles=("assistant",),
                    )
                ],
            )
            for hook, encoder in pack.hook_points.items()
        },
    )
    ruleset = load_rules([write_rules(tmp_path / "refit.yaml", refit)], pack_features([refit]))
    assert {(r.for_tokens, r.window_roles) for r in ruleset.rules} == {(4, ())}
    windows = {i.param for r in ruleset.rules for i in r.condition.program if i.param == (16.0,)}
    assert windows == {(16.0,)}


def test_pooling_notes_escape_role_names_from_rule_files_and_packs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Role names in a pooling note come from a rule file and a pack (files from elsewhere):
    a terminal control in one is shown escaped, and cannot forge a second note line."""
    from monitor.evaluation.cli import _note
    from monitor.evaluation.engine_replay import pack_features, pooling_notes

    hostile = "\x1b[2J\x1b[31mowned\nsafety-monitor: note: all clear"
    fit = ProbeFit("layers.1", torch.randn(8), 0.5, "logistic-token", 1.0)
    # Built in memory: `load_pack` refuses such a role (test_features_pack).
    info = FeatureInfo(
        name="f", hook_point="layers.1", activation="identity", sae_index=None,
        alert_threshold=1.0, aggregation="max_rolling_mean:512,for:8,roles",
        threshold_pooling="max_rolling_mean:512,for:8,roles", labeled_roles=(hostile,),
    )  # fmt: skip
    pack = FeaturePack(
        "probes", {"layers.1": HookPointEncoder("layers.1", probe_encoder(fit), [info])}
    )
    path = tmp_path / "rules.yaml"
    window_roles = '\n    window_roles: ["\\e[2J"]'  # YAML double-quoted: an ESC character
    path.write_text(RULE.format(threshold=1.0, window=512, guard=8, window_roles=window_roles))
    ruleset = load_rules([path], pack_features([pack]))
    assert ruleset.rules[0].window_roles == ("\x1b[2J",)  # the rule really holds the ESC
    (line,) = pooling_notes(ruleset, [pack])
    assert "\x1b" not in line and "\n" not in line
    assert "window_roles: [\\x1b[2J]" in line  # the rule's role, escaped
    assert "\\x1b[2J\\x1b[31mowned\\x0asafety-monitor: note: all clear" in line  # the pack's
    _note(line)
    _note("a plain note\x1b[2J")  # what `_note` prints is escaped whatever its caller passes
    err = capsys.readouterr().err
    assert "\x1b" not in err
    lines = err.splitlines()  # two notes, two lines: the forged "note:" stays inside the first
    assert len(lines) == 2 and lines[0].startswith("safety-monitor: note: rule 'r' pools")
    assert lines[1] == "safety-monitor: note: a plain note\\x1b[2J"


def test_the_demo_rules_quote_role_names_from_the_pack(tmp_path: Path) -> None:
    """The demo writes a pack's labeled roles into YAML: each stays one role name, whatever
    YAML syntax it holds (no injection of keys or list items)."""
    from monitor.demo_minilm import write_rules
    from monitor.evaluation.engine_replay import pack_features

    roles = ("user], roles: [system", "a # b", "x: y", "\x1b[2J")
    entries = []
    for i, name in enumerate(("misuse", "deception", "bias")):
        fit = ProbeFit(f"layers.{i}", torch.randn(8), 0.5, "logistic-token", 1.0)
        info = FeatureInfo(
            name=name, hook_point=f"layers.{i}", activation="identity", sae_index=None,
            alert_threshold=1.0, aggregation="max_rolling_mean:4,for:2,roles",
            threshold_pooling="max_rolling_mean:4,for:2,roles", labeled_roles=roles,
        )  # fmt: skip
        entries.append((f"layers.{i}", HookPointEncoder(f"layers.{i}", probe_encoder(fit), [info])))
    pack = FeaturePack("probes", dict(entries))
    path = write_rules(tmp_path / "demo-rules.yaml", pack)
    assert "\x1b" not in path.read_text()
    ruleset = load_rules([path], pack_features([pack]))
    # pooled() takes them from the pack (the file does not spell them out), each one role.
    assert {frozenset(rule.window_roles) for rule in ruleset.rules} == {frozenset(roles)}
    assert all(rule.roles != ("system",) for rule in ruleset.rules)
