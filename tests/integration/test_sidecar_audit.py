"""The audit trail and Alertmanager through a real sidecar process.

Alerts are acknowledged only once their audit record is durable: a kill -9 loses none of
them. Token text is redacted before it is written. Fired rules reach Alertmanager.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import threading
import time
from urllib.parse import quote

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from monitor.audit import open_store
from monitor.audit.store import AuditQuery
from monitor.fixtures import wait_for
from monitor.sidecar.config import parse_config
from monitor.sidecar.process import SidecarThread
from monitor.wire import encode_tensor, pb, pb_grpc
from tests.conftest import build_pack_with_cli
from tests.integration.test_alertmanager import Receiver

D_MODEL = 16
RULES = """
features: {one: bars/1}
rules:
  - rule: always-audited
    category: misuse
    severity: critical
    condition: one > -1000
    actions: [alert, audit]
    labels: {team: trust-and-safety}
    output: "audited at {position} of {conversation_id}"
"""


def _config(tmp_path, **extra) -> dict:
    pack = build_pack_with_cli(tmp_path, d_in=D_MODEL, d_sae=32, hook_layer=0, features=[1])
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    return {"packs": [str(pack)], "rules": [str(rules)], **extra}


def _batch(seq_no: int, conversation: str, position: int, texts: list[str], end=False):
    batch = pb.StepBatch(seq_no=seq_no, model="tiny")
    rows = len(texts)
    batch.layers.append(
        pb.Layer(hook_point="layers.0", activations=encode_tensor(torch.randn(rows, D_MODEL)))
    )
    batch.sequences.append(
        pb.Sequence(
            conversation_id=conversation, rows=rows, position=position, tokens=texts, end=end
        )
    )
    return batch


def test_acknowledged_alerts_survive_kill_9_and_text_is_redacted(tmp_path, sidecar_factory):
    db = tmp_path / "audit.db"
    sidecar = sidecar_factory(_config(tmp_path, audit={"url": f"sqlite:///{db}"}))
    secret = "alice.smith@example.com"
    acked_alerts = []
    batches = [
        _batch(i + 1, f"conv-{i}", 0, ["mail ", "me ", "at ", secret, " now"], end=True)
        for i in range(200)
    ]
    with grpc.insecure_channel(sidecar.target) as channel:
        stream = pb_grpc.SafetyMonitorStub(channel).Monitor(iter(batches), timeout=60)
        pending = []
        try:
            for event in stream:
                if event.HasField("alert"):
                    pending.append(event.alert)
                elif event.HasField("ack"):
                    acked_alerts += [a for a in pending if a.seq_no == event.ack.seq_no]
                    pending = []
                    if event.ack.seq_no == 60:
                        sidecar.process.send_signal(signal.SIGKILL)
        except grpc.RpcError:
            pass  # the stream dies with the process
    sidecar.process.wait(10)
    assert len(acked_alerts) >= 60

    store = open_store(f"sqlite:///{db}")
    try:
        stored = {
            (a.conversation_id, a.rule, a.position)
            for a in store.list_alerts(AuditQuery(limit=None))
        }
        for alert in acked_alerts:
            assert (alert.conversation_id, alert.rule, alert.position) in stored
        record = store.get_conversation("conv-0")
        assert record is not None
        text = "".join(t.text or "" for t in record.tokens)
        assert secret not in text and "mail" in text
        assert record.alerts[0].rule == "always-audited"
        assert record.alerts[0].rule_set_hash
        assert "bars/1" in record.tokens[0].features
    finally:
        store.close()
    for path in tmp_path.glob("audit.db*"):
        assert secret.encode() not in path.read_bytes(), path


def test_fired_rules_reach_alertmanager(tmp_path, sidecar_factory):
    receiver = Receiver()
    try:
        sidecar = sidecar_factory(
            _config(
                tmp_path,
                alertmanager={"url": receiver.url, "audit_base_url": "https://review.local/c"},
            )
        )
        with grpc.insecure_channel(sidecar.target) as channel:
            events = list(
                pb_grpc.SafetyMonitorStub(channel).Monitor(
                    iter([_batch(1, "am-conv", 0, ["a", "b"])]), timeout=30
                )
            )
        assert [e.WhichOneof("event") for e in events] == ["alert", "ack"]
        wait_for(lambda: receiver.alerts())
        sent = receiver.alerts()[0]
        assert sent["labels"]["alertname"] == "always-audited"
        assert sent["labels"]["severity"] == "critical"
        assert sent["labels"]["category"] == "misuse"
        assert sent["labels"]["team"] == "trust-and-safety"
        assert sent["labels"]["model"] == "tiny"
        assert "am-conv" not in sent["labels"].values()  # ids are annotations, not labels
        assert sent["annotations"]["conversation_id"] == "am-conv"
        assert sent["annotations"]["summary"] == "audited at 0 of am-conv"
        # The receiver records the request before it answers; the sidecar counts the send
        # once the answer is back, a moment later.
        wait_for(
            lambda: sidecar.metric("safety_monitor_alertmanager_sends_total", result="ok") >= 1
        )
    finally:
        receiver.server.shutdown()


def test_alertmanager_gets_the_stored_redacted_id_not_the_raw_one(tmp_path, sidecar_factory):
    """An id with personal data goes to Alertmanager (annotation, review link, summary) as the
    audit store keeps it, so the receiver never sees the address and the link opens the
    stored conversation."""
    receiver = Receiver()
    db = tmp_path / "audit.db"
    secret = "bob.jones@example.com"
    raw_id = f"conv:{secret}:7"
    try:
        sidecar = sidecar_factory(
            _config(
                tmp_path,
                audit={"url": f"sqlite:///{db}"},
                alertmanager={"url": receiver.url, "audit_base_url": "https://review.local/c"},
            )
        )
        with grpc.insecure_channel(sidecar.target) as channel:
            events = list(
                pb_grpc.SafetyMonitorStub(channel).Monitor(
                    iter([_batch(1, raw_id, 0, ["a", "b"])]), timeout=30
                )
            )
        assert [e.WhichOneof("event") for e in events] == ["alert", "ack"]
        wait_for(lambda: receiver.alerts())
        sent = receiver.alerts()[0]
    finally:
        receiver.server.shutdown()
    store = open_store(f"sqlite:///{db}")
    try:
        stored_ids = {a.conversation_id for a in store.list_alerts(AuditQuery(limit=None))}
    finally:
        store.close()
    assert len(stored_ids) == 1
    stored_id = stored_ids.pop()
    assert stored_id.startswith("conv:[EMAIL]:7#")
    notes = sent["annotations"]
    assert notes["conversation_id"] == stored_id
    assert notes["audit_url"] == "https://review.local/c/" + quote(stored_id, safe="")
    assert notes["summary"] == "audited at 0 of conv:[EMAIL]:7"
    assert secret not in json.dumps(sent)
    assert "bob.jones" not in json.dumps(sent)


def test_one_client_cannot_end_or_overwrite_another_clients_audited_conversation(
    tmp_path, sidecar_factory
):
    """Rule state is scoped by client, and so is the audit trail: mallory sending the same
    conversation id as alice gets a record of her own; alice's stored text stays hers."""
    tokens = {"alice": "alice-token-0123456789", "mallory": "mallory-token-0123456789"}
    for name, token in tokens.items():
        (tmp_path / f"{name}.token").write_text(token)
    db = tmp_path / "audit.db"
    receiver = Receiver()
    try:
        sidecar = sidecar_factory(
            _config(
                tmp_path,
                audit={"url": f"sqlite:///{db}"},
                alertmanager={"url": receiver.url},
                security={"token_files": {n: str(tmp_path / f"{n}.token") for n in tokens}},
            )
        )
        sent = {"alice": ["alice ", "wrote ", "this"], "mallory": ["mallory ", "was ", "here"]}
        with grpc.insecure_channel(sidecar.target) as channel:
            stub = pb_grpc.SafetyMonitorStub(channel)
            for name in ("alice", "mallory"):  # alice's conversation ends first
                metadata = [("authorization", f"Bearer {tokens[name]}")]
                batches = [_batch(1, "shared-id", 0, sent[name], end=True)]
                events = list(stub.Monitor(iter(batches), metadata=metadata, timeout=30))
                alerts = [e.alert.conversation_id for e in events if e.HasField("alert")]
                assert alerts == ["shared-id"]  # the stream carries the id as sent
        # Both firings have one label set: one Alertmanager alert, its annotations the
        # latest firing's (re-sent only after resend_interval), so at least one is seen.
        wait_for(lambda: receiver.alerts())
        alerted = {a["annotations"]["conversation_id"] for a in receiver.alerts()}
    finally:
        receiver.server.shutdown()
    store = open_store(f"sqlite:///{db}")
    try:
        assert store.get_conversation("shared-id") is None
        for name in ("alice", "mallory"):
            record = store.get_conversation(f"{name}/shared-id")
            assert record is not None, name
            assert "".join(t.text or "" for t in record.tokens) == "".join(sent[name])
            assert {a.conversation_id for a in record.alerts} == {f"{name}/shared-id"}
    finally:
        store.close()
    assert alerted and alerted <= {"alice/shared-id", "mallory/shared-id"}


