"""The rule engine: `for` runs, roles, gaps, state lifetime, temporal functions, chunking."""

from __future__ import annotations

import dataclasses
import random
import tempfile
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from monitor.rules import RuleEngine, RuleSet, SequenceSlice, load_rules


def ruleset(text: str) -> RuleSet:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "rules.yaml"
        path.write_text(text)
        return load_rules([path])


def rule_file(*rules: str, extra: str = "") -> str:
    body = "".join(f"  - {{{rule}}}\n" for rule in rules)
    return f"features: {{a: p/a, b: p/b}}\n{extra}rules:\n{body}"


Token = tuple[float, float]  # values of features a and b


def feed(
    engine: RuleEngine,
    batch: Sequence[tuple],
) -> list[tuple[str, str, int, float]]:
    """One batch of (conversation, first position, tokens, role, end[, turn_end]) slices."""
    slices, a, b = [], [], []
    for conversation, position, tokens, role, end, *turn_end in batch:
        slices.append(
            SequenceSlice(
                conversation, len(a), len(tokens), position, role, end, turn_end=any(turn_end)
            )
        )
        a.extend(t[0] for t in tokens)
        b.extend(t[1] for t in tokens)
    features = {"p/a": torch.tensor(a, dtype=torch.float32), "p/b": torch.tensor(b)}
    result = engine.evaluate(features, slices)
    return [(f.rule, f.conversation_id, f.position, f.value) for f in result.firings]


def positions(engine: RuleEngine, values: list[float], start: int = 0, conv: str = "c") -> list:
    return [
        p for _, _, p, _ in feed(engine, [(conv, start, [(v, 0.0) for v in values], "", False)])
    ]


def test_for_fires_once_per_run():
    engine = RuleEngine(ruleset(rule_file("rule: r, severity: info, condition: a > 0, for: 3")))
    assert positions(engine, [1, 1, 0, 1, 1, 1, 1, 1, 0, 1, 1, 1]) == [5, 11]


def test_for_one_fires_on_rising_edges():
    engine = RuleEngine(ruleset(rule_file("rule: r, severity: info, condition: a > 0")))
    assert positions(engine, [1, 1, 0, 1, 0, 0, 1]) == [0, 3, 6]


def test_runs_carry_across_batches():
    engine = RuleEngine(ruleset(rule_file("rule: r, severity: info, condition: a > 0, for: 4")))
    assert positions(engine, [1, 1]) == []
    assert positions(engine, [1], start=2) == []
    assert positions(engine, [1, 1, 1], start=3) == [3]
    assert positions(engine, [0, 1, 1, 1, 1], start=6) == [10]


def test_roles_break_runs():
    engine = RuleEngine(
        ruleset(rule_file("rule: r, severity: info, condition: a > 0, for: 2, roles: [assistant]"))
    )
    ones = [(1.0, 0.0)] * 3
    fired = feed(
        engine,
        [("c", 0, ones, "user", False)],
    )
    assert fired == []
    assert feed(engine, [("c", 3, ones[:1], "assistant", False)]) == []
    assert feed(engine, [("c", 4, ones[:1], "user", False)]) == []
    assert [p for *_, p, _ in feed(engine, [("c", 5, ones, "assistant", False)])] == [6]


def test_gap_resets_state_and_is_counted():
    engine = RuleEngine(ruleset(rule_file("rule: r, severity: info, condition: a > 0, for: 3")))
    assert positions(engine, [1, 1]) == []
    slices = [SequenceSlice("c", 0, 2, 5)]
    result = engine.evaluate({"p/a": torch.ones(2), "p/b": torch.zeros(2)}, slices)
    assert (result.gaps, result.firings) == (1, [])  # a jump 2 -> 5 must not complete the run
    assert positions(engine, [1], start=7) == [7]


def test_end_frees_state():
    engine = RuleEngine(ruleset(rule_file("rule: r, severity: info, condition: a > 0, for: 2")))
    feed(engine, [("c", 0, [(1.0, 0.0)], "", True), ("d", 0, [(1.0, 0.0)], "", False)])
    assert engine.tracked_conversations == 1
    assert positions(engine, [1], start=1) == []  # "c" started afresh: no carried run
    assert engine.tracked_conversations == 2


