"""Issue 14, sidecar side, the parts that need no server: output templates, reload of an
emptied rule file, the rules engine's conversation table (zero-row slices, fair eviction,
scoping), temporal windows that grow with use under a state budget, the stream byte budget,
bounded labels, and the capture leftovers (split-device clone, per-sequence ids)."""

from __future__ import annotations

import asyncio
import gc
import io
import math
import tempfile
import weakref
from pathlib import Path

import pytest
import torch

from monitor.capture.hooks import ConversationContext, PositionLedger, StepAssembler, _Pending
from monitor.heap import GEN0_THRESHOLD
from monitor.rules import RuleEngine, RuleSet, SequenceSlice, load_rules
from monitor.rules.cli import check_rules
from monitor.rules.conversations import Conversation, ConversationTable
from monitor.rules.engine import state_bytes_per_conversation
from monitor.rules.reload import RuleReloader
from monitor.sidecar import streams
from monitor.sidecar.firings import BoundedLabel
from monitor.sidecar.grouping import READ_AHEAD
from monitor.sidecar.process import release_replaced
from monitor.sidecar.service import _read_into
from monitor.wire import encode_tensor, pb


def ruleset(text: str) -> RuleSet:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "rules.yaml"
        path.write_text(text)
        return load_rules([path])


def feed(engine: RuleEngine, slices: list[tuple], client: str = "") -> list[tuple[str, int]]:
    """(conversation, position, values, end, scope) slices -> (conversation, position) fired."""
    built, values = [], []
    for conversation, position, vals, end, scope in slices:
        built.append(
            SequenceSlice(conversation, len(values), len(vals), position, end=end, scope=scope)
        )
        values.extend(vals)
    features = {"p/a": torch.tensor(values, dtype=torch.float32)}
    result = engine.evaluate(features, built, client=client)
    return [(f.conversation_id, f.position) for f in result.firings]


FOR_8 = "features: {a: p/a}\nrules:\n  - {rule: r, severity: info, condition: a > 0, for: 8}\n"


# --------------------------------------------------------------------------- finding 5


@pytest.mark.parametrize(
    ("output", "problem"),
    [
        ("v={value:{position}}", "must be fixed text"),
        ("v={value:{position}.2f}", "must be fixed text"),
        ("v={value:>99}", "format width 99 of {value} in output is too large (at most 64)"),
        ("v={value:.40f}", "format precision 40 of {value} in output is too large"),
        ("v={value:>{end}}", "must be fixed text"),
    ],
)
def test_rules_check_refuses_format_specs_from_data(tmp_path, output, problem):
    path = tmp_path / "r.yaml"
    path.write_text(
        "features: {a: p/a}\nrules:\n"
        "  - rule: r\n    severity: info\n    condition: a > 1\n"
        f"    output: '{output}'\n"
    )
    err = io.StringIO()
    assert check_rules([path], out=io.StringIO(), err=err) == 1
    first = err.getvalue().splitlines()[0]
    assert first.startswith(f"{path}:6:13: ")  # located at the template
    assert problem in first


def test_fixed_format_specs_still_pass(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "features: {a: p/a}\nrules:\n  - rule: r\n    severity: info\n    condition: a > 1\n"
        "    output: '{value:>+10.3f} {position:,} {conversation_id!r:<64} {value:.2%}'\n"
    )
    assert check_rules([path], out=io.StringIO(), err=io.StringIO()) == 0


# --------------------------------------------------------------------------- finding 7


@pytest.mark.parametrize(
    "emptied",
    ["", "# being rewritten\n", "features: {a: p/a}\n", "features: {a: p/a}\nrules:\n"],
)
def test_reload_refuses_a_file_that_lost_every_rule(tmp_path, emptied):
    path = tmp_path / "r.yaml"
    path.write_text(FOR_8)
    reloader = RuleReloader([path], known_features={"p/a"})
    first = reloader.check(force=True)
    assert first is not None and first.ok
    path.write_text(emptied)
    result = reloader.check()
    assert result is not None and not result.ok
    assert result.error.startswith(f"{path}:1:1: the file defined 1 rule(s) and now defines none")
    assert "rules: []" in result.error
    assert reloader.ruleset is first.ruleset  # the running set stays
    path.write_text("features: {a: p/a}\nrules: []  # alerting off on purpose\n")
    result = reloader.check()
    assert result is not None and result.ok and result.ruleset is not None
    assert result.ruleset.rules == []