def test_audited_ids_of_different_scopes_never_coincide():
    from monitor.sidecar.firings import audited_conversation_id

    assert audited_conversation_id("", "c") == "c"
    assert audited_conversation_id("alice", "c") == "alice/c"
    # "a/b" + "c" and "a" + "b/c" would both be "a/b/c" without the encoding.
    assert audited_conversation_id("a/b", "c") == "a%2Fb/c"
    assert audited_conversation_id("a", "b/c") == "a/b/c"
    assert audited_conversation_id("a%2Fb", "c") == "a%252Fb/c"


def _audit_health(target: str) -> int:
    """The audit health status; SERVICE_UNKNOWN before the sidecar's first check of the store."""
    with grpc.insecure_channel(target) as channel:
        request = health_pb2.HealthCheckRequest(service="safety_monitor.audit")
        try:
            return health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
            return health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


def test_store_down_at_start_withholds_alerts_then_recovers(tmp_path, sidecar_factory):
    from monitor.fixtures import free_port
    from tests.pg_server import start_pg_server

    port = free_port()
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    sidecar = sidecar_factory(
        _config(
            tmp_path,
            # A generous write timeout: once the store is back, a commit on a loaded CI
            # machine may take a while; while it is known down, nothing waits for it.
            audit={"url": url, "write_timeout_seconds": 5.0, "on_backpressure": "drop"},
        )
    )
    deadline = time.monotonic() + 20
    while _audit_health(sidecar.target) != health_pb2.HealthCheckResponse.NOT_SERVING:
        assert time.monotonic() < deadline, "audit health never went NOT_SERVING"
        time.sleep(0.2)
    with grpc.insecure_channel(sidecar.target) as channel:
        events = list(
            pb_grpc.SafetyMonitorStub(channel).Monitor(
                iter([_batch(1, "down", 0, ["x"])]), timeout=30
            )
        )
    # No durable record: the alert is withheld and the batch says so.
    assert [e.WhichOneof("event") for e in events] == ["error"]
    assert events[0].error.reason == "audit_not_durable"

    server = start_pg_server(port)
    try:
        deadline = time.monotonic() + 60
        while _audit_health(sidecar.target) != health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, "audit health never recovered"
            time.sleep(0.2)
        with grpc.insecure_channel(sidecar.target) as channel:
            events = list(
                pb_grpc.SafetyMonitorStub(channel).Monitor(
                    iter([_batch(2, "up", 0, ["y"])]), timeout=30
                )
            )
        assert [e.WhichOneof("event") for e in events] == ["alert", "ack"]
        assert sidecar.stop() == 0
    finally:
        server.stop()