def test_lru_eviction():
    engine = RuleEngine(
        ruleset(rule_file("rule: r, severity: info, condition: a > 0, for: 2")), max_conversations=2
    )
    one = [(1.0, 0.0)]
    feed(engine, [("x", 0, one, "", False), ("y", 0, one, "", False)])
    feed(engine, [("x", 1, [(0.0, 0.0)], "", False)])  # x is now the most recently used
    slices = [SequenceSlice("z", 0, 1, 0)]
    result = engine.evaluate({"p/a": torch.ones(1), "p/b": torch.zeros(1)}, slices)
    assert (result.evicted, engine.tracked_conversations) == (1, 2)
    assert feed(engine, [("y", 1, one, "", False)]) == []  # y was evicted: its run is gone
    with pytest.raises(ValueError, match="more than 2 conversations"):
        feed(engine, [(c, 0, one, "", False) for c in "pqr"])


def test_replace_rules_keeps_state_of_unchanged_rules():
    old = ruleset(
        rule_file(
            "rule: keep, severity: info, condition: a > 0, for: 3",
            "rule: change, severity: info, condition: a > 0, for: 3",
        )
    )
    engine = RuleEngine(old)
    assert positions(engine, [1, 1]) == []
    new = ruleset(
        rule_file(
            "rule: keep, severity: warning, condition: (a > 0), for: 3",
            "rule: change, severity: info, condition: a > 0.5, for: 3",
            "rule: added, severity: info, condition: a > 0, for: 1",
        )
    )
    engine.replace_rules(new)
    fired = feed(engine, [("c", 2, [(1.0, 0.0)], "", False)])
    assert [(r, p) for r, _, p, _ in fired] == [("keep", 2), ("added", 2)]


def test_firing_fields_and_message():
    rules = ruleset(
        rule_file(
            "rule: r, severity: critical, category: bias, condition: a * 2 > 1 and b < 1,"
            " for: 2, labels: {team: ts}, actions: [alert, audit],"
            " output: '{rule} {value:.1f} {start}-{end} {conversation_id} {request_id}'"
        )
    )
    engine = RuleEngine(rules)
    slices = [SequenceSlice("c", 0, 3, 10, "assistant", request_id="req")]
    result = engine.evaluate({"p/a": torch.tensor([1.0, 2.0, 3.0]), "p/b": torch.zeros(3)}, slices)
    (firing,) = result.firings
    assert (firing.position, firing.row, firing.value) == (11, 1, 4.0)
    assert firing.message == "r 4.0 10-11 c req"
    assert (firing.category, firing.severity, firing.labels, firing.actions) == (
        "bias",
        "critical",
        {"team": "ts"},
        ("alert", "audit"),
    )


def test_bad_template_at_runtime_falls_back():
    rules = ruleset(rule_file("rule: r, severity: info, condition: a > 0"))
    rules.rules[0] = dataclasses.replace(rules.rules[0], output="{value:d}")
    engine = RuleEngine(rules)
    result = engine.evaluate(
        {"p/a": torch.ones(1), "p/b": torch.zeros(1)}, [SequenceSlice("c", 0, 1, 0)]
    )
    assert result.firings[0].message == "r fired at token 0 of c (value 1.0)"


def test_disabled_rules_do_not_run():
    rules = ruleset(rule_file("rule: r, severity: info, condition: a > 0, enabled: false"))
    engine = RuleEngine(rules)
    assert engine.evaluate({}, [SequenceSlice("c", 0, 1, 0)]).firings == []


def test_malformed_batches_are_rejected():
    engine = RuleEngine(ruleset(rule_file("rule: r, severity: info, condition: a > 0")))
    good = {"p/a": torch.ones(2), "p/b": torch.ones(2)}
    with pytest.raises(ValueError, match="missing feature 'p/a'"):
        engine.evaluate({"p/b": torch.ones(2)}, [SequenceSlice("c", 0, 2, 0)])
    with pytest.raises(ValueError, match="at least 3 rows"):
        engine.evaluate(good, [SequenceSlice("c", 0, 3, 0)])
    with pytest.raises(ValueError, match="overlap"):
        engine.evaluate(good, [SequenceSlice("c", 0, 2, 0), SequenceSlice("d", 1, 1, 0)])
    with pytest.raises(ValueError, match="negative"):
        engine.evaluate(good, [SequenceSlice("c", 0, -1, 0)])
    assert engine.tracked_conversations == 0


def test_same_conversation_twice_in_one_batch():
    engine = RuleEngine(ruleset(rule_file("rule: r, severity: info, condition: a > 0, for: 3")))
    two = [(1.0, 0.0)] * 2
    fired = feed(
        engine, [("c", 0, two, "", False), ("d", 0, two, "", False), ("c", 2, two, "", False)]
    )
    assert [(c, p) for _, c, p, _ in fired] == [("c", 2)]


# --------------------------------------------------------------------------- temporal functions