def test_reload_of_other_files_is_unaffected(tmp_path):
    keep, other = tmp_path / "a.yaml", tmp_path / "b.yaml"
    keep.write_text(FOR_8)
    other.write_text("rules: []\n")
    reloader = RuleReloader([keep, other], known_features={"p/a"})
    assert reloader.check(force=True).ok
    other.write_text("")  # it had no rules: nothing is dropped
    assert reloader.check().ok


# --------------------------------------------------------------------------- finding 3


def test_zero_row_slices_of_unknown_conversations_take_no_state():
    engine = RuleEngine(ruleset(FOR_8), max_conversations=8)
    feed(engine, [("real", 0, [1.0], False, "")])
    many = [(f"ghost-{i}", 0, [], False, "") for i in range(1000)]
    feed(engine, many)
    assert engine.tracked_conversations == 1  # not evicted, no ghosts
    assert feed(engine, [("real", 1, [1.0] * 7, False, "")]) == [("real", 7)]


def test_a_flood_of_new_ids_evicts_the_flooder_not_the_quiet_client():
    engine = RuleEngine(ruleset(FOR_8), max_conversations=16)
    assert feed(engine, [("victim", 0, [1.0] * 4, False, "")], client="alice") == []
    for i in range(200):  # mallory's new ids, far more than the cap
        feed(engine, [(f"flood-{i}", 0, [1.0], False, "")], client="mallory")
    assert engine._conversations.owners() == {"alice": 1, "mallory": 15}
    fired = feed(engine, [("victim", 4, [1.0] * 4, False, "")], client="alice")
    assert fired == [("victim", 7)]  # the for: 8 run survived


def test_fair_eviction_takes_from_the_largest_owner_and_never_from_the_wave():
    table = ConversationTable(6)
    for i in range(4):
        table.add(f"b{i}", Conversation(i, 0, "", "bob"))
    table.add("a0", Conversation(4, 0, "", "alice"))
    table.add("c0", Conversation(5, 0, "", "carol"))
    # carol (1 of 6, under its share of 2) adding: bob, the largest, loses its LRU
    assert table.victim("carol", keep=set()) == "b0"
    table.touch("b0", "bob")  # now b1 is bob's least recently used
    assert table.victim("bob", keep=set()) == "b1"  # bob is over its share: its own
    # every conversation of the largest owner is in use: the next largest gives one up
    assert table.victim("carol", keep={f"b{i}" for i in range(4)}) in {"a0", "c0"}
    table.touch("a0", "carol")  # continuing someone's conversation takes it over
    assert table.owners() == {"bob": 4, "carol": 2}


def test_scope_keeps_same_ids_of_two_clients_apart():
    engine = RuleEngine(ruleset(FOR_8), max_conversations=100)
    assert feed(engine, [("c", 0, [1.0] * 4, False, "alice")], client="alice") == []
    # bob ends "c" in his own scope: alice's conversation is untouched
    assert feed(engine, [("c", 0, [], True, "bob")], client="bob") == []
    fired = feed(engine, [("c", 4, [1.0] * 4, False, "alice")], client="alice")
    assert fired == [("c", 7)]
    # in one namespace, the same end would have reset it
    shared = RuleEngine(ruleset(FOR_8), max_conversations=100)
    feed(shared, [("c", 0, [1.0] * 4, False, "")])
    feed(shared, [("c", 0, [], True, "")])
    assert feed(shared, [("c", 4, [1.0] * 4, False, "")]) == []


# --------------------------------------------------------------------------- rolling windows


LONG = (
    "features: {a: p/a}\nrules:\n"
    "  - {rule: r, severity: info, condition: 'rolling_max(a, 4096) > 5'}\n"
)