def test_an_audited_step_waiting_for_its_commit_does_not_hold_the_event_loop(tmp_path):
    """With an audit store, a flagged conversation's step waits for its commit before its
    alerts may go out (up to `write_timeout_seconds` while the store is stuck). That wait
    must be on the pipeline thread: the event loop keeps answering GetStatus and health
    checks (liveness probes) meanwhile, so a small step never runs inline there."""
    db = tmp_path / "audit.db"
    audit = {"url": f"sqlite:///{db}", "write_timeout_seconds": 60.0, "health_probe_seconds": 60}
    raw = {**_config(tmp_path, audit=audit), "listen": "127.0.0.1:0", "metrics_port": 0}
    thread = SidecarThread(parse_config(raw, tmp_path, "test"))
    writer = thread.sidecar.pipeline.actions.recorder._writer  # observed, not replaced
    submit, waiting = writer.submit, threading.Event()

    def observed_submit(writes):
        waiting.set()
        return submit(writes)

    writer.submit = observed_submit
    target = f"127.0.0.1:{thread.start().port}"
    locker = None
    try:
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.SafetyMonitorStub(channel)
            first = list(stub.Monitor(iter([_batch(1, "held", 0, [" a"])]), timeout=60))
            assert any(event.HasField("ack") for event in first)
            waiting.clear()
            # Another connection holds the store's write lock: the next commit cannot happen.
            locker = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
            locker.execute("BEGIN EXCLUSIVE")
            answered: list[pb.MonitorEvent] = []
            stream = threading.Thread(
                target=lambda: answered.extend(
                    stub.Monitor(iter([_batch(2, "held", 1, [" b"])]), timeout=120)
                )
            )
            stream.start()
            assert waiting.wait(30), "the audited step never reached the audit writer"
            with grpc.insecure_channel(target) as other:
                status = pb_grpc.SafetyMonitorStub(other).GetStatus(pb.StatusRequest(), timeout=10)
                health = health_pb2_grpc.HealthStub(other).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=10
                )
            assert status.version and health.status == health_pb2.HealthCheckResponse.SERVING
            # Both answered while the step still waited for its commit.
            assert stream.is_alive() and not answered
            locker.execute("ROLLBACK")
            stream.join(90)
            assert not stream.is_alive()
            assert [event.ack.seq_no for event in answered if event.HasField("ack")] == [2]
    finally:
        if locker is not None:
            locker.close()
        thread.stop()
