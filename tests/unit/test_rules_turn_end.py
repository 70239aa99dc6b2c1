"""Rules with `at: turn_end`: checked only at the last row of a slice that carries `turn_end`
or `end`, in every engine path (prefill, decode steps, several waves), with their windows
taking in every token; and the loader's `at` key."""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from monitor.rules import RuleEngine, RuleSet, SequenceSlice, load_rules
from monitor.rules.errors import RuleLoadError


def ruleset(text: str) -> RuleSet:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "rules.yaml"
        path.write_text(text)
        return load_rules([path])


RULES = """
features: {a: p/a}
rules:
  - rule: turn_mean
    severity: warning
    condition: rolling_mean(a, 3) > 0.5
    at: turn_end
  - rule: token_mean
    severity: info
    condition: rolling_mean(a, 3) > 0.5
"""


def _evaluate(engine, slices, values):
    features = {"p/a": torch.tensor(values, dtype=torch.float32)}
    return engine.evaluate(features, slices).firings


def _mean3(values: list[float], t: int) -> float:
    window = values[max(0, t - 2) : t + 1]
    return sum(window) / len(window)


def test_a_turn_end_rule_is_checked_only_at_turn_ends_and_at_end():
    engine = RuleEngine(ruleset(RULES))
    values = [1.0] * 10
    # Turn one ends at position 3 (turn_end), turn two at 9 (end, no turn_end flag).
    fired = _evaluate(
        engine,
        [
            SequenceSlice("c", 0, 4, 0, "user", turn_end=True),
            SequenceSlice("c", 4, 6, 4, "assistant", end=True),
        ],
        values,
    )
    by_rule = {(f.rule, f.position) for f in fired}
    assert {p for r, p in by_rule if r == "turn_mean"} == {3, 9}
    # The token rule holds from token 0 on: fires once, at the start of its run.
    assert {p for r, p in by_rule if r == "token_mean"} == {0}
    # A slice with neither flag is never a turn end, even where the condition holds.
    engine = RuleEngine(ruleset(RULES))
    fired = _evaluate(engine, [SequenceSlice("d", 0, 10, 0, "user")], values)
    assert [f.rule for f in fired] == ["token_mean"]


def test_turn_end_rules_fire_at_each_turn_end_even_back_to_back():
    """Each turn end is checked afresh: one-token turns in a row each fire (no `for` run)."""
    engine = RuleEngine(ruleset(RULES))
    fired = []
    for t in range(5):
        fired += _evaluate(engine, [SequenceSlice("c", 0, 1, t, "user", turn_end=True)], [1.0])
    assert [f.position for f in fired if f.rule == "turn_mean"] == [0, 1, 2, 3, 4]


def test_turn_end_rules_honour_cooldown_and_roles():
    text = """
features: {a: p/a}
rules:
  - rule: r
    severity: warning
    condition: a > 0.5
    at: turn_end
    roles: [user]
    cooldown: 3
"""
    engine = RuleEngine(ruleset(text))
    fired = []
    for t, role in enumerate(["user", "user", "assistant", "user", "user", "user", "user"]):
        sl = SequenceSlice("c", 0, 1, t, role, turn_end=True)
        fired += [f.position for f in _evaluate(engine, [sl], [1.0])]
    # 0 fires; 1 is in the cooldown; 2 is not a user turn; 3 fires; 4, 5 cool; 6 fires.
    assert fired == [0, 3, 6]


