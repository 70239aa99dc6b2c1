"""The decode path's shortcuts change nothing but cost: the rule engine's re-use of the last
wave's binding, features gathered from one encoded block (``FeatureBlock``), a stream's
slot columns read once while its slots stay the same, and the caps on conversation slots."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from monitor.limits import MAX_CONVERSATION_SLOTS
from monitor.rules import FeatureBlock, RuleEngine, SequenceSlice
from monitor.sidecar.columns import ConversationTable
from monitor.sidecar.config import ConfigError, Limits, parse_config
from monitor.sidecar.validate import BatchRejected
from monitor.wire import pb
from monitor.wire.columns import ColumnarEncoder
from tests.unit.test_rules_engine import feed, rule_file, ruleset
from tests.unit.test_rules_program import WIDE_RULES


class _NoShortcut(RuleEngine):
    """The engine with the last wave's binding forgotten before every batch: every wave is
    bound conversation by conversation."""

    def evaluate(self, features, sequences, *, model="", client=""):  # type: ignore[no-untyped-def]
        self._last_bind = None
        return super().evaluate(features, sequences, model=model, client=client)


def _random_stream(seed: int, steps: int = 300):  # type: ignore[no-untyped-def]
    """Mostly steady decode steps of the same conversations, in the same order, with the
    events that must break the shortcut: gaps, new requests, ends, new conversations, a
    different client, a reordered step and a prefill."""
    rng = random.Random(seed)
    live = [f"c{i}" for i in range(12)]
    positions = dict.fromkeys(live, 0)
    requests = dict.fromkeys(live, "r0")
    client = "x"
    serial = len(live)
    for _ in range(steps):
        event = rng.random()
        order = list(live)
        rows = dict.fromkeys(order, 1)
        ends: set[str] = set()
        if event < 0.04:
            positions[rng.choice(live)] += 5  # a gap
        elif event < 0.08:
            conv = rng.choice(live)
            requests[conv] = f"r{rng.randrange(1000)}"
        elif event < 0.12:
            ends.add(rng.choice(live))
        elif event < 0.15:
            client = rng.choice("xy")
        elif event < 0.18:
            rng.shuffle(order)
        elif event < 0.21:
            rows[rng.choice(order)] = rng.randint(2, 6)  # a prefill chunk among decode rows
        slices, start = [], 0
        for conv in order:
            n = rows[conv]
            end = conv in ends
            slices.append(
                SequenceSlice(conv, start, n, positions[conv], end=end, request_id=requests[conv])
            )
            positions[conv] += n
            start += n
        values = np.asarray(
            [[rng.gauss(0.3, 1.0) for _ in range(start)] for _ in range(2)], dtype=np.float32
        )
        yield slices, values, client
        for conv in ends:  # a new conversation takes its place
            live[live.index(conv)] = f"c{serial}"
            positions[f"c{serial}"], requests[f"c{serial}"] = 0, "r0"
            serial += 1


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("max_conversations", [100, 14])
def test_the_binding_shortcut_and_feature_blocks_change_no_firing(seed, max_conversations):
    fast = RuleEngine(WIDE_RULES, max_conversations=max_conversations)
    slow = _NoShortcut(WIDE_RULES, max_conversations=max_conversations)
    fired_fast, fired_slow, shortcuts = [], [], 0
    for slices, values, client in _random_stream(seed):
        block = FeatureBlock(np.ascontiguousarray(values.T), {"p/a": 0, "p/b": 1})
        tensors = {"p/a": torch.from_numpy(values[0]), "p/b": torch.from_numpy(values[1])}
        before = fast._last_bind
        a = fast.evaluate(block, slices, client=client)
        shortcuts += before is not None and fast._last_bind is before
        b = slow.evaluate(tensors, slices, client=client)
        fired_fast += [(f.rule, f.conversation_id, f.position, f.value) for f in a.firings]
        fired_slow += [(f.rule, f.conversation_id, f.position, f.value) for f in b.firings]
        assert (a.gaps, a.evicted) == (b.gaps, b.evicted)
        assert fast._conversations.owners() == slow._conversations.owners()
        assert fast.tracked_conversations == slow.tracked_conversations
    assert fired_fast == fired_slow
    # Not vacuous: the shortcut was taken on most steps, and rules fired.
    assert shortcuts > 100
    assert len({rule for rule, *_ in fired_fast}) >= 5


def test_feature_blocks_with_another_index_are_read_by_their_own_columns():
    # The engine keeps the columns it looked up in the last block's index: a block with
    # another index (a reload, another pack layout) must be looked up afresh, one with the
    # same index object must not need to be.
    fast = RuleEngine(WIDE_RULES)
    slow = _NoShortcut(WIDE_RULES)
    indexes = [{"p/a": 0, "p/b": 1}, {"p/a": 1, "p/b": 0}, {"p/b": 2, "p/x": 0, "p/a": 1}]
    fired_fast, fired_slow = [], []
    for step, (slices, values, client) in enumerate(_random_stream(4, steps=120)):
        index = indexes[(step // 7) % len(indexes)]
        block = np.zeros((values.shape[1], 3), dtype=np.float32)
        block[:, index["p/a"]], block[:, index["p/b"]] = values[0], values[1]
        a = fast.evaluate(FeatureBlock(block, index), slices, client=client)
        b = slow.evaluate({"p/a": values[0], "p/b": values[1]}, slices, client=client)
        fired_fast += [(f.rule, f.conversation_id, f.position, f.value) for f in a.firings]
        fired_slow += [(f.rule, f.conversation_id, f.position, f.value) for f in b.firings]
    assert fired_fast == fired_slow
    assert len({rule for rule, *_ in fired_fast}) >= 3


def test_a_new_client_takes_over_its_conversations_on_a_repeated_step():
    engine = RuleEngine(WIDE_RULES)
    step = [SequenceSlice(f"c{i}", i, 1, 0) for i in range(4)]
    values = FeatureBlock(np.zeros((4, 2), dtype=np.float32), {"p/a": 0, "p/b": 1})
    engine.evaluate(values, step, client="x")
    engine.evaluate(values, [s._replace(position=1) for s in step], client="x")
    assert engine._conversations.owners() == {"x": 4}
    engine.evaluate(values, [s._replace(position=2) for s in step], client="y")
    assert engine._conversations.owners() == {"y": 4}


def test_a_feature_block_reads_like_a_mapping_of_columns():
    block = FeatureBlock(np.arange(6, dtype=np.float64).reshape(3, 2), {"p/a": 1, "p/b": 0})
    assert block["p/a"].tolist() == [1.0, 3.0, 5.0]
    assert block["p/a"].dtype == np.float32
    assert sorted(block) == ["p/a", "p/b"] and len(block) == 2
    assert "p/b" in block and "p/c" not in block and block.get("p/c") is None
    assert block.columns(["p/b", "p/a"]).tolist() == [0, 1]
    with pytest.raises(ValueError, match="rows, features"):
        FeatureBlock(np.zeros(3), {"p/a": 0})
    engine = RuleEngine(WIDE_RULES)
    with pytest.raises(ValueError, match="missing feature 'p/b'"):
        engine.evaluate(FeatureBlock(np.zeros((1, 1)), {"p/a": 0}), [SequenceSlice("c", 0, 1, 0)])


def _columns(slots, positions, define=()):  # type: ignore[no-untyped-def]
    columns = pb.SequenceColumns()
    columns.define.extend(pb.ConversationSlot(**d) for d in define)
    columns.slot.extend(slots)
    columns.rows.extend([1] * len(slots))
    columns.position.extend(positions)
    return columns


def test_slot_columns_read_again_after_a_definition_changes_them():
    limits = Limits()
    table = ConversationTable(4)
    first = _columns([0, 1], [0, 0], [{"slot": 0, "conversation_id": "a"}])
    first.define.append(pb.ConversationSlot(slot=1, conversation_id="b", role="user"))
    table.define(list(first.define), limits)
    slices, _ = table.slices(first, limits)
    assert [(s.conversation_id, s.role) for s in slices] == [("a", ""), ("b", "user")]
    again, _ = table.slices(_columns([0, 1], [1, 1]), limits)  # read from the last batch
    assert [(s.conversation_id, s.position) for s in again] == [("a", 1), ("b", 1)]
    assert table.slices(_columns([0, 1], [2, 2]), limits, scope="t")[0][0].scope == "t"
    redefine = _columns([0, 1], [0, 2], [{"slot": 0, "conversation_id": "c", "role": "x"}])
    table.define(list(redefine.define), limits)
    slices, _ = table.slices(redefine, limits)
    assert [(s.conversation_id, s.role) for s in slices] == [("c", "x"), ("b", "user")]
    # A refused definition empties its slot: the next read of the same slots fails there.
    with pytest.raises(BatchRejected, match="conversation_id"):
        table.define([pb.ConversationSlot(slot=1, conversation_id="")], limits)
    with pytest.raises(BatchRejected, match=r"columns.slot\[1\]: slot 1 holds no conversation"):
        table.slices(_columns([0, 1], [1, 3]), limits)


def test_a_client_table_holds_at_most_the_slot_cap_whatever_the_sidecar_reports():
    encoder = ColumnarEncoder(2**32 - 1)  # a uint32 from GetStatus
    assert encoder.slots == MAX_CONVERSATION_SLOTS
    batch = pb.StepBatch(seq_no=1)
    batch.sequences.add(conversation_id="a", rows=1, position=0)
    assert encoder.encode(batch).columns.define[0].slot == 0
    assert ColumnarEncoder(8).slots == 8


def test_a_sidecar_table_holds_at_most_the_slot_cap(tmp_path):
    (tmp_path / "p.pack").write_text("x")

    def config(slots: int):  # type: ignore[no-untyped-def]
        limits = {"max_conversation_slots": slots}
        return parse_config({"packs": ["p.pack"], "limits": limits}, tmp_path, "cfg.yaml")

    assert config(MAX_CONVERSATION_SLOTS).limits.max_conversation_slots == MAX_CONVERSATION_SLOTS
    with pytest.raises(
        ConfigError,
        match=f"max_conversation_slots: expected an integer in 1..{MAX_CONVERSATION_SLOTS}",
    ):
        config(MAX_CONVERSATION_SLOTS + 1)


def test_temporal_functions_of_one_value_in_a_decode_step_match_a_prefill():
    # Every temporal function of the stage reads the same register: each still gets its row.
    rules = ruleset(
        rule_file(
            "rule: r, severity: info, condition: 'rolling_max(a, 3) > 1 and rolling_mean(a, 4) > 0'"
        )
    )
    values = [(v, 0.0) for v in np.random.default_rng(5).normal(0.5, 1.0, 40).tolist()]
    decode, prefill = RuleEngine(rules), RuleEngine(rules)
    stepped = [f for t in range(40) for f in feed(decode, [("c", t, values[t : t + 1], "", False)])]
    assert stepped == feed(prefill, [("c", 0, values, "", False)])
    assert len(stepped) > 3


def test_repeated_masks_follow_a_change_of_role_or_tenant():
    rules = ruleset(
        rule_file(
            "rule: r, severity: info, condition: 'a > 0', roles: [assistant], "
            "exceptions: [{name: evals, attributes: {tenant: evals}}]"
        )
    )
    engine = RuleEngine(rules)
    tenant = {"tenant": "t"}

    def step(position, roles, tenants):  # type: ignore[no-untyped-def]
        # A run ends at odd positions (a = 0), so every even one may fire again.
        a = np.full((2, 2), float(position % 2 == 0), dtype=np.float32)
        slices = [
            SequenceSlice(f"c{i}", i, 1, position, role, attributes=attrs)
            for i, (role, attrs) in enumerate(zip(roles, tenants, strict=True))
        ]
        fired = engine.evaluate(FeatureBlock(a, {"p/a": 0, "p/b": 1}), slices).firings
        return [f.conversation_id for f in fired]

    both = ["assistant", "assistant"]
    assert step(0, both, [tenant, tenant]) == ["c0", "c1"]
    assert step(1, both, [tenant, tenant]) == []
    assert step(2, both, [tenant, tenant]) == ["c0", "c1"]  # the same masks again
    assert step(3, both, [tenant, tenant]) == []
    assert step(4, ["assistant", "user"], [tenant, tenant]) == ["c0"]
    assert step(5, both, [tenant, tenant]) == []
    assert step(6, both, [tenant, {"tenant": "evals"}]) == ["c0"]
    assert step(7, both, [tenant, tenant]) == []
    tenant["tenant"] = "evals"  # the same mapping, changed in place
    assert step(8, both, [tenant, tenant]) == []


def test_feature_blocks_are_read_right_when_slices_come_out_of_row_order():
    # Slices listed out of row order give a wave layout that is not the identity: the
    # block's rows and the rules' columns are then picked together (never a copy of every
    # column first), and must give what the per-feature path gives.
    fast = RuleEngine(WIDE_RULES)
    slow = _NoShortcut(WIDE_RULES)
    rng = random.Random(5)
    fired_fast, fired_slow, reordered = [], [], 0
    for slices, values, client in _random_stream(6, steps=150):
        listed = list(slices)
        rng.shuffle(listed)
        reordered += [s.start_row for s in listed] != sorted(s.start_row for s in listed)
        block = np.zeros((values.shape[1], 3), dtype=np.float32)
        block[:, 2], block[:, 0] = values[0], values[1]
        a = fast.evaluate(FeatureBlock(block, {"p/a": 2, "p/b": 0}), listed, client=client)
        b = slow.evaluate({"p/a": values[0], "p/b": values[1]}, listed, client=client)
        fired_fast += sorted((f.rule, f.conversation_id, f.position, f.value) for f in a.firings)
        fired_slow += sorted((f.rule, f.conversation_id, f.position, f.value) for f in b.firings)
    assert fired_fast == fired_slow
    assert reordered > 100 and len({rule for rule, *_ in fired_fast}) >= 3
