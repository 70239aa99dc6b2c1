"""SQLite backend: the embedded default, one file next to the sidecar.

WAL journal: readers (`safety-monitor audit list` while the sidecar runs) never block the
writer and the writer never blocks them. synchronous=FULL: with WAL, NORMAL already survives a
process crash (kill -9), but a power loss or kernel crash can roll back the last commits, and
an alert acknowledged to the client must survive those too. FULL costs one fsync per commit,
and only steps that touch a flagged conversation commit anything.

Opening a second connection (the audit CLI, a retention purge) while another one writes must
wait, not fail. SQLite does not call its busy handler when switching the journal mode needs a
lock another connection holds (it returns "database is locked" at once, to avoid a deadlock),
which happens while a fresh or rollback-journal file is being created or written. So the busy
timeout is set first, the journal mode is switched to WAL only when the file is not WAL yet,
and that switch is retried until the busy timeout. Readers open the file read-only (`mode=ro`)
and never switch the journal mode or migrate.
"""

from __future__ import annotations

import sqlite3
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from monitor.audit import migrations
from monitor.audit.store import SqlAuditStore, StoreError

BUSY_TIMEOUT_S = 5.0  # how long a write waits for another process's lock before failing
_RETRY_SLEEP_S = 0.01


def encode_ts(value: datetime) -> str:
    """Fixed-width UTC ISO-8601, so text comparison in SQL orders like time."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat(timespec="microseconds")


class SqliteAuditStore(SqlAuditStore):
    """The SQLite backend (`sqlite:///path.db`): the embedded default, one file, no server."""

    dialect = "sqlite"
    placeholder = "?"

    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        """Open (creating and migrating unless `readonly`) the store file at `path`."""
        super().__init__()
        self.path = Path(path)
        self.readonly = readonly
        try:
            self._conn = self._connect()
            if readonly:
                version = self.schema_version()
                if version > migrations.LATEST_VERSION:
                    raise migrations.SchemaError(
                        f"audit store schema version {version} is newer than this "
                        f"safety-monitor supports ({migrations.LATEST_VERSION}); upgrade"
                    )
            else:
                _retry_locked(self._use_wal, time.monotonic() + BUSY_TIMEOUT_S)
                self._conn.execute("PRAGMA synchronous=FULL")
                self._migrate()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open audit store {self.path}: {exc}") from exc

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves so a write is exactly one
        # transaction. check_same_thread=False: the store serialises access with its lock.
        if self.readonly:
            target = f"file:{urllib.parse.quote(str(self.path.resolve()))}?mode=ro"
        else:
            target = str(self.path)
        conn = sqlite3.connect(
            target,
            timeout=BUSY_TIMEOUT_S,
            isolation_level=None,
            check_same_thread=False,
            uri=self.readonly,
        )
        # Before any other statement, so everything below waits for locks instead of failing.
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        return conn

    def _use_wal(self) -> None:
        mode = self._conn.execute("PRAGMA journal_mode").fetchone()[0]
        if str(mode).lower() != "wal":
            self._conn.execute("PRAGMA journal_mode=WAL")

    @contextmanager
    def _transaction(self, write: bool) -> Iterator[Any]:
        cur = self._conn.cursor()
        # IMMEDIATE takes the write lock up front: no deadlock upgrading a read lock later.
        cur.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield cur
        except BaseException:
            self._conn.rollback()
            raise
        else:
            cur.execute("COMMIT")
        finally:
            cur.close()

    def ping(self) -> None:
        """Take the write lock and let it go: a file another process keeps locked, or that
        cannot be written, fails here as a write would (SELECT 1 alone would not notice)."""
        with self._lock, self._transaction(write=not self.readonly) as cur:
            cur.execute("SELECT 1")
            cur.fetchall()

    def _write_ts(self, value: datetime) -> str:
        return encode_ts(value)

    def _read_ts(self, value: Any) -> datetime:
        if not isinstance(value, str):
            raise TypeError(f"not a timestamp: {value!r}")
        parsed = datetime.fromisoformat(value)
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._conn.close()


def _retry_locked(action: Callable[[], None], deadline: float) -> None:
    """Run `action`, retrying while SQLite reports a lock it would not wait for itself."""
    while True:
        try:
            action()
            return
        except sqlite3.OperationalError as exc:
            locked = "locked" in str(exc) or "busy" in str(exc)
            if not locked or time.monotonic() >= deadline:
                raise
        time.sleep(_RETRY_SLEEP_S)
