"""Turn ends through a running sidecar over gRPC: GetStatus lists the flag, a rule with
`at: turn_end` fires only at turn ends (a `turn_end` slice's last row, or an `end`), in both
sequence formats and through Evaluate, and a malformed `columns.turn_end` is a located
BatchError."""

from __future__ import annotations

import grpc
import pytest
import torch

from monitor.wire import encode_tensor, pb, pb_grpc
from monitor.wire.columns import ColumnarEncoder
from tests.conftest import build_pack_with_cli

D_MODEL = 32
HOOK = "layers.1"


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory):
    from monitor.fixtures import start_sidecar

    workdir = tmp_path_factory.mktemp("turn-ends")
    pack = build_pack_with_cli(workdir, d_in=D_MODEL, d_sae=64, hook_layer=1, features=[1, 2])
    rules = workdir / "rules.yaml"
    # Conditions that always hold: a turn-end rule fires at every turn end, and nowhere else.
    rules.write_text(
        "features: {one: bars/1}\n"
        "rules:\n"
        "  - rule: turn\n"
        "    severity: info\n"
        "    condition: rolling_mean(one, 512) > -1e30\n"
        "    at: turn_end\n"
        "  - rule: user_turn\n"
        "    severity: info\n"
        "    condition: rolling_mean(one, 512) > -1e30\n"
        "    window_roles: [user]\n"
        "    roles: [user]\n"
        "    at: turn_end\n"
    )
    process = start_sidecar({"packs": [str(pack)], "rules": [str(rules)]}, workdir)
    yield process
    process.stop()


def _batch(seq_no: int, *sequences: pb.Sequence) -> pb.StepBatch:
    rows = sum(sequence.rows for sequence in sequences)
    batch = pb.StepBatch(seq_no=seq_no, model="m", sequences=list(sequences))
    batch.layers.append(
        pb.Layer(hook_point=HOOK, activations=encode_tensor(torch.randn(rows, D_MODEL)))
    )
    return batch


def _conversation(cid: str) -> list[pb.StepBatch]:
    """A 5-token user prompt (turn end at 4), a 3-token answer by decode steps ending with
    `end` alone (turn end at 7), and beside it a conversation without any flag."""
    batches = [
        _batch(
            1,
            pb.Sequence(conversation_id=cid, rows=5, position=0, role="user", turn_end=True),
            pb.Sequence(conversation_id=f"{cid}-plain", rows=4, position=0, role="user"),
        )
    ]
    for t in range(3):
        batches.append(
            _batch(
                2 + t,
                pb.Sequence(
                    conversation_id=cid, rows=1, position=5 + t, role="assistant", end=t == 2
                ),
                pb.Sequence(conversation_id=f"{cid}-plain", rows=1, position=4 + t, role="user"),
            )
        )
    return batches


def _alerts(events) -> list[tuple[str, str, int]]:
    return sorted(
        (e.alert.rule, e.alert.conversation_id, e.alert.position)
        for e in events
        if e.HasField("alert")
    )


def _stream(target: str, batches: list[pb.StepBatch]) -> list[pb.MonitorEvent]:
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.SafetyMonitorStub(channel)
        return list(stub.Monitor(iter(batches), timeout=30))


def _columnar(batches: list[pb.StepBatch]) -> list[pb.StepBatch]:
    """The batches in the columnar format, `columns.turn_end` from their sequences."""
    encoder, sent = ColumnarEncoder(8), []
    for batch in batches:
        turn_ends = [sequence.turn_end for sequence in batch.sequences]
        copy = pb.StepBatch()
        copy.CopyFrom(batch)
        copy = encoder.encode(copy)
        assert copy.HasField("columns")
        del copy.columns.turn_end[:]
        if any(turn_ends):
            copy.columns.turn_end.extend(turn_ends)
        sent.append(copy)
    return sent


def test_status_lists_the_turn_end_flag(sidecar):
    with grpc.insecure_channel(sidecar.target) as channel:
        status = pb_grpc.SafetyMonitorStub(channel).GetStatus(pb.StatusRequest(), timeout=10)
    assert list(status.sequence_flags) == ["turn_end"]


@pytest.mark.parametrize("format_", ["sequences", "columns"])
def test_turn_end_rules_fire_only_at_turn_ends(sidecar, format_):
    cid = f"conv-{format_}"
    batches = _conversation(cid)
    if format_ == "columns":
        batches = _columnar(batches)
    events = _stream(sidecar.target, batches)
    assert not [e for e in events if e.HasField("error")]
    assert _alerts(events) == [
        ("turn", cid, 4),  # the prompt's last token (turn_end)
        ("turn", cid, 7),  # the answer's last token (end alone)
        ("user_turn", cid, 4),  # roles: [user] leaves the answer's turn end out
    ]


def test_evaluate_checks_turn_end_rules_at_turn_ends(sidecar):
    batch = _batch(
        1,
        pb.Sequence(conversation_id="e", rows=3, position=0, role="user", turn_end=True),
        pb.Sequence(conversation_id="f", rows=2, position=0, role="user"),
        pb.Sequence(conversation_id="g", rows=2, position=0, role="assistant", end=True),
    )
    with grpc.insecure_channel(sidecar.target) as channel:
        response = pb_grpc.SafetyMonitorStub(channel).Evaluate(
            pb.EvaluateRequest(batch=batch), timeout=30
        )
    assert not response.HasField("error")
    alerts = sorted((a.rule, a.conversation_id, a.position) for a in response.alerts)
    assert alerts == [("turn", "e", 2), ("turn", "g", 1), ("user_turn", "e", 2)]


