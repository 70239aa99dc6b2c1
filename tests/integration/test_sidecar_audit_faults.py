"""Done-when fault test of issue 14: the audit store dies mid-stream under a real sidecar.

PostgreSQL is killed mid-stream and restarted; a SQLite store is locked by another process
mid-stream. In both: no acknowledged alert is missing from the store, none is stored twice,
health is honest while idle (and registered from the start, never NOT_FOUND), and SIGTERM
with the store down drops nothing: the records are spooled and written at the next start.
"""

from __future__ import annotations

import collections
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from monitor.audit import open_store
from monitor.audit.store import AuditQuery
from monitor.fixtures import SidecarProcess, start_sidecar
from monitor.wire import pb, pb_grpc
from tests.integration.test_sidecar_audit import _batch, _config
from tests.pg_server import start_pg_server

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
AUDIT = "safety_monitor.audit"


def audit_health(target: str) -> int:
    """The audit health status; raises (NOT_FOUND included) if the service is not registered."""
    with grpc.insecure_channel(target) as channel:
        request = health_pb2.HealthCheckRequest(service=AUDIT)
        return health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status


def wait_health(target: str, status: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while audit_health(target) != status:
        assert time.monotonic() < deadline, f"audit health never became {status}"
        time.sleep(0.1)


def stream(
    target: str,
    batches: list[pb.StepBatch],
    on_step: Callable[[int], None] = lambda _: None,
    hold_after: int | None = None,
) -> tuple[list[pb.Alert], list[pb.BatchError]]:
    """Send `batches` on one stream; returns the acknowledged alerts and the batch errors.
    `on_step(seq_no)` runs as each batch's ack or error arrives. With `hold_after`, the
    batches after that seq_no are sent only once `on_step(hold_after)` has returned (the
    fault it injects is then in place before they arrive, however fast the machine)."""
    acked, errors = [], []
    pending: dict[int, list[pb.Alert]] = collections.defaultdict(list)
    released = threading.Event()

    def requests() -> Iterator[pb.StepBatch]:
        for batch in batches:
            yield batch
            if batch.seq_no == hold_after:
                assert released.wait(60), "the held batches were never released"

    def answered(seq_no: int) -> None:
        on_step(seq_no)
        if seq_no == hold_after:
            released.set()

    with grpc.insecure_channel(target) as channel:
        for event in pb_grpc.SafetyMonitorStub(channel).Monitor(requests(), timeout=120):
            if event.HasField("alert"):
                pending[event.alert.seq_no].append(event.alert)
            elif event.HasField("ack"):
                acked += pending.pop(event.ack.seq_no, [])
                answered(event.ack.seq_no)
            else:
                pending.pop(event.error.seq_no, None)
                errors.append(event.error)
                answered(event.error.seq_no)
    return acked, errors


def stored_alerts(url: str) -> collections.Counter[tuple[str, str, int]]:
    store = open_store(url, readonly=url.startswith("sqlite"))
    try:
        alerts = store.list_alerts(AuditQuery(limit=None))
    finally:
        store.close()
    return collections.Counter((a.conversation_id, a.rule, a.position) for a in alerts)


def wait_stored(url: str, count: int, timeout: float = 30.0) -> None:
    """Wait until the store holds `count` alerts (records queued during an outage follow)."""
    deadline = time.monotonic() + timeout
    while sum(stored_alerts(url).values()) < count:
        assert time.monotonic() < deadline, "queued records never reached the store"
        time.sleep(0.2)


def check_no_loss_no_duplicate(url: str, acked: list[pb.Alert]) -> None:
    counts = stored_alerts(url)
    assert max(counts.values()) == 1, [k for k, n in counts.items() if n > 1]  # no duplicate
    for alert in acked:  # every acknowledged alert is there
        assert counts[(alert.conversation_id, alert.rule, alert.position)] == 1, alert


@pytest.fixture
def sidecars() -> Iterator[Callable[[dict, Path], SidecarProcess]]:
    started: list[SidecarProcess] = []

    def start(config: dict, workdir: Path) -> SidecarProcess:
        workdir.mkdir(parents=True, exist_ok=True)
        sidecar = start_sidecar(config, workdir)
        started.append(sidecar)
        return sidecar

    yield start
    for sidecar in started:
        if sidecar.process.poll() is None:
            sidecar.process.kill()
            sidecar.process.wait(10)


def test_postgres_killed_mid_stream(tmp_path: Path, sidecars) -> None:
    server = start_pg_server()
    try:
        audit = {
            "url": server.url,
            # Generous: a commit on a loaded machine may be slow; while the store is known
            # to be down, nothing waits for it.
            "write_timeout_seconds": 5.0,
            "health_probe_seconds": 0.2,
            "spool_path": str(tmp_path / "spool.jsonl"),
        }
        config = _config(tmp_path, audit=audit)
        sidecar = sidecars(config, tmp_path / "first")
        assert audit_health(sidecar.target) in (SERVING, NOT_SERVING)  # never NOT_FOUND
        wait_health(sidecar.target, SERVING, 20)

        # Mid-stream: the database dies after the 20th step.
        def on_step(seq_no: int) -> None:
            if seq_no == 20:
                server.kill()

        # One conversation per batch: the rule fires once per conversation.
        batches = [_batch(i, f"pg-{i}", 0, [f" t{i}"], end=True) for i in range(1, 61)]
        acked, errors = stream(sidecar.target, batches, on_step, hold_after=20)
        assert len(acked) >= 20 and errors  # withheld during the outage
        assert all(e.reason == "audit_not_durable" for e in errors)
        assert len(acked) + len(errors) == 60
        # Health is polled (HEALTH_POLL_SECONDS): see the outage in it before restarting, or a
        # SERVING left over from before the kill would let the next stream start while the
        # writer still fails, and its alerts would rightly be withheld.
        wait_health(sidecar.target, NOT_SERVING, 30)
        server.restart()
        wait_health(sidecar.target, SERVING, 60)
        wait_stored(server.url, 60)  # the withheld records follow; the writer's queue is empty
        more = [_batch(i, f"pg-{i}", 0, [f" t{i}"], end=True) for i in range(61, 81)]
        acked_after, errors_after = stream(sidecar.target, more)
        assert len(acked_after) == 20 and not errors_after
        acked += acked_after
        wait_stored(server.url, 80)
        check_no_loss_no_duplicate(server.url, acked)

        # Idle, no writes: the outage shows in health; and it recovers, still idle.
        server.kill()
        wait_health(sidecar.target, NOT_SERVING, 10)
        server.restart()
        wait_health(sidecar.target, SERVING, 30)

        # SIGTERM with the database down: the queued records are spooled, not dropped.
        server.kill()
        wait_health(sidecar.target, NOT_SERVING, 10)
        later = [_batch(200 + i, f"late-{i}", 0, [" x"], end=True) for i in range(10)]
        _, late_errors = stream(sidecar.target, later)
        assert len(late_errors) == 10  # withheld: not durable
        sidecar.process.send_signal(signal.SIGTERM)
        assert sidecar.process.wait(60) == 0
        events = sidecar.log_events()
        assert any(e["event"] == "audit store failed" and e.get("error") for e in events)
        spooled = [e for e in events if e["event"].startswith("audit store down at shutdown")]
        assert spooled and spooled[0]["alerts"] >= 10
        assert (tmp_path / "spool.jsonl").exists()

        server.restart()
        second = sidecars(config, tmp_path / "second")
        wait_health(second.target, SERVING, 30)
        deadline = time.monotonic() + 30
        while (tmp_path / "spool.jsonl").exists():
            assert time.monotonic() < deadline, "spool never replayed"
            time.sleep(0.2)
        counts = stored_alerts(server.url)
        assert all(counts[(f"late-{i}", "always-audited", 0)] == 1 for i in range(10))
        check_no_loss_no_duplicate(server.url, acked)
        assert second.stop() == 0
    finally:
        server.stop()


def test_sqlite_file_locked_mid_stream(tmp_path: Path, sidecars) -> None:
    db = tmp_path / "audit.db"
    url = f"sqlite:///{db}"
    audit = {"url": url, "write_timeout_seconds": 5.0, "health_probe_seconds": 0.2}
    sidecar = sidecars(_config(tmp_path, audit=audit), tmp_path / "first")
    assert audit_health(sidecar.target) in (SERVING, NOT_SERVING)  # never NOT_FOUND
    wait_health(sidecar.target, SERVING, 20)
    locker = sqlite3.connect(db, isolation_level=None, check_same_thread=False)

    def on_step(seq_no: int) -> None:
        if seq_no == 10:
            locker.execute("BEGIN EXCLUSIVE")  # another process takes the file

    batches = [_batch(i, f"sq-{i}", 0, [f" t{i}"], end=True) for i in range(1, 31)]
    acked, errors = stream(sidecar.target, batches, on_step, hold_after=10)
    assert len(acked) >= 10 and errors
    assert len(acked) + len(errors) == 30
    wait_health(sidecar.target, NOT_SERVING, 30)  # see the outage first (health is polled)
    locker.execute("COMMIT")
    wait_health(sidecar.target, SERVING, 30)
    wait_stored(url, 30)  # the withheld records follow; the writer's queue is empty
    more = [_batch(i, f"sq-{i}", 0, [f" t{i}"], end=True) for i in range(31, 41)]
    acked_after, errors_after = stream(sidecar.target, more)
    assert len(acked_after) == 10 and not errors_after
    acked += acked_after
    wait_stored(url, 40)
    check_no_loss_no_duplicate(url, acked)

    # Idle: a lock shows in health (the probe takes the write lock), and its release too.
    locker.execute("BEGIN EXCLUSIVE")
    wait_health(sidecar.target, NOT_SERVING, 20)
    # SIGTERM while locked: spooled beside the store, written at the next start.
    later = [_batch(100 + i, f"late-{i}", 0, [" x"], end=True) for i in range(5)]
    _, late_errors = stream(sidecar.target, later)
    assert len(late_errors) == 5
    sidecar.process.send_signal(signal.SIGTERM)
    assert sidecar.process.wait(60) == 0
    locker.execute("COMMIT")
    locker.close()
    spool = Path(f"{db}.spool.jsonl")
    assert spool.exists()
    second = sidecars(_config(tmp_path, audit=audit), tmp_path / "second")
    deadline = time.monotonic() + 30
    while spool.exists():
        assert time.monotonic() < deadline, "spool never replayed"
        time.sleep(0.2)
    counts = stored_alerts(url)
    assert all(counts[(f"late-{i}", "always-audited", 0)] == 1 for i in range(5))
    check_no_loss_no_duplicate(url, acked)
    assert second.stop() == 0
