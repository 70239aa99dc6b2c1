"""The audit store under faults (issue 14, findings 9 and 11), against real databases.

- A COMMIT whose reply is lost (a loopback proxy cuts the connection right after forwarding
  it): the retried transaction stores each alert once.
- Health while idle: a store that dies (PostgreSQL killed, a SQLite file locked by another
  process) turns the recorder unhealthy without any write, and healthy again when it is back.
- Shutdown with the store down: queued records go to the spool with an error in the log, and
  the next start writes them, once, even when the spool is replayed twice.
- While the store is down, a flagged step does not wait for its commit, and a step that
  flags nothing never touches the store.
- Held-back text: when an alert commits, the held tokens are written with it (no text).
- Store errors are logged, as JSON; a driver's plain-text log lines become JSON too.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import structlog

from monitor.audit.recorder import (
    AuditFiring,
    AuditRecorder,
    AuditSlice,
    AuditStep,
    RecorderConfig,
)
from monitor.audit.store import AuditQuery, open_store
from monitor.fixtures import free_port
from monitor.logs import configure_logging
from tests.pg_server import PgServer, start_pg_server


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"not reached in {timeout} s: {what}")


def step(cid: str, position: int, texts: list[str], *, fire: bool = True, end: bool = False):
    firings = []
    if fire:
        firings.append(
            AuditFiring(
                "r", "deception", "critical", cid, "req", position + len(texts) - 1, 2.0,
                "msg", actions=("alert", "audit"),
            )
        )  # fmt: skip
    sl = AuditSlice(cid, "req", position, texts, "assistant", end, {"f": [1.0] * len(texts)})
    return AuditStep("gemma", "h", [sl], firings)


def alert_keys(url: str) -> list[tuple[str, int]]:
    store = open_store(url, readonly=True)
    try:
        return [(a.conversation_id, a.position) for a in store.list_alerts(AuditQuery(limit=None))]
    finally:
        store.close()


@pytest.fixture
def pg() -> Iterator[PgServer]:
    server = start_pg_server()
    yield server
    server.stop()


@pytest.fixture
def json_log(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], list[dict]]]:
    """The process's log set-up, writing JSON into a buffer read by `lines()`."""
    buffer = io.StringIO()
    # Given explicitly: pytest puts its own capture on sys.stderr again for the test's call.
    configure_logging("json", stream=buffer)
    # Not cached: loggers first used here must not keep this test's buffer afterwards.
    structlog.configure(cache_logger_on_first_use=False)

    def lines() -> list[dict]:
        return [json.loads(line) for line in buffer.getvalue().splitlines() if line]

    yield lines
    configure_logging("json", "debug")  # back to the test session's set-up (tests/conftest.py)