def test_long_windows_are_bounded_by_the_rule_state_budget():
    budget = 16 * 1024 * 1024
    engine = RuleEngine(ruleset(LONG), max_conversations=100_000, max_state_bytes=budget)
    assert engine.max_conversations < 2048
    for start in range(0, 2048, 64):  # 2,048 short conversations of 3 tokens
        slices = [(f"c{start + j}", 0, [0.0, 0.0, 0.0], False, "") for j in range(64)]
        feed(engine, slices)
    assert engine.tracked_conversations == engine.max_conversations
    state = sum(t.data.nbytes for t in (engine._history, engine._seen, engine._runs, engine._fired))
    assert state <= budget  # bounded, where before 2,048 slots of 16 KiB each were 32 MiB
    # memory grows with use: a few conversations take a few slots, not the cap's worth
    few = RuleEngine(ruleset(LONG), max_conversations=100_000, max_state_bytes=budget)
    feed(few, [("a", 0, [1.0], False, "")])
    assert few._history.data.nbytes <= 64 * 4096 * 4


def test_widening_windows_give_the_same_firings_as_full_ones():
    generator = torch.Generator().manual_seed(3)
    values = (torch.rand(900, generator=generator) * 10).tolist()
    text = (
        "features: {a: p/a}\nrules:\n"
        "  - {rule: r, severity: info, condition: 'rolling_max(a, 300) < 9.9 and "
        "rolling_mean(a, 200) > 5'}\n"
    )
    engine = RuleEngine(ruleset(text))
    fired, position = [], 0
    for size in [1, 2, 5, 17, 40, 100, 3, 250, 482]:  # crosses every widening step
        fired += feed(engine, [("c", position, values[position : position + size], False, "")])
        position += size
    expected = []
    for t in range(900):
        window_max = max(values[max(0, t - 299) : t + 1])
        recent = values[max(0, t - 199) : t + 1]
        if window_max < 9.9 and sum(recent) / len(recent) > 5:
            expected.append(("c", t))
    assert fired == expected


def test_rule_state_budget_bounds_conversations():
    rules = ruleset(LONG)
    per_conversation = state_bytes_per_conversation(rules.enabled_rules)
    assert per_conversation >= 4095 * 4
    engine = RuleEngine(rules, max_conversations=100_000, max_state_bytes=16 * 1024 * 1024)
    assert engine.max_conversations == 16 * 1024 * 1024 // per_conversation
    small = RuleEngine(ruleset(FOR_8), max_conversations=100, max_state_bytes=1 << 30)
    assert small.max_conversations == 100  # the configured cap when the budget allows it


# --------------------------------------------------------------------------- streams


async def _reader_waits(reader: asyncio.Task, arrived: asyncio.Queue, budget) -> int:
    """Yield to the event loop until `_read_into` waits for room: the budget is full and the
    queue has not grown for a few turns (it parses inline, so a full budget means it is
    parked in `wait_for_room`). Bounded in turns of the loop, not in time; the held count."""
    last, same = -1, 0
    for _ in range(10_000):
        await asyncio.sleep(0)  # one turn of the loop: the reader runs until it next waits
        assert not reader.done(), "the reader stopped instead of waiting for room"
        full = budget.batches >= budget.max_batches or budget.bytes >= budget.max_bytes
        held = arrived.qsize()
        same = same + 1 if full and held == last else 0
        last = held
        if same >= 20:
            return held
    raise AssertionError(f"the reader did not stop: {arrived.qsize()} held, {budget.bytes} B")


def test_read_ahead_is_bounded_in_bytes_not_only_in_messages():
    async def scenario() -> int:
        message = pb.StepBatch(seq_no=1, model="x" * (1024 * 1024)).SerializeToString()

        async def requests():
            for _ in range(64):
                yield message

        arrived: asyncio.Queue = asyncio.Queue()
        budget = streams.StreamBudget(READ_AHEAD, 4 * 1024 * 1024)
        reader = asyncio.create_task(_read_into(requests(), arrived, budget))
        held = await _reader_waits(reader, arrived, budget)  # nothing is processed yet
        assert budget.bytes == held * len(message)
        await budget.release(arrived.get_nowait()[1])  # one processed: room for one more
        assert await _reader_waits(reader, arrived, budget) == held
        reader.cancel()
        return held

    assert asyncio.run(scenario()) == 4