def _reference(kind: str, xs: list[float], n: float) -> list[float]:
    out = []
    for t in range(len(xs)):
        window = xs[max(0, t - int(n) + 1) : t + 1]
        if kind == "rolling_mean":
            out.append(sum(window) / len(window))
        elif kind == "rolling_sum":
            out.append(sum(window))
        elif kind == "rolling_max":
            out.append(max(window))
        elif kind == "rolling_min":
            out.append(min(window))
        elif kind == "cummax":
            out.append(max(xs[: t + 1]))
        elif kind == "delta":
            out.append(xs[t] - xs[t - int(n)] if t >= n else 0.0)
        elif kind == "ewma":
            weights = [0.5 ** (j / n) for j in range(t + 1)]
            out.append(
                sum(w * x for w, x in zip(weights, reversed(xs[: t + 1]), strict=True))
                / sum(weights)
            )
    return out


@pytest.mark.parametrize(
    ("call", "kind", "n"),
    [
        ("rolling_mean(a, 3)", "rolling_mean", 3),
        ("rolling_sum(a, 4)", "rolling_sum", 4),
        ("rolling_max(a, 2)", "rolling_max", 2),
        ("rolling_min(a, 5)", "rolling_min", 5),
        ("cummax(a)", "cummax", 0),
        ("delta(a, 2)", "delta", 2),
        ("delta(a, 3)", "delta", 3),
        ("ewma(a, 3)", "ewma", 3),
    ],
)
def test_temporal_functions_match_reference(call, kind, n):
    # `x > -1000` is true everywhere; the firing values expose the function at each token.
    rules = ruleset(rule_file(f"rule: r, severity: info, condition: '{call} > -1000 and b > 0'"))
    rng = random.Random(n)  # one generator: twelve different values, not one value twelve times
    xs = [rng.uniform(-3, 3) for _ in range(12)]
    engine = RuleEngine(rules)
    got = []
    for t, x in enumerate(xs):  # b alternates so the rule fires (rising edge) on every 2nd token
        got += feed(engine, [("c", t, [(x, float(t % 2))], "", False)])
    expected = _reference(kind, xs, n)
    assert [p for *_, p, _ in got] == list(range(1, 12, 2))
    assert [v for *_, v in got] == pytest.approx(expected[1::2], rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("chunk", [1, 2, 6])
@pytest.mark.parametrize(
    ("n", "expected"),
    [(1, [0, 1, 2, 4, 8, 16]), (2, [0, 0, 3, 6, 12, 24]), (3, [0, 0, 0, 7, 14, 28])],
)
def test_delta_is_the_change_over_n_tokens_from_the_first_it_exists(n, expected, chunk):
    """`delta(x, n)` = x[t] - x[t-n] as soon as x[t-n] exists (t = n), in decode steps and in
    prefills alike; 0 before. Every token's value is read: two rules gated on `b`, which
    alternates sign, each fire on alternate tokens (a rule fires on a rising edge)."""
    engine = RuleEngine(
        ruleset(
            rule_file(
                f"rule: even, severity: info, condition: 'delta(a, {n}) > -1e30 and b > 0'",
                f"rule: odd, severity: info, condition: 'delta(a, {n}) > -1e30 and b < 0'",
            )
        )
    )
    xs = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
    values: dict[int, float] = {}
    for start in range(0, len(xs), chunk):
        tokens = [(xs[t], 1.0 if t % 2 == 0 else -1.0) for t in range(start, start + chunk)]
        for _, _, at, value in feed(engine, [("c", start, tokens, "", False)]):
            values[at] = value
    assert [values.get(t) for t in range(len(xs))] == expected


def test_count_over_and_nesting():
    rules = ruleset(
        rule_file(
            "rule: r, severity: info, condition: 'count_over(a > 0, 3) >= 2'",
            "rule: pooled, severity: info, condition: 'rolling_max(rolling_mean(a, 2), 3) >= 1'",
        )
    )
    engine = RuleEngine(rules)
    fired = feed(engine, [("c", 0, [(v, 0.0) for v in [1, 0, 1, 0, 0, 1, 1]], "", False)])
    # rolling_mean over the tokens seen so far: 1.0 at token 0 already.
    assert [(r, p) for r, _, p, _ in fired] == [("pooled", 0), ("r", 2), ("r", 6), ("pooled", 6)]


def test_temporal_state_resets_on_gap():
    engine = RuleEngine(
        ruleset(rule_file("rule: r, severity: info, condition: 'rolling_sum(a, 3) >= 3'"))
    )
    assert positions(engine, [1, 1]) == []
    assert positions(engine, [1], start=9) == []  # the gap dropped the two earlier tokens
    assert positions(engine, [1, 1], start=10) == [11]


# --------------------------------------------------------------------------- chunking invariance

CHUNK_RULES = ruleset(
    rule_file(
        "rule: r1, severity: info, condition: a > 0.5",
        "rule: r2, severity: info, condition: a > b and b > -0.5, for: 3",
        "rule: r3, severity: info, condition: 'span > 0.25 or count_over(b > 0.5, 4) >= 2', for: 2",
        "rule: r4, severity: info, condition: 'rolling_max(a - b, 5) > 1 and ewma(b, 2) < 0.5'",
        "rule: r5, severity: info, condition: 'cummax(a) > 0.9 and delta(b, 2) > 0.3'",
        "rule: r6, severity: info, condition: sigmoid(a) * 2 > 1.2, for: 2, roles: [assistant]",
        "rule: r7, severity: info, condition: 'rolling_sum(a, 3) / 3 - rolling_mean(a, 3) == 0'",
        # Windows over one role's tokens (the same `span` as r3's, which must not share its
        # state), with and without `roles:`, and every kind of temporal function.
        "rule: r8, severity: info, condition: 'span > 0.25 and rolling_max(b, 4) > 0.5', "
        "for: 2, window_roles: [user]",
        "rule: r9, severity: info, condition: 'ewma(b, 2) > 0.3 or delta(a, 2) > 0.5 or "
        "cummax(b) > 1.5 or count_over(a > 0.5, 3) >= 2 or rolling_min(a, 2) > 0.6 or "
        "rolling_sum(b, 3) > 1', window_roles: [assistant], roles: [assistant]",
        # Checked at turn ends only: their windows still take in every token (of their
        # window roles), with cooldowns, roles, and a window shared with token rules (span).
        "rule: t1, severity: info, condition: 'span > 0.25', at: turn_end",
        "rule: t2, severity: info, condition: 'rolling_mean(a, 4) > 0.2', at: turn_end, "
        "window_roles: [user], roles: [user], cooldown: 3",
        "rule: t3, severity: info, condition: 'b > 0 or rolling_max(a, 3) > 1', at: turn_end, "
        "for: 1",
        extra="macros: {span: 'rolling_mean(a, 3)'}\n",
    )
)

_VALUE = st.one_of(
    st.sampled_from([-1.0, -0.5, 0.0, 0.25, 0.5, 0.75, 1.0, 2.0]),
    st.floats(-2, 2, width=32, allow_subnormal=False),
)
# (a, b, role, turn_end): a token that ends a turn ends its slice in every schedule.
_CONVERSATION = st.lists(
    st.tuples(
        _VALUE,
        _VALUE,
        st.sampled_from(["assistant", "user"]),
        st.sampled_from([False] * 3 + [True]),
    ),
    min_size=1,
    max_size=24,
)


def _split(tokens: list, cuts: set[int]) -> list[tuple[int, list]]:
    """Chunks (start, tokens) cut at `cuts`, after each turn end and wherever the role
    changes."""
    chunks, start = [], 0
    for i in range(1, len(tokens) + 1):
        if i == len(tokens) or i in cuts or tokens[i][2] != tokens[i - 1][2] or tokens[i - 1][3]:
            chunks.append((start, tokens[start:i]))
            start = i
    return chunks


def _run(conversations: dict[str, list], schedule: list[list[tuple]]) -> list:
    """Firings of a schedule of batches of (conversation, start, chunk[, deferred]) items. A
    ``deferred`` chunk's turn end (or end) comes later, as an item without tokens: a slice
    without rows at the next position, with ``end`` for the conversation's last token and
    ``turn_end`` otherwise, and no role (as servers send an answer's end)."""
    engine = RuleEngine(CHUNK_RULES)
    fired = []
    for batch in schedule:
        slices = []
        for c, start, chunk, *deferred in batch:
            if not chunk:
                last = start == len(conversations[c])
                slices.append((c, start, [], "", last, not last))
                continue
            marked = not any(deferred)
            slices.append(
                (
                    c,
                    start,
                    [(a, b) for a, b, _, _ in chunk],
                    chunk[0][2],
                    marked and start + len(chunk) == len(conversations[c]),
                    marked and chunk[-1][3],
                )
            )
        fired += feed(engine, slices)
    assert engine.tracked_conversations == 0  # every conversation ended
    return sorted(fired)


def _deferred(tokens: list, chunks: list[tuple[int, list]], defer: Callable[[], bool]) -> list:
    """``chunks`` of a conversation, where ``defer()`` says so each chunk that ends a turn
    (or the conversation) marks it with a slice without rows after it instead."""
    out: list[tuple] = []
    for start, chunk in chunks:
        end = start + len(chunk)
        if (chunk[-1][3] or end == len(tokens)) and defer():
            out += [(start, chunk, True), (end, [])]
        else:
            out.append((start, chunk))
    return out


@settings(max_examples=100, deadline=None)
@given(
    st.lists(_CONVERSATION, min_size=2, max_size=3),
    st.randoms(use_true_random=False),
)
def test_chunking_invariance(conversation_list, rng):
    conversations = {f"c{i}": tokens for i, tokens in enumerate(conversation_list)}
    # Token by token, round robin over conversations.
    one_by_one = []
    for t in range(max(len(v) for v in conversations.values())):
        batch = [
            (c, t, tokens[t : t + 1]) for c, tokens in conversations.items() if t < len(tokens)
        ]
        one_by_one.extend([[slice_] for slice_ in batch])
    # Everything in one batch (a conversation with role changes appears several times).
    all_at_once = [
        [(c, s, chunk) for c, tokens in conversations.items() for s, chunk in _split(tokens, set())]
    ]
    # Every turn end (and end) by a slice without rows, all in one batch: a conversation's
    # rows and its turn ends go to waves one after the other.
    deferred_at_once = [
        [
            (c, *item)
            for c, tokens in conversations.items()
            for item in _deferred(tokens, _split(tokens, set()), lambda: True)
        ]
    ]
    # Decode steps, each turn end (and end) by a slice without rows in a batch of its own
    # after the step (a server's finish message).
    deferred_steps = []
    for t in range(max(len(v) for v in conversations.values())):
        step = [(c, t, tokens[t : t + 1], True) for c, tokens in conversations.items()]
        step = [item for item in step if item[2]]
        deferred_steps.append(step)
        ends = {c for c, _, chunk, _ in step if chunk[0][3]}
        ends |= {c for c, tokens in conversations.items() if len(tokens) == t + 1}
        if ends:
            deferred_steps.append([(c, t + 1, []) for c in sorted(ends)])
    # Random cuts, random interleaving, random batch boundaries, some turn ends without rows.
    queues = {
        c: _deferred(
            tokens,
            _split(tokens, {i for i in range(1, len(tokens)) if rng.random() < 0.3}),
            lambda: rng.random() < 0.5,
        )
        for c, tokens in conversations.items()
    }
    stream = []
    while any(queues.values()):
        c = rng.choice([c for c, q in queues.items() if q])
        stream.append((c, *queues[c].pop(0)))
    random_batches, batch = [], []
    for item in stream:
        batch.append(item)
        if rng.random() < 0.4:
            random_batches.append(batch)
            batch = []
    if batch:
        random_batches.append(batch)

    expected = _run(conversations, one_by_one)
    assert _run(conversations, all_at_once) == expected
    assert _run(conversations, random_batches) == expected
    assert _run(conversations, deferred_at_once) == expected
    assert _run(conversations, deferred_steps) == expected


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from([0.0, 1.0]), min_size=1, max_size=40), st.integers(1, 5))
def test_for_matches_a_naive_reference(values, need):
    engine = RuleEngine(
        ruleset(rule_file(f"rule: r, severity: info, condition: a > 0, for: {need}"))
    )
    expected, run = [], 0
    for t, v in enumerate(values):
        run = run + 1 if v > 0 else 0
        if run == need:
            expected.append(t)
    assert positions(engine, values) == expected


