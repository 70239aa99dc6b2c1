"""Steps that wait together are evaluated as one: the events on the stream must be exactly
those of processing the steps one at a time, whatever the grouping."""

from __future__ import annotations

import random

import pytest
import torch

from monitor.features.build import build_pack_from_sae, load_sae
from monitor.fixtures import write_layer_sae
from monitor.outputs.metrics import SidecarMetrics
from monitor.sidecar.config import Limits
from monitor.sidecar.pipeline import Pipeline
from monitor.sidecar.process import load_ruleset
from monitor.wire import encode_tensor, pb

D_MODEL, HOOK = 16, "layers.3"


@pytest.fixture(scope="module")
def make_pipeline(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("grouping")
    sae = load_sae(write_layer_sae(workdir / "sae", D_MODEL, 64, 3, seed=5))
    pack = build_pack_from_sae(sae, [1, 2, 3, 4], name="p")
    # Thresholds at the features' medians, so rules hold about half the time.
    sample = pack.encode(
        HOOK, torch.randn(2000, D_MODEL, generator=torch.Generator().manual_seed(0))
    )
    median = [float(sample[:, i].median()) for i in range(4)]
    rules = workdir / "rules.yaml"
    rules.write_text(
        "features: {a: p/1, b: p/2, c: p/3, d: p/4}\n"
        "rules:\n"
        f"  - {{rule: instant, severity: info, condition: 'a > {median[0]}'}}\n"
        f"  - {{rule: held, severity: warning, condition: 'b > {median[1] / 2}', for: 3 tokens}}\n"
        f"  - {{rule: mean, severity: info, condition: 'rolling_mean(c, 4) > {median[2]}',"
        " cooldown: 3 tokens}\n"
        f"  - {{rule: smooth, severity: info, condition: 'ewma(d, 2) > {median[3]}',"
        " roles: [assistant]}\n"
        f"  - {{rule: peak, severity: critical, condition: 'cummax(rolling_max(a, 3)) > "
        f"{2 * median[0]}', scope: request}}\n"
        f"  - {{rule: rise, severity: info, condition: 'delta(b, 2) > {median[1]}'}}\n"
        f"  - {{rule: turn, severity: info, condition: 'rolling_mean(c, 4) > {median[2]}',"
        " at: turn_end}\n"
    )
    ruleset = load_ruleset([rules], [pack])

    def make(max_conversations: int = 100) -> Pipeline:
        limits = Limits(max_rows_per_batch=64, max_conversations=max_conversations)
        return Pipeline([pack], ruleset, SidecarMetrics(), limits)

    return make


def _stream(seed: int, steps: int = 120, one_row: float = 0.8) -> list[pb.StepBatch]:
    """Prefills, decode steps, chunks, gaps, new requests, ends, turn ends, role changes,
    token text, and a bad batch now and then, over a few conversations. `one_row`: how
    often a conversation has one row in a step (decode steps, never merged with each other, are
    the steps where all have one)."""
    rng = random.Random(seed)
    # Turn ends drawn apart, so the streams are the same as before turn ends existed.
    turns = random.Random(1000 + seed)
    generator = torch.Generator().manual_seed(seed)
    position = {f"c{i}": 0 for i in range(5)}
    request = dict.fromkeys(position, "r0")
    batches = []
    for seq_no in range(1, steps + 1):
        batch = pb.StepBatch(seq_no=seq_no, model="m")
        rows = 0
        for cid in rng.sample(sorted(position), rng.randint(1, 5)):
            n = 1 if rng.random() < one_row else rng.randint(0, 6)
            if rng.random() < 0.04:
                position[cid] += rng.randint(1, 5)  # a dropped step: a gap
            if rng.random() < 0.05:
                request[cid] = f"r{seq_no}"
            end = rng.random() < 0.03
            texts = [f"t{position[cid] + i}" for i in range(n)] if rng.random() < 0.5 else []
            batch.sequences.append(
                pb.Sequence(
                    conversation_id=cid,
                    rows=n,
                    position=position[cid],
                    role="user" if rng.random() < 0.1 else "assistant",
                    request_id=request[cid],
                    end=end,
                    tokens=texts,
                    turn_end=turns.random() < 0.2,
                )
            )
            position[cid] = 0 if end else position[cid] + n
            rows += n
        activations = torch.randn(rows, D_MODEL, generator=generator)
        if rng.random() < 0.03 and rows:
            activations[0, 0] = float("nan")  # rejected: touches no state
        batch.layers.append(pb.Layer(hook_point=HOOK, activations=encode_tensor(activations)))
        batches.append(batch)
    return batches


def _events(outcomes) -> list[bytes]:
    return [event.SerializeToString(deterministic=True) for o in outcomes for event in o.events]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("one_row", [0.8, 0.25])
def test_grouped_steps_give_exactly_the_events_of_one_at_a_time(make_pipeline, seed, one_row):
    batches = _stream(seed, one_row=one_row)
    alone = make_pipeline()
    expected = _events(alone.process(batch) for batch in batches)

    grouped = make_pipeline()
    rng, outcomes, start = random.Random(100 + seed), [], 0
    while start < len(batches):
        size = rng.randint(1, 10)
        outcomes += grouped.process_many(batches[start : start + size])
        start += size
    assert _events(outcomes) == expected
    # The comparison means something: rules fired, batches were rejected, steps grouped.
    kinds = [pb.MonitorEvent.FromString(e).WhichOneof("event") for e in expected]
    assert kinds.count("alert") > 20 and "error" in kinds
    rules = [pb.MonitorEvent.FromString(e).alert.rule for e in expected]
    assert rules.count("turn") > 3  # turn ends were checked, grouped or not
    # Decode steps do not merge with each other (`_decode_step`): the stream with fewer of
    # them checks that steps merged.
    assert one_row > 0.5 or grouped.metrics.batches_grouped._value.get() > 20
    assert grouped.engine.tracked_conversations == alone.engine.tracked_conversations


def test_steps_that_cannot_be_merged_are_not(make_pipeline):
    """A gap, a new request or an ended conversation each start a new group."""
    from monitor.sidecar.grouping import can_join

    pipeline = make_pipeline()

    def step(seq_no, position, request="r", end=False, rows=1):
        batch = pb.StepBatch(seq_no=seq_no, model="m")
        batch.sequences.append(
            pb.Sequence(
                conversation_id="c", rows=rows, position=position, request_id=request, end=end
            )
        )
        activations = encode_tensor(torch.randn(rows, D_MODEL))
        batch.layers.append(pb.Layer(hook_point=HOOK, activations=activations))
        return pipeline.validate(batch)

    first = [step(1, 0, rows=4)]
    assert can_join(first, step(2, 4), max_rows=64, room=10)
    assert not can_join(first, step(2, 5), max_rows=64, room=10)  # a gap
    assert not can_join(first, step(2, 4, request="r2"), max_rows=64, room=10)
    assert not can_join([step(1, 0, end=True)], step(2, 1), max_rows=64, room=10)
    assert not can_join(first, step(2, 4), max_rows=4, room=10)  # over the row limit
    assert not can_join(first, step(2, 4), max_rows=64, room=0)  # the engine is full


def test_turn_ends_without_rows_group_as_one_at_a_time(make_pipeline):
    """A finish message (a slice without rows marking `turn_end` or `end`, no request id)
    fires `at: turn_end` rules at the conversation's last token, in the finish message's own
    step, grouped or not; it never joins a group holding its conversation's rows (the merged
    slice would end the turn at that row, in the member before)."""
    from monitor.sidecar.grouping import can_join

    pipeline = make_pipeline()
    generator = torch.Generator().manual_seed(7)

    def step(seq_no, sequences):
        batch = pb.StepBatch(seq_no=seq_no, model="m")
        batch.sequences.extend(sequences)
        rows = sum(sequence.rows for sequence in sequences)
        values = torch.randn(rows, D_MODEL, generator=generator)
        batch.layers.append(pb.Layer(hook_point=HOOK, activations=encode_tensor(values)))
        return batch

    def answer(cid, position, rows):
        return pb.Sequence(
            conversation_id=cid, rows=rows, position=position, role="assistant", request_id="r"
        )

    def finish(cid, position, end):
        return pb.Sequence(
            conversation_id=cid, rows=0, position=position, end=end, turn_end=not end
        )

    names = [f"d{i}" for i in range(12)]
    batches = [step(1, [answer(cid, 0, 3) for cid in names])]
    for seq_no in range(2, 8):  # a decode step of "c", then finish messages of two d's
        batches.append(step(seq_no, [answer("c", seq_no - 2, 1)]))
        done = names[2 * (seq_no - 2) : 2 * (seq_no - 1)]
        batches.append(step(100 + seq_no, [finish(cid, 3, cid < "d6") for cid in done]))
    alone = make_pipeline()
    expected = _events(alone.process(batch) for batch in batches)
    grouped = make_pipeline()
    outcomes = grouped.process_many(batches[:1])
    outcomes += grouped.process_many(batches[1:])
    assert _events(outcomes) == expected
    assert grouped.metrics.batches_grouped._value.get() == len(batches) - 1
    events = [pb.MonitorEvent.FromString(e) for e in expected]
    late = [e.alert for e in events if e.alert.rule == "turn" and e.alert.seq_no > 100]
    assert late and all(a.position == 2 and a.request_id == "r" for a in late)
    # The finish message of a conversation whose rows are in the group waits for the next.
    first = [pipeline.validate(step(1, [answer("c", 0, 4)]))]
    assert not can_join(first, pipeline.validate(step(2, [finish("c", 4, False)])), 64, 10)
    assert can_join(first, pipeline.validate(step(2, [finish("d", 3, False)])), 64, 10)


@pytest.mark.parametrize("seed", range(4))
def test_grouping_at_the_conversation_cap_still_matches_one_at_a_time(make_pipeline, seed):
    """With few conversation slots the engine evicts; a merged wave would evict in another
    order (or exceed the cap and fail), so steps that would need eviction are not grouped.
    (A step with more conversations than the cap fails alone too: an internal BatchError.)"""
    batches = _stream(seed, steps=80)
    alone = make_pipeline(max_conversations=3)
    expected = _events(alone.process(batch) for batch in batches)
    grouped = make_pipeline(max_conversations=3)
    outcomes = []
    for start in range(0, len(batches), 6):
        outcomes += grouped.process_many(batches[start : start + 6])
    assert _events(outcomes) == expected
    kinds = [pb.MonitorEvent.FromString(e).WhichOneof("event") for e in expected]
    assert kinds.count("alert") > 5 and alone.metrics.conversations_evicted._value.get() > 0


def test_decode_steps_are_evaluated_one_at_a_time(make_pipeline):
    """Decode steps that wait together (one row per conversation) are not merged: the rules
    engine evaluates each with its one-token kernel, cheaper than the merged group's general
    path (issue 15's send-to-ack tail). Steps with more rows per conversation still merge.
    The events are those of one step at a time either way."""
    generator = torch.Generator().manual_seed(7)

    def steps(rows: int, count: int = 6) -> list[pb.StepBatch]:
        batches = []
        for seq_no in range(1, count + 1):
            batch = pb.StepBatch(seq_no=seq_no, model="m")
            for c in range(3):
                batch.sequences.append(
                    pb.Sequence(
                        conversation_id=f"c{c}",
                        rows=rows,
                        position=(seq_no - 1) * rows,
                        request_id="r",
                        role="assistant",
                    )
                )
            values = torch.randn(3 * rows, D_MODEL, generator=generator)
            batch.layers.append(pb.Layer(hook_point=HOOK, activations=encode_tensor(values)))
            batches.append(batch)
        return batches

    for rows, evaluations in ((1, [3] * 6), (2, [36])):
        batches = steps(rows)
        alone = make_pipeline()
        expected = _events(alone.process(batch) for batch in batches)
        grouped = make_pipeline()
        seen: list[int] = []
        evaluate = grouped.engine.evaluate

        def spy(features, slices, evaluate=evaluate, seen=seen, **kwargs):
            seen.append(sum(sl.rows for sl in slices))
            return evaluate(features, slices, **kwargs)

        grouped.engine.evaluate = spy
        assert _events(grouped.process_many(batches)) == expected
        assert seen == evaluations
    kinds = [pb.MonitorEvent.FromString(e).WhichOneof("event") for e in expected]
    assert kinds.count("alert") > 3