def test_decoded_activations_count_towards_the_stream_budget_and_are_given_back():
    """A held message's decoded activations (a copy of its bytes) count towards
    max_stream_bytes while it is held, and all of it comes back when it is released."""
    rows, d_model, max_bytes = 64, 4096, 4 * 1024 * 1024
    batch = pb.StepBatch(seq_no=1, model="m")
    batch.sequences.append(pb.Sequence(conversation_id="c", rows=rows, position=0))
    activations = encode_tensor(torch.randn(rows, d_model).to(torch.bfloat16))
    batch.layers.append(pb.Layer(hook_point="layers.1", activations=activations))
    message = batch.SerializeToString()
    decoded = rows * d_model * 2  # BF16
    each = len(message) + decoded
    count = 12

    async def scenario() -> None:
        async def requests():
            for _ in range(count):
                yield message

        arrived: asyncio.Queue = asyncio.Queue()
        budget = streams.StreamBudget(READ_AHEAD, max_bytes)
        reader = asyncio.create_task(_read_into(requests(), arrived, budget))
        held = await _reader_waits(reader, arrived, budget)
        # Admitted while below max_bytes: the first count of messages that reaches it, each
        # with its decoded copy (without the copy it would be twice as many).
        assert held == math.ceil(max_bytes / each) < math.ceil(max_bytes / len(message))
        assert budget.bytes == held * each and budget.batches == held
        assert budget.peak_bytes < max_bytes + each  # the bound: plus one message and its copy
        first = arrived.get_nowait()
        assert first[2][0] is not None and first[2][0].nbytes == decoded
        assert first[1] == each  # what the handler gives back when the batch is processed
        # Process every batch as it comes, to the end of the stream: all bytes come back.
        await budget.release(first[1])
        for _ in range(count):  # bounded: `count` messages, then the end (None)
            item = await asyncio.wait_for(arrived.get(), 60)  # a hang guard, not a timing
            if item is None:
                break
            await budget.release(item[1])
        await reader
        assert budget.bytes == 0 and budget.batches == 0
        assert budget.peak_bytes < max_bytes + each

    asyncio.run(scenario())


def test_undecodable_messages_are_marked_not_raised():
    assert streams.parse_batch(b"\x0a\xff\xff\xff\xff") is streams.UNDECODABLE
    decode = streams.tolerant_deserializer(pb.StepBatch)
    assert decode(b"\xff\xff\xff\xff") is streams.UNDECODABLE
    assert decode(pb.StepBatch(seq_no=3).SerializeToString()).seq_no == 3


def test_bounded_label_keeps_the_first_values():
    label = BoundedLabel(2)
    assert [label.value(v) for v in ("a", "b", "c", "a", "d")] == ["a", "b", "other", "a", "other"]


# --------------------------------------------------------------------------- finding 10


def test_replaced_objects_in_a_frozen_cycle_are_released():
    class Node:
        pass

    old = Node()
    old.me = old  # a reference cycle: only the cyclic collector can free it
    replaced = weakref.ref(old)
    gc.collect()
    gc.freeze()
    try:
        del old
        gc.collect()
        assert replaced() is not None  # frozen: the collector never looks at it
        assert release_replaced(replaced)
        assert replaced() is None
        assert gc.get_freeze_count() > 0  # frozen again for the next full passes
    finally:
        gc.unfreeze()


@pytest.mark.parametrize("where", ["sidecar", "relay"])
def test_settling_the_heap_freezes_start_up_and_raises_the_young_threshold(where):
    """The sidecar and the relay settle their heaps with the one helper (`monitor.heap`),
    so their thresholds cannot drift apart."""
    from monitor import heap
    from monitor.capture.relay import main as relay_main
    from monitor.sidecar import process

    settle = process.settle_heap if where == "sidecar" else relay_main.settle_heap
    assert settle is heap.settle_heap
    saved = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    try:
        settle()
        assert gc.get_freeze_count() > 0  # start-up's objects: out of every collection
        assert gc.get_threshold() == (GEN0_THRESHOLD, 10, 10)  # older generations unchanged
    finally:
        gc.unfreeze()
        gc.set_threshold(*saved)


