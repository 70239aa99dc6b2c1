"""The client's and the sidecar's conversation tables stay in step when a batch's slot
definitions are refused: a slot the client has redefined never goes on naming the
conversation that held it before (which would charge one conversation's steps to another
and let a batch past limits that its Sequence messages would not pass)."""

from __future__ import annotations

import pytest
import torch

from monitor.sidecar.columns import ConversationTable
from monitor.sidecar.config import Limits
from monitor.sidecar.validate import BatchRejected
from monitor.wire import encode_tensor, pb
from monitor.wire.columns import ColumnarEncoder
from tests.unit.test_sidecar_grouping import D_MODEL, HOOK, make_pipeline  # noqa: F401


def _batch(seq_no: int, conversation_id: str, position: int, model: str = "m", **extra):
    batch = pb.StepBatch(seq_no=seq_no, model=model)
    batch.sequences.append(
        pb.Sequence(conversation_id=conversation_id, rows=1, position=position, **extra)
    )
    batch.layers.append(
        pb.Layer(hook_point=HOOK, activations=encode_tensor(torch.ones(1, D_MODEL)))
    )
    return batch


def _kinds(outcome) -> list[str]:
    return [event.WhichOneof("event") for event in outcome.events]


def test_a_refused_definition_does_not_leave_the_old_conversation_in_its_slot(make_pipeline):  # noqa: F811
    pipeline = make_pipeline()
    table = ConversationTable(1)
    encoder = ColumnarEncoder(1)
    assert "ack" in _kinds(pipeline.process(encoder.encode(_batch(1, "a", 0)), table=table))
    # "b" takes slot 0 over from "a", with a request id past the limit: refused.
    long_request = {"request_id": "r" * 10_000}
    first = encoder.encode(_batch(2, "b", 0, **long_request))
    assert first.columns.define
    (event,) = pipeline.process(first, table=table).events
    assert event.error.reason == "too_long"
    # The client sends slot 0 alone now. As Sequence messages this batch is refused again;
    # as columns it must not be read as a step of "a".
    again = encoder.encode(_batch(3, "b", 1, **long_request))
    assert not again.columns.define
    (event,) = pipeline.process(again, table=table).events
    assert event.WhichOneof("event") == "error"
    assert event.error.field == "columns.slot[0]"
    assert pipeline.engine.tracked_conversations == 1  # "a" only, and it got no step 1


def test_a_batch_refused_before_its_definitions_still_applies_them(make_pipeline):  # noqa: F811
    pipeline = make_pipeline()
    table = ConversationTable(2)
    encoder = ColumnarEncoder(2)
    (event,) = pipeline.process(
        encoder.encode(_batch(1, "a", 0, model="m" * 10_000)), table=table
    ).events
    assert (event.error.reason, event.error.field) == ("too_long", "model")
    # The client has sent "a"'s definition and will not again: it must hold.
    assert "ack" in _kinds(pipeline.process(encoder.encode(_batch(2, "a", 1)), table=table))


def test_too_many_definitions_empty_every_slot_they_name():
    table = ConversationTable(4)
    table.define([pb.ConversationSlot(slot=0, conversation_id="a")], Limits())
    assert len(table) == 1
    many = [pb.ConversationSlot(slot=s, conversation_id=f"c{s}") for s in (0, 1, 9)]
    with pytest.raises(BatchRejected) as rejected:
        table.define(many, Limits(max_sequences_per_batch=2))
    assert rejected.value.field == "columns.define"
    assert len(table) == 0  # slot 0 no longer names "a"
