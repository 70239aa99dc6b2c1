"""SQLite backend: the embedded default, one file next to the sidecar.

WAL journal: readers (`safety-monitor audit list` while the sidecar runs) never block the
writer and the writer never blocks them. synchronous=FULL: with WAL, NORMAL already survives a
process crash (kill -9), but a power loss or kernel crash can roll back the last commits, and
an alert acknowledged to the client must survive those too. FULL costs one fsync per commit,
and only steps that touch a flagged conversation commit anything.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from monitor.audit.store import SqlAuditStore, StoreError

BUSY_TIMEOUT_S = 5.0  # how long a write waits for another process's lock before failing


def encode_ts(value: datetime) -> str:
    """Fixed-width UTC ISO-8601, so text comparison in SQL orders like time."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat(timespec="microseconds")


class SqliteAuditStore(SqlAuditStore):
    """The SQLite backend (`sqlite:///path.db`): the embedded default, one file, no server."""

    dialect = "sqlite"
    placeholder = "?"

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves so a write is exactly one
            # transaction. check_same_thread=False: the store serialises access with its lock.
            self._conn = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._migrate()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open audit store {self.path}: {exc}") from exc

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