def test_malformed_turn_end_columns_are_located_errors_and_the_stream_goes_on(sidecar):
    batches = _columnar(_conversation("bad"))
    del batches[0].columns.turn_end[:]
    batches[0].columns.turn_end.extend([True])  # one flag for two sequences
    events = _stream(sidecar.target, batches[:1] + _columnar(_conversation("after")))
    errors = [e.error for e in events if e.HasField("error")]
    assert [(e.seq_no, e.reason, e.field) for e in errors] == [
        (1, "bad_columns", "columns.turn_end")
    ]
    assert "columns.turn_end: 1 entries for 2 sequences (or none)" in errors[0].message
    assert ("turn", "after", 7) in _alerts(events)


# A server learns that an answer finished after its last token: the vLLM plugin's finish
# message and the capture client's `end_conversation` are sequences without rows, with `end`
# (or `turn_end`), no role and no request id.
ANSWER_RULES = """
features: {one: bars/1}
rules:
  - rule: answer
    severity: info
    condition: rolling_mean(one, 512) > -1e30
    roles: [assistant]
    at: turn_end
    actions: [alert, audit]
"""


def _finish(cid: str, position: int, tenant: str, *, end: bool = True) -> pb.Sequence:
    return pb.Sequence(
        conversation_id=cid,
        rows=0,
        position=position,
        end=end,
        turn_end=not end,
        attributes={"tenant": tenant},
    )


def _said(cid: str, position: int, texts: list[str], tenant: str, role="assistant", **flags):
    return pb.Sequence(
        conversation_id=cid,
        rows=len(texts),
        position=position,
        role=role,
        request_id=f"req-{cid}",
        tokens=texts,
        attributes={"tenant": tenant},
        **flags,
    )


@pytest.mark.parametrize("format_", ["sequences", "columns"])
def test_turn_ends_without_rows_fire_at_the_last_token_and_are_audited(
    tmp_path, sidecar_factory, format_
):
    """An answer by decode steps, then its end without rows: the turn-end rule fires at the
    answer's last token, under the request of its rows, in the finish message's step; the
    audit trail stores it under the conversation's own scope (the finish message starts at
    the row of another tenant's sequence) with no feature values (no row of that step holds
    the token). A turn end already on the last row is not checked again by the end after
    it; a `turn_end` without rows mid-conversation is accepted and checked."""
    from monitor.audit import open_store

    pack = build_pack_with_cli(tmp_path, d_in=D_MODEL, d_sae=64, hook_layer=1, features=[1, 2])
    rules = tmp_path / "rules.yaml"
    rules.write_text(ANSWER_RULES)
    db = tmp_path / "audit.db"
    sidecar = sidecar_factory(
        {
            "packs": [str(pack)],
            "rules": [str(rules)],
            "audit": {"url": f"sqlite:///{db}"},
            "conversations": {"scope": "attribute", "attribute": "tenant"},
        }
    )
    a, b, c = (f"{name}-{format_}" for name in "abc")
    batches = [
        _batch(
            1,
            _said(a, 0, ["p0 ", "p1 ", "p2 "], "t1", role="user", turn_end=True),
            _said(c, 0, ["c0 ", "c1 "], "t1"),
        ),
        _batch(2, _said(a, 3, ["x3 "], "t1"), _finish(c, 2, "t1", end=False)),
        _batch(3, _said(a, 4, ["x4 "], "t1"), _said(c, 2, ["c2 "], "t1", end=True)),
        _batch(4, _said(a, 5, ["x5"], "t1")),
        # a's finish message first: it starts at row 0, which is b's (another tenant's).
        _batch(5, _finish(a, 6, "t1"), _said(b, 0, ["y0 ", "y1"], "t2", turn_end=True)),
        _batch(6, _finish(b, 2, "t2")),
    ]
    if format_ == "columns":
        batches = _columnar(batches)
    events = _stream(sidecar.target, batches)
    assert not [e for e in events if e.HasField("error")]
    alerts = sorted(
        (e.alert.seq_no, e.alert.conversation_id, e.alert.position, e.alert.request_id)
        for e in events
        if e.HasField("alert")
    )
    assert alerts == [
        (2, c, 1, f"req-{c}"),  # a turn end without rows mid-conversation
        (3, c, 2, f"req-{c}"),  # the end on c's last row
        (5, a, 5, f"req-{a}"),  # a's answer: its last token, in the finish message's step
        (5, b, 1, f"req-{b}"),  # b's last row is a turn end; its end without rows adds none
    ]
    store = open_store(f"sqlite:///{db}")
    try:
        record = store.get_conversation(f"t1/{a}")
        assert record is not None
        assert "".join(t.text or "" for t in record.tokens) == "p0 p1 p2 x3 x4 x5"
        assert [(x.rule, x.position, dict(x.feature_values)) for x in record.alerts] == [
            ("answer", 5, {})
        ]
        assert store.get_conversation(f"t2/{a}") is None
        other = store.get_conversation(f"t2/{b}")
        assert other is not None
        assert [(x.position, list(x.feature_values)) for x in other.alerts] == [(1, ["bars/1"])]
    finally:
        store.close()
