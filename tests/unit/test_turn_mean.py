"""The turn mean: mean pooling served exactly by a rule checked at turn ends.

`max_rolling_mean:W[,roles],turn_end` reads the rolling mean only at the labeled turns' last
tokens (what `rolling_mean(f, W) > t` with `roles:`, `window_roles:` and `at: turn_end`
fires on); `pack fit` offers `max_rolling_mean:512,roles,turn_end` as a third candidate,
started from a logistic regression on the pooled vectors. The offline parts, and the rule
against the real rules engine."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

from monitor.features.build.conversations import ConversationTokens
from monitor.features.build.probes import ProbeFit
from monitor.features.build.scoring import (
    aggregation_guard,
    aggregation_masked,
    aggregation_turn_end,
    auroc,
    conversation_score,
    parse_aggregation,
    rolling_mean,
    turn_ends,
)
from monitor.features.build.token_probes import (
    TURN_MEAN,
    _Padded,
    _TurnMeans,
    fit_layers,
    fit_pooled_probe,
    fit_through_aggregation,
    pooled_vectors,
    score_conversations,
    token_values,
)
from monitor.features.errors import FeatureError

Turns = list[tuple[str, int]]


def _tokens(
    index: int, label: int, x: torch.Tensor, turns: Turns, labeled_role: str = "assistant"
) -> ConversationTokens:
    roles = [r for r, n in turns for _ in range(n)]
    return ConversationTokens(
        f"c{index}", label, {"layers.0": x}, roles,
        torch.tensor([r == labeled_role for r in roles]), [n for _, n in turns],
    )  # fmt: skip


def test_turn_end_aggregations_parse_and_for_is_rejected() -> None:
    assert parse_aggregation(TURN_MEAN) == ("max_rolling_mean", 512)
    assert aggregation_turn_end(TURN_MEAN) and aggregation_masked(TURN_MEAN)
    assert aggregation_guard(TURN_MEAN) == 1
    assert aggregation_turn_end("max_rolling_mean:4,turn_end")
    assert not aggregation_masked("max_rolling_mean:4,turn_end")
    assert aggregation_turn_end("max_rolling_mean:512,turn_end,roles")  # any order
    assert not aggregation_turn_end("max_rolling_mean:512,for:8,roles")
    # A rule checked once per turn has no run of consecutive tokens to guard.
    for bad in ("max_rolling_mean:512,for:8,roles,turn_end", "max_rolling_mean:4,turn_end,for:2"):
        with pytest.raises(FeatureError, match="for:K cannot be combined with turn_end") as err:
            parse_aggregation(bad)
        assert err.value.field == "aggregation"
    for bad in ("mean,turn_end", "max_rolling_mean:8,turn_end,turn_end", "max_rolling_mean:8,end"):
        with pytest.raises(FeatureError):
            parse_aggregation(bad)


def test_turn_ends_mark_each_turns_last_token() -> None:
    assert turn_ends([2, 3, 1]).tolist() == [False, True, False, False, True, True]
    assert turn_ends([2, 0, 1]).tolist() == [False, True, True]  # an empty turn has no end
    conversation = _tokens(0, 1, torch.zeros(6, 1), [("user", 2), ("assistant", 4)])
    assert conversation.turn_ends.tolist() == [False, True, False, False, False, True]


def test_the_turn_mean_is_the_labeled_roles_mean_at_each_labeled_turn_end() -> None:
    # system 2 | assistant 3 | user 2 | assistant 2
    values = torch.tensor([9.0, 9.0, 1.0, 2.0, 3.0, 9.0, 9.0, 6.0, 0.0])
    turns = [("system", 2), ("assistant", 3), ("user", 2), ("assistant", 2)]
    conversation = _tokens(0, 1, values[:, None], turns)
    labeled, ends = conversation.labeled, conversation.turn_ends
    # Masked: assistant tokens 1, 2, 3, 6, 0; read at their turn ends: mean(1,2,3) = 2 and
    # mean(1,2,3,6,0) = 2.4.
    assert conversation_score(values, labeled, TURN_MEAN, ends) == pytest.approx(2.4)
    assert conversation_score(values, labeled, "max_rolling_mean:2,roles,turn_end", ends) == 3.0
    # Unmasked, window 2, at the assistant turns' ends: mean(2, 3) = 2.5, mean(6, 0) = 3.
    assert conversation_score(values, labeled, "max_rolling_mean:2,turn_end", ends) == 3.0
    # For one labeled turn it is exactly mean pooling of that turn.
    single = _tokens(1, 0, values[:5, None], turns[:2])
    assert conversation_score(
        values[:5], single.labeled, TURN_MEAN, single.turn_ends
    ) == pytest.approx(2.0)
    assert conversation_score(values[:5], single.labeled, "mean") == pytest.approx(2.0)
    with pytest.raises(ValueError, match="pass turn_end"):
        conversation_score(values, labeled, TURN_MEAN)
    none = torch.zeros(9, dtype=torch.bool)
    assert conversation_score(values, none, TURN_MEAN, ends) == -math.inf


def _random_conversations(count: int, seed: int) -> list[tuple[torch.Tensor, Turns]]:
    """Random per-token values over system / assistant / user turns, some conversations with
    two assistant turns, with a per-conversation offset so the means differ."""
    g = torch.Generator().manual_seed(seed)
    result = []
    for n in torch.randint(1, 24, (count,), generator=g).tolist():
        turns = [("system", 5), ("assistant", n)]
        if n % 3 == 0:
            turns += [("user", 4), ("assistant", n // 3 + 1)]
        total = sum(k for _, k in turns)
        values = torch.randn(total, generator=g) + 0.5 * torch.randn((), generator=g)
        result.append((values, turns))
    return result


@pytest.mark.parametrize("aggregation", [TURN_MEAN, "max_rolling_mean:4,turn_end"])
def test_the_training_grid_serves_the_same_turn_end_score(aggregation: str) -> None:
    """`fit_through_aggregation` early-stops on `_Padded.pooled`'s hard max: it must be the
    score `conversation_score` (and so the rule) gives."""
    conversations = _random_conversations(60, 3)
    tokens = [_tokens(i, i % 2, v[:, None], t) for i, (v, t) in enumerate(conversations)]
    scores = [
        conversation_score(v, c.labeled, aggregation, c.turn_ends)
        for (v, _), c in zip(conversations, tokens, strict=True)
    ]
    assert all(math.isfinite(s) for s in scores)
    grid = _Padded(tokens, "layers.0")
    _, window = parse_aggregation(aggregation)
    served = grid.pooled(
        grid.x[:, 0], window, None, masked=aggregation_masked(aggregation), turn_end=True
    )
    torch.testing.assert_close(served, torch.tensor(scores, dtype=torch.float64))
    if aggregation == TURN_MEAN:  # training's shortcut: one pooled vector per turn end
        means = _TurnMeans(tokens, "layers.0", window)
        fast = means.pooled(means.x[:, 0], window, None)
        torch.testing.assert_close(fast, served)
        torch.testing.assert_close(
            means.pooled(means.x[:, 0], window, 0.5), grid.pooled(grid.x[:, 0], window, 0.5,
            masked=True, turn_end=True),
        )  # fmt: skip
        torch.testing.assert_close(means.labeled_rows, grid.labeled_rows)


def test_a_probe_on_the_pooled_vectors_is_the_served_turn_mean() -> None:
    """w.mean(h) + b = mean(w.h + b): the pooled-vector fit, served per token and read at the
    labeled turn ends, scores each conversation as it scores its pooled vector."""
    g = torch.Generator().manual_seed(1)
    conversations = _random_conversations(20, 4)
    tokens = [
        _tokens(i, i % 2, torch.randn(len(v), 6, generator=g), t)
        for i, (v, t) in enumerate(conversations)
    ]
    fit = ProbeFit("layers.0", torch.randn(6, generator=g), 0.3, "logistic-turn-mean", 1.0)
    for conversation in tokens:
        pooled = pooled_vectors(conversation, "layers.0", 512)
        assert len(pooled) == int((conversation.labeled & conversation.turn_ends).sum())
        on_pooled = pooled @ fit.weight.double() + fit.bias
        served = conversation_score(
            token_values(conversation, "layers.0", fit), conversation.labeled, TURN_MEAN,
            conversation.turn_ends,
        )  # fmt: skip
        assert served == pytest.approx(float(on_pooled.max()), rel=1e-5, abs=1e-5)


def _diffuse(count: int, seed: int, system: int = 0) -> list[ConversationTokens]:
    """Where mean pooling works: every token of a long user turn carries a weak signal under
    strong noise (as the issue's public data, pooled AUROC 0.997); optionally behind a system
    prompt that is not labeled."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.nn.functional.normalize(torch.ones(8), dim=0)
    result = []
    for i in range(count):
        label = i % 2
        n = int(torch.randint(80, 140, (1,), generator=g))
        x = torch.randn(system + n, 8, generator=g)
        x[system:] += 0.35 * label * direction
        turns = [("system", system), ("user", n)] if system else [("user", n)]
        result.append(_tokens(i, label, x, turns, labeled_role="user"))
    return result


def test_fit_layers_chooses_the_turn_mean_where_mean_pooling_works() -> None:
    """On data where only the whole turn separates the classes the turn mean beats the
    windowed and the guarded whole-turn candidates held out (it reads the finished turn, not
    its best prefix), `pack fit` keeps it, and on fresh data its served score is the
    mean-pooled score of the same probe exactly."""
    fit_tokens, heldout, test = (_diffuse(240, s, system=6) for s in (6, 7, 8))
    (result,) = fit_layers(fit_tokens, heldout, ["layers.0"], fpr=0.05, windows=(1, 8, 32))
    assert result.aggregation == TURN_MEAN
    assert result.fit.method.startswith("logistic-turn-mean")
    metrics = result.heldout
    assert metrics["auroc"] == pytest.approx(metrics["auroc_turn_mean"])
    assert metrics["auroc_turn_mean"] > metrics["auroc_whole_turn"] + 0.01
    assert metrics["auroc_turn_mean"] > metrics["auroc_windowed"] + 0.05
    assert metrics["auroc_turn_mean"] >= metrics["auroc_turn_mean_pooled"]
    assert "auroc_per_token_fit" not in metrics  # it started from the pooled-vector fit
    labels = [t.label for t in test]
    served = score_conversations(test, "layers.0", result.fit, result.aggregation)
    pooled = score_conversations(test, "layers.0", result.fit, "mean")
    torch.testing.assert_close(torch.tensor(served), torch.tensor(pooled), rtol=1e-4, atol=1e-4)
    assert auroc(served, labels) > 0.95
    # Off when the window is fixed (`pack fit --window N`): no turn-mean numbers.
    (fixed,) = fit_layers(
        fit_tokens, heldout, ["layers.0"], fpr=0.05, windows=(8,), guards=(), turn_mean=False
    )
    assert "auroc_turn_mean" not in fixed.heldout and "turn_end" not in fixed.aggregation


def test_the_pooled_fit_is_the_training_start_and_never_worse_held_out() -> None:
    fit_tokens, heldout = _diffuse(160, 9), _diffuse(120, 10)
    start = fit_pooled_probe(fit_tokens, "layers.0")
    labels = [t.label for t in heldout]
    initial = auroc(score_conversations(heldout, "layers.0", start, TURN_MEAN), labels)
    trained = fit_through_aggregation(
        fit_tokens, heldout, start, 512, masked=True, turn_end=True, max_steps=50
    )
    assert trained.initial_auroc == pytest.approx(initial)
    assert trained.auroc >= initial
    kept = trained.fit if trained.steps else start
    assert auroc(score_conversations(heldout, "layers.0", kept, TURN_MEAN), labels) == (
        pytest.approx(trained.auroc)
    )


# --- the served rule, against the real rules engine --------------------------------------

TURN_RULE = """
features:
  f: probes/f
thresholds:
  t: {threshold}
rules:
  - rule: r
    desc: the turn mean, served
    severity: info
    condition: rolling_mean(f, {window}) > t
    roles: [assistant]{window_roles}
    at: turn_end
"""


def _engine_fires_at_turn_ends(
    rules_path: Path, conversations: list[tuple[torch.Tensor, Turns]], seed: int
) -> dict[str, list[tuple[int, float]]]:
    """Feed each turn in one to three messages (as a decoder streams an answer); only the
    turn's last message carries ``turn_end``, as the capture client marks it."""
    from monitor.rules import RuleEngine, SequenceSlice, load_rules

    g = torch.Generator().manual_seed(seed)
    engine = RuleEngine(load_rules([rules_path]))
    fired: dict[str, list[tuple[int, float]]] = {}
    for index, (values, turns) in enumerate(conversations):
        start = 0
        for role, n in turns:
            cuts = sorted(set(torch.randint(1, n, (2,), generator=g).tolist())) if n > 1 else []
            bounds = [0, *cuts, n]
            for a, b in itertools.pairwise(bounds):
                last = b == n
                result = engine.evaluate(
                    {"probes/f": values[start + a : start + b]},
                    [SequenceSlice(f"c{index}", 0, b - a, start + a, role=role, turn_end=last)],
                )
                for firing in result.firings:
                    fired.setdefault(firing.conversation_id, []).append(
                        (firing.position, firing.value)
                    )
            start += n
    return fired


@pytest.mark.parametrize(("window", "masked"), [(512, True), (4, True), (4, False)])
def test_a_turn_end_rule_fires_exactly_when_the_turn_mean_is_above_t(
    tmp_path: Path, window: int, masked: bool
) -> None:
    """`rolling_mean(f, W) > t` with `roles: [assistant]`, `window_roles: [assistant]` and
    `at: turn_end` fires in a conversation iff max_rolling_mean:W,roles,turn_end is above t,
    only at the assistant turns' last tokens, with the value the offline score reads there;
    the same without window_roles for max_rolling_mean:W,turn_end."""
    conversations = _random_conversations(80, window + masked)
    aggregation = f"max_rolling_mean:{window}" + (",roles" if masked else "") + ",turn_end"
    tokens = [_tokens(i, 0, v[:, None], t) for i, (v, t) in enumerate(conversations)]
    scores = [
        conversation_score(v, c.labeled, aggregation, c.turn_ends)
        for (v, _), c in zip(conversations, tokens, strict=True)
    ]
    threshold = sorted(scores)[len(scores) // 2]
    path = tmp_path / "r.yaml"
    extra = "\n    window_roles: [assistant]" if masked else ""
    path.write_text(TURN_RULE.format(threshold=repr(threshold), window=window, window_roles=extra))
    fired = _engine_fires_at_turn_ends(path, conversations, seed=window)
    expected = {f"c{i}" for i, s in enumerate(scores) if s > threshold}
    assert set(fired) == expected and 25 < len(expected) < 55
    for index, (values, _) in enumerate(conversations):
        conversation = tokens[index]
        at = conversation.labeled & conversation.turn_ends
        if masked:
            reference = torch.full_like(values, math.nan)
            reference[conversation.labeled] = rolling_mean(values[conversation.labeled], window)
        else:
            reference = rolling_mean(values, window)
        for position, value in fired.get(f"c{index}", []):
            assert bool(at[position])  # never inside a turn, never on another role's turn
            assert value == pytest.approx(float(reference[position]), rel=1e-6, abs=1e-6)