def test_turn_end_rules_in_decode_steps_of_many_conversations():
    """Decode steps (one row per slice: the step kernel) of 8 conversations, each ending
    turns at its own positions, match a per-token reference of the window's mean."""
    engine = RuleEngine(ruleset(RULES))
    steps = 24
    values = {c: [float((c * 7 + t * 3) % 5 > 1) for t in range(steps)] for c in range(8)}
    turn_ends = {c: {t for t in range(steps) if (t + c) % (c + 2) == 0} for c in range(8)}
    fired = []
    for t in range(steps):
        slices = [
            SequenceSlice(f"c{c}", c, 1, t, "user", turn_end=t in turn_ends[c]) for c in range(8)
        ]
        fired += [
            (f.conversation_id, f.position)
            for f in _evaluate(engine, slices, [values[c][t] for c in range(8)])
            if f.rule == "turn_mean"
        ]
    expected = [
        (f"c{c}", t)
        for t in range(steps)
        for c in range(8)
        if t in turn_ends[c] and _mean3(values[c], t) > 0.5
    ]
    assert fired == expected
    assert expected  # the case is not vacuous


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from([0.0, 1.0]), st.sampled_from([False, False, True])),
        min_size=1,
        max_size=30,
    ),
    st.sets(st.integers(1, 29)),
)
def test_turn_end_firings_match_a_reference_however_the_turns_are_batched(tokens, cuts):
    """Firings are the turn ends where the 3-token mean (of every token) is above 0.5, whether
    the conversation comes as one batch of slices (several waves) or slice by slice."""
    values = [v for v, _ in tokens]
    last = len(tokens) - 1
    ends = {t for t, (_, flag) in enumerate(tokens) if flag} | {last}
    expected = [t for t in sorted(ends) if _mean3(values, t) > 0.5]
    # Slices end at every turn end and at the random cuts.
    bounds = sorted({0, len(tokens)} | {c for c in cuts if c < len(tokens)} | {t + 1 for t in ends})
    slices = [
        SequenceSlice("c", lo, hi - lo, lo, "user", hi == len(tokens), turn_end=hi - 1 in ends)
        for lo, hi in itertools.pairwise(bounds)
    ]
    together = _evaluate(RuleEngine(ruleset(RULES)), slices, values)
    engine = RuleEngine(ruleset(RULES))
    apart = []
    for sl in slices:
        apart += _evaluate(engine, [sl._replace(start_row=0)], values[sl.position :][: sl.rows])
    for fired in (together, apart):
        assert [f.position for f in fired if f.rule == "turn_mean"] == expected


def test_reload_keeps_a_turn_end_rule_window():
    engine = RuleEngine(ruleset(RULES))
    _evaluate(engine, [SequenceSlice("c", 0, 2, 0, "user")], [1.0, 1.0])
    engine.replace_rules(ruleset(RULES))  # unchanged: the window keeps tokens 0 and 1
    fired = _evaluate(engine, [SequenceSlice("c", 0, 1, 2, "user", turn_end=True)], [0.0])
    assert [(f.rule, f.position) for f in fired] == [("turn_mean", 2)]  # (1 + 1 + 0) / 3


# ------------------------------------------------------------ turn ends without rows
# A server learns that an answer finished after its last token: the vLLM plugin's finish
# message and the capture client's end_conversation are slices without rows, with `end` (or
# `turn_end`), no role and no request id. The turn end is the last token evaluated.

ANSWER_RULES = """
features: {a: p/a}
rules:
  - rule: answer
    severity: warning
    condition: rolling_mean(a, 4) > 1
    at: turn_end
    roles: [assistant]
    output: "{rule} at {position} of {conversation_id} in {request_id}: {value}"
  - rule: token
    severity: info
    condition: a > 100
"""


def _finish(cid: str, position: int, *, end: bool = True, start_row: int = 0) -> SequenceSlice:
    """A finish message: no rows, no role, no request id."""
    return SequenceSlice(cid, start_row, 0, position, "", end, turn_end=not end)


def _answer(engine, cid: str, values: list[float], position: int = 0, **flags) -> list:
    sl = SequenceSlice(cid, 0, len(values), position, "assistant", request_id="r1", **flags)
    return _evaluate(engine, [sl], values)


def test_an_end_without_rows_fires_once_at_the_last_evaluated_token():
    engine = RuleEngine(ruleset(ANSWER_RULES))
    assert _answer(engine, "c", [2.0, 2.0, 2.0]) == []  # no turn end yet: nothing checked
    (firing,) = _evaluate(engine, [_finish("c", 3, end=False, start_row=5)], [9.0] * 5)
    assert (firing.rule, firing.position, firing.value) == ("answer", 2, 2.0)
    # The request of the rows, though the slice without rows names none; its row is the
    # slice's start row, which holds none of the token's values.
    assert (firing.request_id, firing.row, firing.in_batch) == ("r1", 5, False)
    assert firing.message == "answer at 2 of c in r1: 2.0"
    # Checked once: another turn end or the end without rows in between fires nothing.
    assert _evaluate(engine, [_finish("c", 3, end=False)], []) == []
    assert _evaluate(engine, [_finish("c", 3)], []) == []
    assert engine.tracked_conversations == 0


