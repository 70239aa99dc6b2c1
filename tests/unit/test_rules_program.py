"""The compiled rule program: decode steps (one token per conversation, computed by the step
kernel) give exactly what prefills and mixed batches give, for every temporal function and
for windows past the short ones of the chunking property test."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monitor.rules import RuleEngine, SequenceSlice
from monitor.rules.program import compile_rules
from tests.unit.test_rules_engine import feed, rule_file, ruleset

# Every temporal function, two scopes, nesting, and windows up to 64; thresholds in the
# middle of the values so the rules fire on and off. Values of firings are the functions'.
WIDE_RULES = ruleset(
    rule_file(
        "rule: mean16, severity: info, condition: 'rolling_mean(a, 16) > 0.1'",
        "rule: sum64, severity: info, condition: 'rolling_sum(b, 64) > 2', scope: request",
        "rule: max17, severity: info, condition: 'rolling_max(a, 17) > 1.5 and b > 0'",
        "rule: min9, severity: info, condition: 'rolling_min(b, 9) > -1.2', for: 2",
        "rule: count, severity: info, condition: 'count_over(a > 0.5, 12) >= 5'",
        "rule: ewma, severity: info, condition: 'ewma(a, 3) > 0.2'",
        "rule: delta, severity: info, condition: 'delta(b, 7) > 1'",
        "rule: nested, severity: info, condition: 'rolling_max(rolling_mean(a, 5), 20) > 0.8'",
        "rule: running, severity: info, condition: 'cummax(rolling_mean(b, 3)) > 1.4 and a < 0'",
        "rule: const, severity: info, condition: 'rolling_sum(1 + 1, 4) > 7 and a > 1'",
    )
)


def _stream(seed: int, conversations: int, tokens: int) -> dict[str, list[tuple[float, float]]]:
    generator = np.random.default_rng(seed)
    values = generator.standard_normal((conversations, tokens, 2)).astype(np.float32)
    return {f"c{i}": [(float(a), float(b)) for a, b in values[i]] for i in range(conversations)}


# No rule holds ``for: N`` tokens: decode steps take the engine's shortcut for run lengths.
FOR_ONE_RULES = ruleset(
    rule_file(
        "rule: mean16, severity: info, condition: 'rolling_mean(a, 16) > 0.1'",
        "rule: plain, severity: info, condition: 'a > 0.3'",
        "rule: cool, severity: info, condition: 'b > -0.5', cooldown: 3",
        "rule: min9, severity: info, condition: 'rolling_min(b, 9) > -1.2'",
    )
)


def _decode(conversations: dict[str, list], rotate: bool = False, rules=None) -> list:
    """Every step carries one token of every conversation (a decode step)."""
    engine = RuleEngine(rules or WIDE_RULES)
    names = list(conversations)
    fired = []
    for t in range(max(len(v) for v in conversations.values())):
        if rotate:  # a different order each step: state rows are gathered, not sliced
            names = names[1:] + names[:1]
        batch = [(c, t, conversations[c][t : t + 1], "", False) for c in names]
        fired += feed(engine, batch)
    return sorted(fired)


def _prefill(conversations: dict[str, list], chunk: int, rules=None) -> list:
    engine = RuleEngine(rules or WIDE_RULES)
    fired = []
    length = max(len(v) for v in conversations.values())
    for start in range(0, length, chunk):
        batch = [(c, start, v[start : start + chunk], "", False) for c, v in conversations.items()]
        fired += feed(engine, batch)
    return sorted(fired)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_decode_steps_match_prefills_bit_for_bit(seed):
    conversations = _stream(seed, conversations=5, tokens=150)
    expected = _prefill(conversations, chunk=150)
    assert len({rule for rule, *_ in expected}) >= 8  # most rules fire somewhere
    assert _decode(conversations) == expected  # values compared exactly, not approximately
    assert _prefill(conversations, chunk=7) == expected
    assert _decode(conversations, rotate=True) == expected


@pytest.mark.parametrize("seed", [0, 1])
def test_decode_steps_of_rules_without_for_match_prefills(seed):
    # Runs of true tokens fire where they start (and, with a cooldown, not again within it),
    # whether the run lengths come from the decode shortcut or the general formula.
    assert RuleEngine(FOR_ONE_RULES)._for_one
    conversations = _stream(seed, conversations=4, tokens=80)
    expected = _prefill(conversations, chunk=80, rules=FOR_ONE_RULES)
    assert {"mean16", "plain", "cool", "min9"} <= {rule for rule, *_ in expected}
    assert _decode(conversations, rules=FOR_ONE_RULES) == expected
    assert _decode(conversations, rotate=True, rules=FOR_ONE_RULES) == expected
    assert _prefill(conversations, chunk=9, rules=FOR_ONE_RULES) == expected


def test_a_step_with_an_infinite_value_matches_the_prefill():
    # The step kernel sums with a matrix product, where 0 * inf would be NaN in every other
    # function's sum: such a step must be computed one function at a time, with the same
    # results as a prefill.
    conversations = _stream(3, conversations=3, tokens=40)
    a, b = conversations["c1"][20]
    conversations["c1"][20] = (float("inf"), b)
    conversations["c2"][25] = (a, float("-inf"))
    assert _decode(conversations) == _prefill(conversations, chunk=40)


@pytest.mark.parametrize(
    "condition, values",
    [
        ("rolling_max(a, 4) > -3", [-5.0, -5.0, -5.0]),  # an empty window is not 0
        ("rolling_min(a, 4) < 3", [5.0, 5.0, 5.0]),
        ("cummax(a) > -3", [-5.0, -4.0, -6.0]),
        ("rolling_sum(a, 3) < -14", [-5.0, -5.0, -5.0, 5.0]),
    ],
)
@pytest.mark.parametrize("one_at_a_time", [True, False])
def test_history_before_the_first_token_is_empty(condition, values, one_at_a_time):
    engine = RuleEngine(ruleset(rule_file(f"rule: r, severity: info, condition: '{condition}'")))
    fired = []
    if one_at_a_time:
        for t, value in enumerate(values):
            fired += feed(engine, [("c", t, [(value, 0.0)], "", False)])
    else:
        fired = feed(engine, [("c", 0, [(v, 0.0) for v in values], "", False)])
    expected = [2] if condition.startswith("rolling_sum") else []
    assert [position for _, _, position, _ in fired] == expected


def test_shared_sub_expressions_are_computed_once_per_scope():
    rules = ruleset(
        rule_file(
            "rule: x, severity: info, condition: 'rolling_mean(a, 8) > 1'",
            "rule: y, severity: info, condition: 'rolling_mean(a, 8) > 1', for: 3",
            "rule: z, severity: info, condition: 'rolling_mean(a, 8) > 1', scope: request",
        )
    ).enabled_rules
    program = compile_rules(rules)
    # One window per scope; the comparison itself is shared by x and y only.
    assert sorted(slot.key[0] for slot in program.temporal) == ["conversation", "request"]
    assert program.conditions[0] == program.conditions[1] != program.conditions[2]


def test_features_may_be_numpy_arrays_or_other_dtypes():
    rules = ruleset(rule_file("rule: r, severity: info, condition: 'a > 0.5 and b < 0'"))
    slices = [SequenceSlice("c", 0, 3, 0)]
    expected = RuleEngine(rules).evaluate(
        {"p/a": torch.tensor([1.0, 0.0, 1.0]), "p/b": torch.tensor([-1.0, -1.0, 1.0])}, slices
    )
    for a, b in (
        (np.array([1.0, 0.0, 1.0]), np.array([-1.0, -1.0, 1.0], dtype=np.float32)),
        (torch.tensor([1.0, 0.0, 1.0], dtype=torch.bfloat16), torch.tensor([-1.0, -1.0, 1.0])),
        (torch.tensor([1.0, 0.0, 1.0], requires_grad=True), torch.tensor([-1.0, -1.0, 1.0])),
    ):
        got = RuleEngine(rules).evaluate({"p/a": a, "p/b": b}, slices)
        assert (
            [(f.rule, f.position) for f in got.firings]
            == [(f.rule, f.position) for f in expected.firings]
            == [("r", 0)]
        )


def _registers(program, rows: int, seed: int, out: np.ndarray | None = None) -> np.ndarray:
    """A register file with random features, some of them not finite."""
    registers = program.allocate(rows) if out is None else out
    features = np.random.default_rng(seed).standard_normal((len(program.feature_names), rows))
    features[0, :3] = [np.inf, -np.inf, np.nan]
    registers[: len(features)] = features * 3
    return registers


def _fake_temporal(slots, xs: np.ndarray) -> np.ndarray:
    # Any function of the inputs: the plan must hand the stage the same inputs as ``run``.
    return xs * np.float32(0.5) + np.arange(len(slots), dtype=np.float32)[:, None]


def test_a_step_plan_computes_what_run_computes_step_after_step():
    from monitor.bench.rules import bench_ruleset

    program = compile_rules(bench_ruleset().enabled_rules)
    # The bench's rules read operands through index arrays, clip, sigmoid, abs, neg and two
    # temporal stages: every kind of prepared call.
    assert any(
        not isinstance(rows, slice) for plain, _ in program.stages for g in plain for rows in g.args
    )
    plan = program.plan(7)
    assert program.plan(7) is plan  # kept for the next step of as many rows
    for seed in range(3):  # the kept registers and buffers are written again each step
        want = program.run(_registers(program, 7, seed), _fake_temporal)
        _registers(program, 7, seed, out=plan.registers)
        got = plan.run(_fake_temporal)
        for a, b in zip(got, want, strict=True):
            assert a.shape == b.shape and a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)  # NaN where NaN
        # What the plan returns is not a view of registers it will write again.
        assert not np.shares_memory(got[1], plan.registers)


def test_a_decode_step_of_every_slot_matches_one_of_some_slots():
    """With as many conversations as state rows, a decode step's new history replaces the
    table's array (double-buffered) instead of being copied into it: the same firings as an
    engine whose table has room for more, which copies."""
    conversations = _stream(3, conversations=6, tokens=120)
    full = RuleEngine(WIDE_RULES, max_conversations=6)
    roomy = RuleEngine(WIDE_RULES, max_conversations=64)
    feed(roomy, [("other", 0, [(0.0, 0.0)], "", False)])  # a slot the steps do not hold
    fired: tuple[list, list] = ([], [])
    for t in range(120):
        batch = [(c, t, conversations[c][t : t + 1], "", False) for c in conversations]
        for engine, out in zip((full, roomy), fired, strict=True):
            out += feed(engine, batch)
    assert full._history.spare is not None  # the double-buffered path ran
    assert roomy._history.spare is None
    assert fired[0] == fired[1]
    assert len(fired[0]) > 50


def test_a_large_rule_history_is_not_double_buffered():
    """The spare history array is a second copy of the whole table, outside
    `max_rule_state_bytes`: only small tables keep one. 300 conversations of a 4,096-token
    window are 4.7 MiB of history; a decode step of every slot then copies back instead."""
    engine = RuleEngine(
        ruleset(rule_file("rule: r, severity: info, condition: 'rolling_max(a, 4096) > 5'")),
        max_conversations=300,
    )
    names = [f"c{i}" for i in range(300)]
    for t in range(2):  # the first step creates the slots, the second is a wave of all of them
        feed(engine, [(name, t, [(0.0, 0.0)], "", False) for name in names])
    assert engine._history.data.shape[0] == 300 and engine._history.data.nbytes > 4 << 20
    assert engine._history.spare is None


def test_the_step_kernel_keeps_one_buffer_for_decode_waves_of_changing_size():
    """Decode waves change size every few steps (requests join and leave); the step kernel's
    float64 buffers, outside the rule-state budget, must not be kept once per size: one pair
    for the largest wave, whose leading rows smaller waves use (stale rows never leak)."""
    text = rule_file(
        "rule: m, severity: info, condition: 'rolling_mean(a, 64) > 0.2'",
        "rule: s, severity: info, condition: 'rolling_sum(b, 8) > 1.5'",
        "rule: e, severity: info, condition: 'ewma(a, 0.5) > 0.6'",
    )
    engine, single = RuleEngine(ruleset(text)), RuleEngine(ruleset(text))
    rng = np.random.default_rng(7)
    sizes = [20 + (step * 5) % 8 for step in range(40)]  # 20..27 conversations, mixed order
    waves, one_by_one = [], []
    for step, size in enumerate(sizes):
        batch = [
            (f"c{i}", step, [(float(rng.random()), float(rng.random()))], "assistant", False)
            for i in range(size)
        ]
        waves += feed(engine, batch)
        for item in batch:  # one row per call: no buffer is ever shared between sizes
            one_by_one += feed(single, [item])
    assert waves and sorted(waves) == sorted(one_by_one)
    kernels = list(engine._step_kernels.values())
    assert kernels
    for kernel in kernels:
        columns = kernel.sum_width + len(kernel.sums) + len(kernel.sums)
        assert kernel.kept_bytes == max(sizes) * columns * 8