# --------------------------------------------------------------------------- window_roles

_WINDOWED = (
    "rolling_mean(a, 3)",
    "rolling_sum(a, 4)",
    "rolling_max(a, 3)",
    "rolling_min(a, 2)",
    "ewma(a, 2)",
    "delta(a, 2)",
    "cummax(a)",
    "count_over(a > 0.5, 3)",
)


def _values_at_every_token(text: str, tokens: list[tuple[float, str]], window_roles: str):
    """The value of ``text`` at every token, read off firings: two rules gated by ``b``,
    which alternates sign, fire on alternate tokens (a rule fires on a rising edge)."""
    extra = f", window_roles: [{window_roles}]" if window_roles else ""
    engine = RuleEngine(
        ruleset(
            rule_file(
                f"rule: even, severity: info, condition: '{text} > -1e30 and b > 0'{extra}",
                f"rule: odd, severity: info, condition: '{text} > -1e30 and b < 0'{extra}",
            )
        )
    )
    values: dict[int, float] = {}
    for position, (a, role) in enumerate(tokens):  # token by token: a decode step each
        sign = 1.0 if position % 2 == 0 else -1.0
        for _, _, at, value in feed(engine, [("c", position, [(a, sign)], role, False)]):
            values[at] = value
    return [values.get(i) for i in range(len(tokens))]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(-2, 2, width=32, allow_subnormal=False), st.sampled_from("uas")),
        min_size=1,
        max_size=20,
    ),
    st.sampled_from(_WINDOWED),
)
def test_a_role_window_equals_the_window_over_that_roles_tokens_alone(tokens, text):
    """`window_roles: [u]`: at a token of role u, the value over the whole stream equals
    the unrestricted value over u's tokens alone; at a token of another role it keeps the value
    of u's last token (the function's empty value before any)."""
    _check_role_window(tokens, text)


