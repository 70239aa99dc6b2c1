"""PostgreSQL backend (psycopg 3): one store shared by a fleet of sidecars.

Autocommit connection with explicit `conn.transaction()` blocks, so each write is exactly one
transaction and nothing is left open between steps. A statement timeout bounds how long a slow
database can hold the sidecar's audit writer; the recorder retries and reconnects.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

from monitor.audit.migrations import PG_MIGRATION_LOCK
from monitor.audit.store import SqlAuditStore, StoreError

CONNECT_TIMEOUT_S = 5
STATEMENT_TIMEOUT_MS = 10_000


class PostgresAuditStore(SqlAuditStore):
    """The PostgreSQL backend (`postgresql://...`), via psycopg 3; migrations run under an
    advisory lock so several sidecars can start at once.
    """

    dialect = "postgresql"
    placeholder = "%s"

    def __init__(self, url: str) -> None:
        super().__init__()
        try:
            self._conn = psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
            self._conn.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")
            self._conn.execute("SET TIME ZONE 'UTC'")
            self._migrate()
        except psycopg.Error as exc:
            raise StoreError(f"cannot open audit store: {exc}".strip()) from exc

    @contextmanager
    def _transaction(self, write: bool) -> Iterator[Any]:
        with self._conn.transaction(), self._conn.cursor() as cur:
            yield cur

    def _lock_for_migration(self, cursor: Any) -> None:
        # Sidecars of a fleet start together; the advisory lock makes one migrate, the others
        # wait and then find the schema current. Released at the end of the transaction.
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", (PG_MIGRATION_LOCK,))

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._conn.close()