def test_a_turn_end_on_the_last_row_then_an_end_without_rows_fires_once():
    engine = RuleEngine(ruleset(ANSWER_RULES))
    fired = _answer(engine, "c", [2.0, 2.0], turn_end=True)
    assert [(f.rule, f.position, f.in_batch) for f in fired] == [("answer", 1, True)]
    assert _evaluate(engine, [_finish("c", 2)], []) == []
    # The same where the flagged row is a decode step's (one row per slice).
    _answer(engine, "e", [2.0, 2.0])
    assert [f.position for f in _answer(engine, "e", [2.0], position=2, turn_end=True)] == [2]
    assert _evaluate(engine, [_finish("e", 3)], []) == []
    # A row after the flagged one is checked again at the next turn end without rows.
    engine = RuleEngine(ruleset(ANSWER_RULES))
    _answer(engine, "d", [2.0, 2.0], turn_end=True)
    _answer(engine, "d", [2.0], position=2)
    assert [f.position for f in _evaluate(engine, [_finish("d", 3)], [])] == [2]


def test_a_turn_end_without_rows_fires_only_where_the_condition_and_role_held():
    engine = RuleEngine(ruleset(ANSWER_RULES))
    _answer(engine, "low", [2.0, 2.0, 0.0, 0.0])  # mean 1.0 at the last token: not > 1
    for cid in ("user", "user-step"):  # roles: [assistant] leaves them out
        _evaluate(engine, [SequenceSlice(cid, 0, 3, 0, "user")], [5.0, 5.0, 5.0])
    _evaluate(engine, [SequenceSlice("user-step", 0, 1, 3, "user")], [5.0])  # a decode step
    ends = [_finish("low", 4), _finish("user", 3), _finish("user-step", 4), _finish("x", 7)]
    assert _evaluate(engine, ends, []) == []
    assert engine.tracked_conversations == 0
    # A gap (the end is not at the next position) drops the state: nothing to fire.
    engine = RuleEngine(ruleset(ANSWER_RULES))
    _answer(engine, "c", [2.0, 2.0])
    result = engine.evaluate({"p/a": torch.zeros(0)}, [_finish("c", 5)])
    assert (result.firings, result.gaps) == ([], 1)


def test_turn_ends_without_rows_honour_cooldown():
    engine = RuleEngine(
        ruleset(ANSWER_RULES.replace("at: turn_end", "at: turn_end\n    cooldown: 4"))
    )
    fired = [f.position for f in _answer(engine, "c", [2.0, 2.0], turn_end=True)]
    _answer(engine, "c", [2.0], position=2)
    fired += [f.position for f in _evaluate(engine, [_finish("c", 3, end=False)], [])]  # 2 - 1 < 4
    _answer(engine, "c", [2.0, 2.0, 2.0], position=3)
    fired += [f.position for f in _evaluate(engine, [_finish("c", 6, end=False)], [])]  # 5 - 1 >= 4
    assert fired == [1, 5]


def test_a_request_scoped_turn_end_rule_fires_for_the_request_of_its_rows():
    """`scope: request`: a finish message names no request, and does not start one (which
    would reset the rule); the next request's rows do."""
    engine = RuleEngine(
        ruleset(ANSWER_RULES.replace("at: turn_end", "at: turn_end\n    scope: request"))
    )
    _answer(engine, "c", [2.0, 2.0])
    fired = _evaluate(engine, [_finish("c", 2, end=False)], [])
    assert [(f.position, f.request_id) for f in fired] == [(1, "r1")]
    # The next request starts its window afresh: 0.5 alone is not above 1.
    nxt = SequenceSlice("c", 0, 1, 2, "assistant", request_id="r2")
    assert _evaluate(engine, [nxt], [0.5]) == []
    assert _evaluate(engine, [_finish("c", 3)], []) == []