def test_a_role_window_with_non_finite_values_equals_the_window_alone():
    """An infinite value takes the decode step off its fast path (the general one handles it)."""
    inf = float("inf")
    tokens = [(1.0, "u"), (inf, "u"), (2.0, "s"), (3.0, "u"), (4.0, "u"), (5.0, "a"), (6.0, "u")]
    for text in ("rolling_mean(a, 3)", "rolling_sum(a, 2)", "count_over(a > 2, 3)"):
        _check_role_window(tokens, text)


def _check_role_window(tokens: list[tuple[float, str]], text: str) -> None:
    roles = {"u": "user", "a": "assistant", "s": "system"}
    stream = [(value, roles[r]) for value, r in tokens]
    masked = _values_at_every_token(text, stream, "user")
    alone = _values_at_every_token(text, [t for t in stream if t[1] == "user"], "")
    empty = {"rolling_max": float("-inf"), "cummax": float("-inf"), "rolling_min": float("inf")}
    last = empty.get(text.partition("(")[0], 0.0)
    users = iter(alone)
    for value, (_, role) in zip(masked, stream, strict=True):
        if role == "user":
            last = next(users)
        if value is None:  # -inf > -1e30 is false: no firing shows it
            assert last == float("-inf")
        else:
            assert value == last


def test_role_windows_over_turns_in_one_batch_equal_token_by_token():
    """Turns of several roles in one batch (several waves) give the decode steps' values."""
    text = "rolling_mean(a, 3)"
    stream = [(1.0, "user"), (2.0, "user"), (5.0, "system"), (4.0, "user"), (8.0, "assistant")]
    stream += [(0.5, "user")]
    stepwise = _values_at_every_token(text, stream, "user")
    assert stepwise == [
        1.0,
        1.5,
        1.5,
        pytest.approx(7 / 3),
        pytest.approx(7 / 3),
        pytest.approx(6.5 / 3),
    ]
    rule = f"rule: r, severity: info, condition: '{text} > 2', window_roles: [user]"
    engine = RuleEngine(ruleset(rule_file(rule)))
    turns = [("c", 0, [(1.0, 0.0), (2.0, 0.0)], "user", False)]
    turns += [("c", 2, [(5.0, 0.0)], "system", False), ("c", 3, [(4.0, 0.0)], "user", False)]
    turns += [("c", 4, [(8.0, 0.0)], "assistant", False), ("c", 5, [(0.5, 0.0)], "user", False)]
    fired = feed(engine, turns)
    # The system token does not enter the window (1.5 <= 2); the user's 4 lifts it to 7/3,
    # and it stays above 2 (no new rising edge) through the assistant token and the last 0.5.
    assert [(p, round(v, 4)) for _, _, p, v in fired] == [(3, round(7 / 3, 4))]