# --- a COMMIT whose reply is lost ------------------------------------------------------------
class CommitReplyDropper:
    """A TCP proxy on 127.0.0.1 in front of PostgreSQL. While armed, when a client sends a
    COMMIT it forwards it, lets the server commit, then cuts both sides before any reply
    reaches the client: the client cannot know the transaction committed."""

    def __init__(self, upstream_port: int, drops: int) -> None:
        self.upstream_port = upstream_port
        self.remaining = drops
        self.dropped = 0
        self.armed = False
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream_port))
            cut = threading.Event()
            threading.Thread(target=self._up, args=(client, server, cut), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, cut), daemon=True).start()

    def _take_drop(self) -> bool:
        with self._lock:
            if self.armed and self.remaining > 0:
                self.remaining -= 1
                self.dropped += 1
                return True
            return False

    def _up(self, client: socket.socket, server: socket.socket, cut: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                if b"COMMIT" in data and self._take_drop():
                    cut.set()  # from now on nothing goes back to the client
                    server.sendall(data)
                    time.sleep(0.3)  # the server commits
                    break
                server.sendall(data)
        for sock in (client, server):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _down(self, server: socket.socket, client: socket.socket, cut: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := server.recv(65536):
                if cut.is_set():
                    break
                client.sendall(data)


def test_lost_commit_replies_do_not_duplicate_alerts(pg: PgServer) -> None:
    proxy = CommitReplyDropper(pg.port, drops=5)
    url = f"postgresql://postgres@127.0.0.1:{proxy.port}/postgres"
    rec = AuditRecorder(url, RecorderConfig(retry_initial=0.05, retry_max=0.2, write_timeout=10))
    try:
        wait_for(lambda: rec.healthy, what="store open through the proxy")
        proxy.armed = True
        for i in range(12):
            assert rec.record_batch(step(f"c{i % 3}", i, [f" t{i}"])).durable
        assert proxy.dropped == 5
    finally:
        rec.close(timeout=10)
        proxy.close()
    keys = alert_keys(pg.url)
    assert sorted(keys) == sorted({(f"c{i % 3}", i) for i in range(12)})  # each alert once


# --- health while idle -------------------------------------------------------------------------
def test_idle_health_follows_a_killed_and_restarted_postgres(pg: PgServer) -> None:
    rec = AuditRecorder(pg.url, RecorderConfig(health_probe_seconds=0.2, spool_path=None))
    try:
        wait_for(lambda: rec.healthy, what="healthy at start")
        pg.kill()  # no write happens from here on
        wait_for(lambda: not rec.healthy, timeout=10, what="unhealthy while idle")
        pg.restart()
        wait_for(lambda: rec.healthy, timeout=30, what="healthy again")
    finally:
        rec.close(timeout=5)


def test_idle_health_follows_a_sqlite_file_locked_by_another_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("monitor.audit.sqlite_store.BUSY_TIMEOUT_S", 0.3)
    db = tmp_path / "audit.db"
    rec = AuditRecorder(f"sqlite:///{db}", RecorderConfig(health_probe_seconds=0.2))
    try:
        wait_for(lambda: rec.healthy, what="healthy at start")
        other = sqlite3.connect(db, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")  # what a backup tool or a stuck process does
        wait_for(lambda: not rec.healthy, timeout=10, what="unhealthy while locked")
        other.execute("COMMIT")
        other.close()
        wait_for(lambda: rec.healthy, timeout=10, what="healthy after the lock")
    finally:
        rec.close(timeout=5)


# --- shutdown with the store down ----------------------------------------------------------------
def test_shutdown_with_postgres_down_spools_and_the_next_start_writes_once(
    pg: PgServer, tmp_path: Path, json_log
) -> None:
    spool = tmp_path / "audit.spool.jsonl"
    config = RecorderConfig(
        spool_path=str(spool), write_timeout=2.0, retry_initial=0.05, retry_max=0.2
    )
    rec = AuditRecorder(pg.url, config)
    wait_for(lambda: rec.healthy, what="healthy at start")
    assert rec.record_batch(step("before", 0, [" a"])).durable
    pg.kill()
    results = [rec.record_batch(step(f"down{i}", 0, [" held", " text"])) for i in range(24)]
    assert not any(r.durable for r in results)
    started = time.monotonic()
    assert rec.close(timeout=1.0) is False  # not everything committed: says so
    assert time.monotonic() - started < 5.0  # bounded
    assert rec.counts().spooled >= 24
    events = json_log()
    spooled = [e for e in events if e["event"].startswith("audit store down at shutdown")]
    assert spooled and spooled[0]["level"] == "error" and spooled[0]["alerts"] == 24
    assert any(e["event"] == "audit store failed" and e["error"] for e in events)
    assert spool.exists()
    copy = tmp_path / "copy.jsonl"
    shutil.copy(spool, copy)

    pg.restart()
    expected = sorted([("before", 0)] + [(f"down{i}", 1) for i in range(24)])
    for spool_file in (spool, copy):  # replayed twice: still each alert once
        if spool_file == copy:
            shutil.copy(copy, spool)
        again = AuditRecorder(pg.url, config)
        wait_for(lambda: not spool.exists(), what="spool replayed and removed")
        assert again.close(timeout=5)
        assert sorted(alert_keys(pg.url)) == expected
    store = open_store(pg.url)
    record = store.get_conversation("down3")
    store.close()
    assert record is not None and "".join(t.text or "" for t in record.tokens) == " held text"


def test_shutdown_with_a_locked_sqlite_file_spools_beside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("monitor.audit.sqlite_store.BUSY_TIMEOUT_S", 0.2)
    db = tmp_path / "audit.db"
    url = f"sqlite:///{db}"
    config = RecorderConfig(write_timeout=0.5, retry_initial=0.05, retry_max=0.1)
    rec = AuditRecorder(url, config)
    wait_for(lambda: rec.healthy, what="healthy at start")
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        results = [rec.record_batch(step(f"c{i}", 0, [" x"])) for i in range(5)]
        assert not any(r.durable for r in results)
        assert rec.close(timeout=0.5) is False
    finally:
        other.execute("COMMIT")
        other.close()
    spool = Path(f"{db}.spool.jsonl")
    assert spool.exists()
    again = AuditRecorder(url, config)
    wait_for(lambda: not spool.exists(), what="spool replayed")
    assert again.close(timeout=5)
    assert sorted(alert_keys(url)) == [(f"c{i}", 0) for i in range(5)]


# --- streams during an outage -------------------------------------------------------------------
def test_during_an_outage_steps_do_not_wait_on_the_store(pg: PgServer) -> None:
    rec = AuditRecorder(
        pg.url, RecorderConfig(write_timeout=5.0, retry_initial=0.05, retry_max=0.2)
    )
    try:
        wait_for(lambda: rec.healthy, what="healthy at start")
        pg.kill()
        wait_for(lambda: not rec.healthy, what="outage noticed")
        started = time.monotonic()
        for i in range(20):
            assert rec.record_batch(step(f"q{i}", 0, [" calm"], fire=False)).status == "nothing"
            flagged = rec.record_batch(step(f"f{i}", 0, [" bad"]))
            assert (flagged.durable, flagged.status) == (False, "pending")
        # 20 flagged steps: not 20 write timeouts (100 s), not one (5 s); slack for a loaded
        # machine below the one timeout.
        assert time.monotonic() - started < 4.0
        pg.restart()
        wait_for(lambda: rec.counts().pending == 0 and rec.healthy, timeout=30, what="drained")
    finally:
        rec.close(timeout=5)
    assert sorted(alert_keys(pg.url)) == sorted((f"f{i}", 0) for i in range(20))


# --- held-back text and alerts ------------------------------------------------------------------
def test_held_back_tokens_are_written_with_the_alert_without_text(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    rec = AuditRecorder(url, RecorderConfig(redaction_holdback_chars=64))
    try:
        assert rec.record_batch(step("c", 0, [" mail", " bob", "@exa"], fire=True)).durable
        store = open_store(url, readonly=True)
        record = store.get_conversation("c")
        store.close()
        # A sidecar killed now leaves the positions, features and alert, but no raw text.
        assert record is not None and [t.position for t in record.tokens] == [0, 1, 2]
        assert [t.text for t in record.tokens] == [None, None, None]
        assert [a.position for a in record.alerts] == [2]
        assert rec.record_batch(step("c", 3, ["mple.com", " bye"], fire=False, end=True)).durable
    finally:
        rec.close(timeout=5)
    store = open_store(url, readonly=True)
    record = store.get_conversation("c")
    store.close()
    assert record is not None
    assert [t.text for t in record.tokens] == [" mail", " [EMAIL]", "", "", " bye"]
    data = b"".join(p.read_bytes() for p in tmp_path.glob("audit.db*"))
    assert b"bob@" not in data


# --- logs ----------------------------------------------------------------------------------------
def test_store_errors_are_logged_as_json_with_their_cause(json_log) -> None:
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"  # nothing listens
    rec = AuditRecorder(url, RecorderConfig(retry_initial=0.05, health_probe_seconds=0.1))
    try:
        wait_for(lambda: rec.counts().error > 0, what="a failure")
    finally:
        rec.close(timeout=1)
    events = json_log()
    failures = [e for e in events if e["event"] == "audit store failed"]
    assert failures and failures[0]["level"] == "error"
    assert "127.0.0.1" in failures[0]["error"] and failures[0]["error_type"]
    assert len(failures) <= 2  # rate-limited, not one line per retry


def test_library_log_lines_are_json_too(json_log) -> None:
    logging.getLogger("psycopg").warning(
        "error ignored in rollback on <Connection>: cannot exit pipeline mode while busy\nx"
    )
    (event,) = json_log()
    assert event["logger"] == "psycopg" and event["level"] == "warning"
    assert event["event"].endswith("busy\\x0ax")