def test_rows_and_their_end_without_rows_in_one_batch_fire_and_end_the_conversation():
    engine = RuleEngine(ruleset(ANSWER_RULES))
    slices = [
        SequenceSlice("new", 0, 2, 0, "assistant", request_id="r1"),
        SequenceSlice("other", 2, 1, 0, "assistant"),
        _finish("new", 2, start_row=3),
    ]
    fired = _evaluate(engine, slices, [2.0, 2.0, 0.0])
    assert [(f.conversation_id, f.position, f.row, f.in_batch) for f in fired] == [
        ("new", 1, 3, False)
    ]
    assert engine.tracked_conversations == 1  # "new" ended, "other" goes on
    # An end without rows before any row of its conversation marks nothing, and takes no slot.
    slices = [_finish("later", 0), SequenceSlice("later", 0, 2, 0, "assistant")]
    assert _evaluate(engine, slices, [2.0, 2.0]) == []
    assert engine.tracked_conversations == 2


def test_turn_ends_without_rows_after_decode_steps_of_many_conversations():
    """Decode steps of 8 conversations (the step kernel), each finished by a message without
    rows at its own step, beside the others' rows: each fires at its last token where the
    4-token mean there is above 1, with that token's value."""
    engine = RuleEngine(ruleset(ANSWER_RULES))
    lengths = {c: 3 + 2 * c for c in range(8)}
    values = {c: [float((c + t) % 4) for t in range(lengths[c])] for c in range(8)}
    fired = []
    for t in range(max(lengths.values()) + 1):
        slices, batch = [], []
        for c in range(8):
            if t < lengths[c]:
                slices.append(
                    SequenceSlice(f"c{c}", len(batch), 1, t, "assistant", request_id="r1")
                )
                batch.append(values[c][t])
            elif t == lengths[c]:
                slices.append(_finish(f"c{c}", t, start_row=len(batch)))
        fired += [
            (f.conversation_id, f.position, f.value, f.in_batch)
            for f in _evaluate(engine, slices, batch)
        ]
    expected = []
    for c in range(8):
        last = lengths[c] - 1
        window = values[c][max(0, last - 3) : last + 1]
        if sum(window) / len(window) > 1:
            expected.append((f"c{c}", last, sum(window) / len(window), False))
    assert sorted(fired) == sorted(expected)
    assert 0 < len(expected) < 8  # some fire, some do not
    assert engine.tracked_conversations == 0


def test_reload_keeps_what_a_turn_end_without_rows_fires_on():
    engine = RuleEngine(ruleset(ANSWER_RULES))
    _answer(engine, "c", [2.0, 2.0])
    _answer(engine, "d", [2.0, 2.0])
    engine.replace_rules(ruleset(ANSWER_RULES))  # unchanged: kept
    assert [f.position for f in _evaluate(engine, [_finish("c", 2)], [])] == [1]
    # A changed condition is another rule: it never saw the last token, so it does not fire.
    engine.replace_rules(ruleset(ANSWER_RULES.replace("> 1", "> 1.5")))
    assert _evaluate(engine, [_finish("d", 2)], []) == []


def test_turn_end_rules_cost_their_kept_condition_in_the_state_budget():
    from monitor.rules.engine import state_bytes_per_conversation

    rules = ruleset(ANSWER_RULES).enabled_rules
    token_only = ruleset(ANSWER_RULES.replace("at: turn_end", "at: token")).enabled_rules
    assert state_bytes_per_conversation(rules) == state_bytes_per_conversation(token_only) + 9


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ("at: turnend", "invalid at 'turnend' (did you mean 'turn_end'?)"),
        ("at: [turn_end]", "at must be a string"),
        ("at: turn_end\n    for: 4", "'for: 4' cannot hold with 'at: turn_end'"),
    ],
)
def test_at_errors_are_located(rule, message):
    text = (
        "features: {a: p/a}\nrules:\n  - rule: r\n    severity: info\n"
        f"    condition: a > 0\n    {rule}\n"
    )
    with pytest.raises(RuleLoadError) as info:
        ruleset(text)
    assert message in str(info.value)
    assert "rules.yaml:6:" in str(info.value) or "rules.yaml:7:" in str(info.value)