def _exact_window(text: str, inputs: list[float]) -> float:
    """The value of a rolling sum or mean over the last inputs, from their exact sum (the
    float64 rounding of it, divided in float64, rounded to float32: what the engine makes of
    a float64 sum that is exact)."""
    kind, n = text.partition("(")[0], int(text.rstrip(")").rpartition(",")[2])
    window = inputs[-n:]
    total = float(sum(Fraction(v) for v in window))
    return float(np.float32(total / len(window) if kind == "rolling_mean" else total))


def _lockstep_values(text: str, streams: dict[str, list[tuple[float, str]]], rules: str = ""):
    """Values of ``text`` (restricted to the user's tokens) at every token of every stream,
    all conversations decoded together, one token each per step (waves that mix tokens of
    the roles with tokens of others); ``rules`` may reload the engine halfway."""
    sets = [
        ruleset(
            rule_file(
                f"rule: even, severity: info, condition: '{text} > -1e30 and b > 0', "
                "window_roles: [user]",
                f"rule: odd, severity: info, condition: '{text} > -1e30 and b < 0', "
                "window_roles: [user]",
                *([rules] if rules else []),
            )
        )
        for rules in ("", rules)
    ]
    engine = RuleEngine(sets[0])
    values: dict[tuple[str, int], float] = {}
    length = max(len(s) for s in streams.values())
    for t in range(length):
        if rules and t == length // 2:
            engine.replace_rules(sets[1])  # windows are kept; running sums are re-made
        sign = 1.0 if t % 2 == 0 else -1.0
        batch = [
            (c, t, [(s[t][0], sign)], s[t][1], False) for c, s in streams.items() if t < len(s)
        ]
        for _, c, at, value in feed(engine, batch):
            values[(c, at)] = value
    return values


