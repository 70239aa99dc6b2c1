"""The event format "acks": several batches acknowledged in one MonitorEvent.

Under load the sidecar processes the batches that waited on a stream as one group; without
this format it then writes one Ack event per batch, each a separate gRPC message (and, on
loopback, often a separate kernel send). A client that asks for "acks" gets the group's acks
as one `Acks` event instead.

Negotiation, per Monitor stream: the sidecar lists the format in GetStatus
(`StatusResponse.event_formats`); a client that reads it asks for it with the call metadata
`EVENT_FORMATS_HEADER`. An old client never asks, so it gets one Ack per batch; a new client
facing an old sidecar sees no `event_formats` and does not ask (an old sidecar would ignore
the metadata anyway). Alerts and batch errors keep their own events and their order; only
acks move, and only later, to the end of the group's events, so "a batch's alerts come
before its ack" holds as before. Imports no torch (the capture relay uses it).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from monitor.wire.safety_monitor.v1 import monitor_pb2 as pb

ACKS = "acks"
EVENT_FORMATS = (ACKS,)
# Call metadata (keys are lower case) by which a client asks for event formats on a stream.
EVENT_FORMATS_HEADER = "safety-monitor-event-formats"


def offers_acks(status: pb.StatusResponse) -> bool:
    """Whether a sidecar's GetStatus answer says it can send `Acks` events."""
    return ACKS in status.event_formats


def ask_for_acks(metadata: Iterable[tuple[str, str]] = ()) -> tuple[tuple[str, str], ...]:
    """`metadata` for a Monitor call, plus the request for `Acks` events."""
    return (*metadata, (EVENT_FORMATS_HEADER, ACKS))


def asks_for_acks(metadata: Iterable[tuple[str, str | bytes]] | None) -> bool:
    """Whether a Monitor call's metadata asks for `Acks` events (sidecar side)."""
    return any(
        key == EVENT_FORMATS_HEADER
        and isinstance(value, str)
        and ACKS in (part.strip() for part in value.split(","))
        for key, value in metadata or ()
    )


def coalesce_acks(events: Sequence[pb.MonitorEvent]) -> list[pb.MonitorEvent]:
    """A group's events with its acks merged into one `Acks` event at the end: alerts and
    errors keep their order, and every ack only moves later, never before an event that
    preceded it. Fewer than two acks: the events unchanged (one Ack stays an Ack)."""
    acks = [event.ack for event in events if event.HasField("ack")]
    if len(acks) < 2:
        return list(events)
    merged = pb.Acks(
        seq_no=[ack.seq_no for ack in acks],
        rows=[ack.rows for ack in acks],
        alerts=[ack.alerts for ack in acks],
    )
    others = [event for event in events if not event.HasField("ack")]
    others.append(pb.MonitorEvent(acks=merged))
    return others


def acked(event: pb.MonitorEvent) -> Iterator[pb.Ack]:
    """The acks an event carries, in order: one for an `Ack`, each of an `Acks`, none for an
    alert or an error (client side)."""
    kind = event.WhichOneof("event")
    if kind == "ack":
        yield event.ack
    elif kind == "acks":
        acks = event.acks
        # A short rows or alerts list (a faulty sidecar) still acks every seq_no: the
        # batch was processed, only its counts are missing.
        for index, seq_no in enumerate(acks.seq_no):
            rows = acks.rows[index] if index < len(acks.rows) else 0
            alerts = acks.alerts[index] if index < len(acks.alerts) else 0
            yield pb.Ack(seq_no=seq_no, rows=rows, alerts=alerts)