def test_at_defaults_to_token_and_turn_end_with_for_one_loads():
    rules = ruleset(
        "features: {a: p/a}\nrules:\n  - {rule: r, severity: info, condition: a > 0}\n"
        "  - {rule: s, severity: info, condition: a > 0, at: turn_end, for: 1}\n"
    ).rules
    assert [rule.at for rule in rules] == ["token", "turn_end"]


def test_rules_test_files_mark_turn_ends(tmp_path):
    """`rules test`: each listed turn ends at its last token unless it says `turn_end: false`;
    a conversation without turns is one turn, ended unless it says otherwise."""
    from monitor.rules.testing import TestFileError, run_test_file

    (tmp_path / "rules.yaml").write_text(
        "features: {a: p/a}\n"
        "rules:\n"
        "  - {rule: turn, severity: info, condition: 'rolling_mean(a, 2) > 0.5', at: turn_end}\n"
    )
    test = tmp_path / "rules_test.yaml"
    test.write_text(
        "rule_files: [rules.yaml]\n"
        "tests:\n"
        "  - name: turns\n"
        "    conversations:\n"
        "      c1:\n"
        "        turns:\n"
        "          - {role: user, tokens: 3}\n"
        "          - {role: assistant, tokens: 3, turn_end: false}\n"
        "          - {role: user, tokens: 2}\n"
        "        series: {a: '1x8'}\n"
        "      c2:\n"
        "        series: {a: '0 0 1 1'}\n"
        "      c3:\n"
        "        turn_end: false\n"
        "        series: {a: '1x4'}\n"
        "    expect:\n"
        "      - {rule: turn, conversation: c1, at_token: 2}\n"
        "      - {rule: turn, conversation: c1, at_token: 7}\n"
        "      - {rule: turn, conversation: c2, at_token: 3}\n"
    )
    result = run_test_file(test)
    assert result.passed, [(c.missing, c.unexpected) for c in result.cases]
    # The same rule at every token would fire elsewhere: the marking is what is tested.
    assert [str(o) for o in result.cases[0].fired] == [
        "turn on c1 at token 2",
        "turn on c1 at token 7",
        "turn on c2 at token 3",
    ]
    test.write_text(test.read_text().replace("turn_end: false}", "turn_end: maybe}"))
    with pytest.raises(TestFileError, match="turns: turn_end: must be true or false"):
        run_test_file(test)


def test_engine_replay_ends_each_turn_at_its_last_token(tmp_path):
    """`rules calibrate`'s replay sends each turn as one slice marked `turn_end`, as a
    capture client marks a finished prompt or answer."""
    from monitor.evaluation.engine_replay import EngineReplay
    from monitor.features.build import build_pack_from_sae, load_sae
    from monitor.features.build.conversations import ConversationTokens
    from monitor.fixtures import write_layer_sae

    pack = build_pack_from_sae(
        load_sae(write_layer_sae(tmp_path / "sae", 16, 32, 3, seed=1)), [1], "p"
    )
    (hook,) = pack.hook_points

    def conversation(name: str, turns: list[tuple[str, int]]) -> ConversationTokens:
        roles = [role for role, n in turns for _ in range(n)]
        return ConversationTokens(
            name,
            0,
            {hook: torch.randn(len(roles), 16)},
            roles,
            torch.ones(len(roles), dtype=torch.bool),
            [n for _, n in turns],
        )

    tokens = [
        conversation("a", [("user", 4), ("assistant", 3)]),
        conversation("b", [("assistant", 2), ("user", 5)]),
    ]
    replay = EngineReplay(tokens, [pack], {"p/1"}, ids=["a", "b"])
    assert all(sl.turn_end for batch in replay.batches for sl in batch.slices)
    # Always true, checked at turn ends: the first firing is the first turn's last token (and
    # of the user's turns alone, the first user turn's).
    rules = ruleset(
        "features: {f: p/1}\nrules:\n"
        "  - {rule: turn, severity: info, condition: 'rolling_mean(f, 64) > -1e30', at: turn_end}\n"
        "  - {rule: user, severity: info, condition: 'rolling_mean(f, 64) > -1e30', "
        "at: turn_end, roles: [user]}\n"
    )
    assert replay.run(rules) == {"turn": {"a": 3, "b": 1}, "user": {"a": 3, "b": 6}}