# Float32 values from 2**-30 to 2**31 with either sign, and zeros: a float64 sum of such a
# window is often not exact (a float64 holds 53 bits), its float64 pair always is.
_SPREAD = st.one_of(
    st.just(0.0),
    st.builds(
        lambda sign, mantissa, exponent: float(np.float32(sign * mantissa * 2.0**exponent)),
        st.sampled_from([-1.0, 1.0]),
        st.integers(1 << 23, (1 << 24) - 1),
        st.integers(-53, 8),
    ),
)


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.lists(st.tuples(_SPREAD, st.sampled_from(["user", "assistant"])), max_size=40),
        min_size=1,
        max_size=4,
    ),
    st.sampled_from(["rolling_mean(a, 2)", "rolling_sum(a, 3)", "rolling_mean(a, 5)"]),
    st.booleans(),
)
def test_role_window_decode_steps_give_the_exact_window_sum(stream_list, text, reload):
    """A restricted rolling sum or mean carried from step to step (a running sum, not a
    re-sum of the window) is the exact sum of its window, rounded once: through waves that mix
    the roles, past many window lengths (every value has left the window many times), and
    across a reload (which re-makes the running sums from the kept windows)."""
    streams = {f"c{i}": tokens for i, tokens in enumerate(stream_list) if tokens}
    if not streams:
        return
    extra = "rule: other, severity: info, condition: 'rolling_sum(b, 2) > 9'" if reload else ""
    values = _lockstep_values(text, streams, extra)
    for c, tokens in streams.items():
        inputs: list[float] = []
        for t, (value, role) in enumerate(tokens):
            if role == "user":
                inputs.append(value)
            if inputs:
                assert values[(c, t)] == _exact_window(text, inputs), (c, t)
            else:  # 0 before any user token: 0 > -1e30 holds, so a firing shows it
                assert values[(c, t)] == 0.0


def _role_reference(text: str, inputs: list[float]) -> float | None:
    """max, min, delta, cummax or ewma over the user's values so far (None: -inf, no
    firing)."""
    kind = text.partition("(")[0]
    if kind == "cummax":
        return max(inputs) if inputs else None
    if kind == "ewma":  # weights 0.5 ** (age / halflife) over its window (program.window)
        halflife = float(text.rstrip(")").rpartition(",")[2])
        recent = inputs[::-1][: int(halflife * 13.3) + 1]
        weights = [0.5 ** (age / halflife) for age in range(len(recent))]
        return (
            sum(w * v for w, v in zip(weights, recent, strict=True)) / sum(weights)
            if recent
            else 0.0
        )
    n = int(text.rstrip(")").rpartition(",")[2])
    if kind == "delta":  # x[t] - x[t - n]: 0 until the user's n + 1st token
        if len(inputs) <= n:
            return 0.0
        return float(np.float32(inputs[-1]) - np.float32(inputs[-1 - n]))
    if not inputs:
        return None if kind == "rolling_max" else float("inf")
    return max(inputs[-n:]) if kind == "rolling_max" else min(inputs[-n:])


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.lists(
            st.tuples(
                st.floats(-2, 2, width=32, allow_subnormal=False),
                st.sampled_from(["user", "assistant"]),
            ),
            max_size=30,
        ),
        min_size=1,
        max_size=4,
    ),
    st.sampled_from(
        ["rolling_max(a, 3)", "rolling_min(a, 2)", "delta(a, 2)", "cummax(a)", "ewma(a, 0.5)"]
    ),
)
def test_role_window_extrema_and_deltas_in_mixed_decode_steps(stream_list, text):
    """Restricted max, min, delta, cummax and ewma have decode-step paths of their own: in
    waves that mix the roles they give the function over the user's tokens alone (ewma to
    float32 rounding: its weighted sums round)."""
    streams = {f"c{i}": tokens for i, tokens in enumerate(stream_list) if tokens}
    if not streams:
        return
    values = _lockstep_values(text, streams)
    for c, tokens in streams.items():
        inputs: list[float] = []
        for t, (value, role) in enumerate(tokens):
            if role == "user":
                inputs.append(value)
            expected = _role_reference(text, inputs)
            if text.startswith("ewma"):
                expected = pytest.approx(expected, rel=1e-6, abs=1e-6)
            assert values.get((c, t)) == expected, (c, t)


