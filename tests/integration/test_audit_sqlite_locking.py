"""SQLite: a second connection to a store another connection is writing waits, never fails.

Issue 14, finding 9: `PRAGMA journal_mode=WAL` raised "database is locked" at once (SQLite does
not call its busy handler there) when a second connection opened a store that another
connection was creating or writing in rollback-journal mode.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from monitor.audit.migrations import LATEST_VERSION
from monitor.audit.sqlite_store import BUSY_TIMEOUT_S, SqliteAuditStore
from monitor.audit.store import StoreError, open_store


def _locked_rollback_file(
    path: Path, hold_s: float, release_early: threading.Event | None = None
) -> threading.Thread:
    """A file in rollback-journal mode whose write lock another connection holds `hold_s`
    (or until `release_early` is set)."""
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("CREATE TABLE unrelated (x)")
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO unrelated VALUES (1)")

    def release() -> None:
        (release_early or threading.Event()).wait(hold_s)
        other.execute("COMMIT")
        other.close()

    thread = threading.Thread(target=release)
    thread.start()
    return thread


def test_open_waits_for_a_writer_holding_the_lock_of_a_rollback_journal_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.db"
    releaser = _locked_rollback_file(path, hold_s=0.3)
    started = time.monotonic()
    store = SqliteAuditStore(path)  # raised "database is locked" at once before the fix
    waited = time.monotonic() - started
    releaser.join()
    assert waited >= 0.25, "the lock was held; opening cannot have finished before it was free"
    assert store.schema_version() >= 1
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()


def test_open_gives_up_after_the_busy_timeout_with_a_store_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("monitor.audit.sqlite_store.BUSY_TIMEOUT_S", 0.2)
    path = tmp_path / "audit.db"
    # The lock is held far longer than the busy timeout (released once the open gave up), so
    # the bound below holds on a loaded machine too: giving up at all proves the timeout.
    done = threading.Event()
    releaser = _locked_rollback_file(path, hold_s=30.0, release_early=done)
    started = time.monotonic()
    try:
        with pytest.raises(StoreError, match="locked"):
            SqliteAuditStore(path)
        assert 0.15 <= time.monotonic() - started < 10.0
    finally:
        done.set()
        releaser.join()


def test_concurrent_first_opens_of_a_fresh_file_all_succeed(tmp_path: Path) -> None:
    """The race of the flaky CI run: several connections create and migrate one new file."""
    failures: list[str] = []
    for i in range(40):
        url = f"sqlite:///{tmp_path / f'race{i}.db'}"

        def open_one(url: str = url) -> None:
            try:
                open_store(url).close()
            except StoreError as exc:
                failures.append(str(exc))

        threads = [threading.Thread(target=open_one) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert failures == []


def test_readers_open_read_only_and_never_switch_the_journal_mode(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    writer = SqliteAuditStore(path)
    # A writer mid-transaction: a reader opens and reads without waiting for it.
    with writer._lock, writer._transaction(write=True) as cur:
        cur.execute("INSERT INTO schema_version VALUES (99, 'in flight', 'now')")
        started = time.monotonic()
        reader = open_store(f"sqlite:///{path}", readonly=True)
        assert reader.list_conversations() == []
        assert reader.schema_version() == LATEST_VERSION  # the uncommitted row is not visible
        # Waiting for the writer would take the busy timeout (then fail): well under it.
        assert time.monotonic() - started < BUSY_TIMEOUT_S / 2
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            reader._conn.execute("CREATE TABLE t (x)")  # type: ignore[attr-defined]
        reader.close()
    writer.close()


def test_read_only_open_of_a_file_that_is_no_store_fails_cleanly(tmp_path: Path) -> None:
    path = tmp_path / "empty.db"
    sqlite3.connect(path).execute("CREATE TABLE other (x)")
    with pytest.raises(StoreError, match="schema_version"):
        open_store(f"sqlite:///{path}", readonly=True)
