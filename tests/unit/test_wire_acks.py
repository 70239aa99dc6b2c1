"""The event format "acks": merging a group's acks, reading them back, and the negotiation
helpers on both sides."""

from __future__ import annotations

from monitor.wire import pb
from monitor.wire.acks import (
    ACKS,
    EVENT_FORMATS_HEADER,
    acked,
    ask_for_acks,
    asks_for_acks,
    coalesce_acks,
    offers_acks,
)


def _ack(seq_no: int, rows: int = 1, alerts: int = 0) -> pb.MonitorEvent:
    return pb.MonitorEvent(ack=pb.Ack(seq_no=seq_no, rows=rows, alerts=alerts))


def _alert(seq_no: int, rule: str) -> pb.MonitorEvent:
    return pb.MonitorEvent(alert=pb.Alert(seq_no=seq_no, rule=rule))


def _error(seq_no: int) -> pb.MonitorEvent:
    return pb.MonitorEvent(error=pb.BatchError(seq_no=seq_no, reason="bad_shape"))


def test_a_groups_acks_become_one_event_after_its_alerts_and_errors():
    events = [
        _ack(1, rows=4),
        _alert(2, "r1"),
        _alert(2, "r2"),
        _ack(2, rows=3, alerts=2),
        _error(3),
        _alert(4, "r1"),
        _ack(4, rows=2, alerts=1),
    ]
    merged = coalesce_acks(events)
    kinds = [event.WhichOneof("event") for event in merged]
    assert kinds == ["alert", "alert", "error", "alert", "acks"]
    # Alerts and errors keep their order; the acks keep theirs inside the one event.
    assert merged[:4] == [events[1], events[2], events[4], events[5]]
    assert list(merged[-1].acks.seq_no) == [1, 2, 4]
    assert list(merged[-1].acks.rows) == [4, 3, 2]
    assert list(merged[-1].acks.alerts) == [0, 2, 1]
    # Read back, it is the acks one per batch would have been.
    assert [a for e in merged for a in acked(e)] == [e.ack for e in events if e.HasField("ack")]


def test_every_alert_still_comes_before_the_event_that_acks_its_batch():
    events = []
    for seq_no in range(1, 9):
        events += [_alert(seq_no, "r")] * (seq_no % 3) + [_ack(seq_no, alerts=seq_no % 3)]
    merged = coalesce_acks(events)
    acked_at = {ack.seq_no: i for i, e in enumerate(merged) for ack in acked(e)}
    assert sorted(acked_at) == list(range(1, 9))
    for i, event in enumerate(merged):
        if event.HasField("alert"):
            assert i < acked_at[event.alert.seq_no]


def test_fewer_than_two_acks_are_left_as_they_are():
    alone = [_alert(1, "r"), _ack(1, alerts=1)]
    assert coalesce_acks(alone) == alone
    assert coalesce_acks([_error(5)]) == [_error(5)]
    assert coalesce_acks([]) == []


def test_acked_reads_both_forms_and_nothing_from_alerts_or_errors():
    assert [a.seq_no for a in acked(_ack(7, rows=2))] == [7]
    assert list(acked(_alert(7, "r"))) == [] and list(acked(_error(7))) == []
    # A short rows/alerts list (a faulty sidecar) still acks every seq_no, counts as 0.
    short = pb.MonitorEvent(acks=pb.Acks(seq_no=[3, 4, 5], rows=[1]))
    assert [(a.seq_no, a.rows, a.alerts) for a in acked(short)] == [(3, 1, 0), (4, 0, 0), (5, 0, 0)]


def test_negotiation_helpers():
    assert offers_acks(pb.StatusResponse(event_formats=[ACKS]))
    assert not offers_acks(pb.StatusResponse())  # an older sidecar: no event_formats
    metadata = ask_for_acks((("authorization", "Bearer x"),))
    assert metadata == (("authorization", "Bearer x"), (EVENT_FORMATS_HEADER, ACKS))
    assert asks_for_acks(metadata)
    assert asks_for_acks(((EVENT_FORMATS_HEADER, "future, acks"),))
    assert not asks_for_acks(((EVENT_FORMATS_HEADER, "future"),))
    assert not asks_for_acks((("authorization", "acks"),))
    assert not asks_for_acks(None) and not asks_for_acks(())
    # Binary metadata values are never taken for a request.
    assert not asks_for_acks(((EVENT_FORMATS_HEADER, b"acks"),))