def test_role_window_running_sum_survives_cancellation_and_far_apart_values():
    """A huge value that leaves the window must take nothing of the small ones with it (a
    plain running float64 sum would keep its rounding error for good), and values too far
    apart for any float64 pair (2**-120 next to 2**90) fall back to summing the window."""
    huge, tiny = 2.0**90, 2.0**-120
    tokens = [(1.0, "user"), (huge, "user"), (3.0, "user"), (-huge, "user"), (tiny, "user")]
    tokens += [(5.0, "assistant"), (tiny, "user"), (huge, "user"), (0.5, "user"), (0.25, "user")]
    tokens += [(-huge, "user"), (2.0, "user"), (tiny, "user"), (tiny, "user"), (1.0, "user")]
    text = "rolling_sum(a, 3)"
    values = _lockstep_values(text, {"c": tokens})
    inputs: list[float] = []
    for t, (value, role) in enumerate(tokens):
        if role == "user":
            inputs.append(value)
        assert values[("c", t)] == _exact_window(text, inputs), t


def test_request_scoped_role_window_restarts_its_running_sum():
    """A new request resets a request-scoped restricted window and its running sum."""
    engine = RuleEngine(
        ruleset(
            rule_file(
                "rule: r, severity: info, condition: 'rolling_sum(a, 3) > 2.5', "
                "window_roles: [user], scope: request",
            )
        )
    )

    def step(position: int, value: float, role: str, request: str) -> list[int]:
        block = {"p/a": torch.tensor([value]), "p/b": torch.tensor([0.0])}
        sl = SequenceSlice("c", 0, 1, position, role, request_id=request)
        return [f.position for f in engine.evaluate(block, [sl]).firings]

    assert step(0, 1.0, "user", "q1") == []
    assert step(1, 1.0, "user", "q1") == []
    assert step(2, 9.0, "assistant", "q1") == []  # not the user's: the window stays at 2
    assert step(3, 1.0, "user", "q1") == [3]  # 3 > 2.5
    assert step(4, 1.0, "user", "q2") == []  # a new request: the window holds 1 alone
    assert step(5, 1.0, "user", "q2") == []
    assert step(6, 1.0, "user", "q2") == [6]


def test_same_expression_with_other_window_roles_keeps_its_own_state():
    engine = RuleEngine(
        ruleset(
            rule_file(
                "rule: all, severity: info, condition: 'rolling_mean(a, 4) > 0.5'",
                "rule: mine, severity: info, condition: 'rolling_mean(a, 4) > 0.5', "
                "window_roles: [user]",
            )
        )
    )
    fired = feed(engine, [("c", 0, [(1.0, 0.0)] * 4, "system", False)])
    assert [(rule, p) for rule, _, p, _ in fired] == [("all", 0)]
    fired = feed(engine, [("c", 4, [(0.0, 0.0)] * 4, "user", False)])
    assert fired == []  # all: the window now holds the user's zeros; mine: never above
    assert len(engine._program.temporal) == 2


def test_window_roles_errors_are_located():
    from monitor.rules.errors import RuleLoadError

    for bad, message in (
        ("window_roles: user", "'window_roles' must be a list of strings"),
        ("window_roles: ['']", "'window_roles' entries must be non-empty strings"),
        ("window_role: [user]", "unknown rule key 'window_role'"),
        ("window_roles: [user]", "this rule's condition has none"),  # nothing to restrict
    ):
        with pytest.raises(RuleLoadError) as error:
            ruleset(rule_file(f"rule: r, severity: info, condition: a > 0, {bad}"))
        assert message in str(error.value)
        assert "rules.yaml:3:" in str(error.value)  # file:line:col


def test_window_roles_expand_named_lists():
    rules = ruleset(
        rule_file(
            "rule: r, severity: info, condition: 'rolling_mean(a, 2) > 0', window_roles: [people]",
            extra="lists: {people: [user, tool]}\n",
        )
    )
    assert rules.rules[0].window_roles == ("user", "tool")