def test_deepest_cpu_layer_is_cloned_when_an_earlier_layer_is_on_a_gpu(monkeypatch):
    """A model split across devices: layer 0 on a GPU, the deepest layer on the CPU. The
    step then waits for the GPU copy on another thread, so the CPU output must be a copy,
    not the model's own buffer (which the next layer or step may overwrite)."""

    class _Event:
        def record(self) -> None:
            pass

    monkeypatch.setattr(torch.cuda, "Event", _Event)
    emitted = []
    assembler = StepAssembler(["layers.0", "layers.1"], PositionLedger(), emitted.append,
                              lambda reason: None, want_token_ids=False)  # fmt: skip
    context = ConversationContext(("c",), ("",), ("",))
    hidden = torch.ones(1, 2, 4)
    assembler._pending.state = _Pending(on_cuda=True)  # layer 0's copy is still in flight
    assembler.layer_output("layers.1", hidden, context)
    (step,) = emitted
    hidden.fill_(7.0)  # the model reuses its buffer
    assert torch.equal(step.layers["layers.1"], torch.ones(1, 2, 4))
    # all on the CPU: no copy (the step goes onto the ring before the hook returns)
    emitted.clear()
    assembler.layer_output("layers.1", hidden, context)
    assert emitted[0].layers["layers.1"] is hidden


def test_per_sequence_ids_end_after_end_conversation_in_the_middle_of_a_block():
    emitted = []
    ledger = PositionLedger()
    assembler = StepAssembler(["layers.0"], ledger, emitted.append, lambda reason: None,
                              want_token_ids=False)  # fmt: skip
    context = ConversationContext(("p",), ("assistant",), ("r",))  # 2 return sequences
    assembler.layer_output("layers.0", torch.zeros(2, 3, 4), context)
    assert emitted[0].tagging.conversation_ids == ("p/0", "p/1")
    assert ledger.forget("p") == {"p/0": 3, "p/1": 3}  # end_conversation("p") mid-block
    assembler.layer_output("layers.0", torch.zeros(2, 1, 4), context)  # the block goes on
    assert ledger.forget("p") == {"p/0": 1, "p/1": 1}  # ...and a later end ends them too


# --------------------------------------------------------------------------- config


def test_config_of_limits_scope_and_named_tokens(tmp_path):
    from monitor.sidecar.config import ConfigError, parse_config

    (tmp_path / "p.pack").write_text("x")
    (tmp_path / "alice.token").write_text("a-token\n")
    config = parse_config(
        {
            "packs": ["p.pack"],
            "limits": {"max_rule_state_bytes": 8 << 30, "max_streams": 2},
            "conversations": {"scope": "attribute", "attribute": "org"},
            "security": {"token_files": {"alice": "alice.token"}},
        },
        tmp_path,
        "cfg.yaml",
    )
    assert config.limits.max_rule_state_bytes == 8 << 30  # byte budgets may pass 2 GiB
    assert (config.limits.max_streams, config.limits.max_sequences_per_batch) == (2, 1024)
    assert (config.conversations.scope, config.conversations.attribute) == ("attribute", "org")
    assert config.security.token_files == (("alice", tmp_path / "alice.token"),)
    for bad, message in [
        ({"conversations": {"scope": "tenant"}}, "conversations.scope: expected one of"),
        ({"limits": {"max_streams": 0}}, "limits.max_streams: expected an integer"),
        ({"security": {"token_files": {"bad name": "alice.token"}}}, "client name 'bad name'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_config({"packs": ["p.pack"], **bad}, tmp_path, "cfg.yaml")


def test_a_wave_larger_than_its_senders_share_takes_from_the_largest_other_owner():
    """The documented exception to fair eviction: the wave's own conversations are kept."""
    table = ConversationTable(8)
    for i in range(3):
        table.add(("quiet", i), Conversation(i, 0, "", "quiet"))
    for i in range(5):
        table.add(("flood", i), Conversation(3 + i, 0, "", "flood"))
    wave = {("new", i) for i in range(7)}
    for key in sorted(wave):
        victim = table.victim("flood", wave)
        assert victim is not None
        table.pop(victim)
        table.add(key, Conversation(0, 0, "", "flood"))
    assert table.owners() == {"quiet": 1, "flood": 7}
