"""Versioned schema migrations of the audit store, shared by SQLite and PostgreSQL.

Each migration is applied once, in order, inside one transaction together with its row in
`schema_version`, so a crash mid-migration leaves the previous version intact (both databases
have transactional DDL). The few type differences between the two databases are template
fields ({ts}, {id}) filled per dialect; everything else is the same SQL.

JSON columns are TEXT in both databases: the store never queries inside them, and keeping them
opaque makes a row written by any version readable by any other (and lets the read side treat
a malformed value as a damaged row rather than a database error).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

# Same key in every sidecar of a fleet, so concurrent starts serialise their migrations.
PG_MIGRATION_LOCK = 0x5AFE_A0D1

TYPES = {
    "sqlite": {"ts": "TEXT", "id": "INTEGER PRIMARY KEY AUTOINCREMENT"},
    "postgresql": {"ts": "TIMESTAMPTZ", "id": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"},
}


@dataclass(frozen=True)
class Migration:
    """One schema version: its number, what it changes, and its statements (`{ts}`/`{id}` filled
    in per dialect by `render`).
    """

    version: int
    description: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "flagged conversations, their alerts and tokens",
        (
            """CREATE TABLE conversations (
                conversation_id TEXT PRIMARY KEY,
                model TEXT NOT NULL,
                hook_points TEXT NOT NULL DEFAULT '[]',
                first_flagged_at {ts} NOT NULL,
                updated_at {ts} NOT NULL,
                ended INTEGER NOT NULL DEFAULT 0
            )""",
            """CREATE TABLE alerts (
                id {id},
                conversation_id TEXT NOT NULL REFERENCES conversations (conversation_id),
                request_id TEXT NOT NULL,
                rule TEXT NOT NULL,
                rule_set_hash TEXT NOT NULL,
                category TEXT NOT NULL,
                severity TEXT NOT NULL,
                value DOUBLE PRECISION,
                position BIGINT NOT NULL,
                start_position BIGINT NOT NULL,
                end_position BIGINT NOT NULL,
                feature_values TEXT NOT NULL DEFAULT '{{}}',
                message TEXT NOT NULL,
                labels TEXT NOT NULL DEFAULT '{{}}',
                created_at {ts} NOT NULL
            )""",
            """CREATE TABLE tokens (
                conversation_id TEXT NOT NULL REFERENCES conversations (conversation_id),
                position BIGINT NOT NULL,
                request_id TEXT NOT NULL,
                role TEXT NOT NULL,
                text TEXT,
                features TEXT NOT NULL DEFAULT '{{}}',
                PRIMARY KEY (conversation_id, position)
            )""",
        ),
    ),
    Migration(
        2,
        "indexes for list filters and retention",
        (
            "CREATE INDEX alerts_conversation ON alerts (conversation_id)",
            "CREATE INDEX alerts_created_at ON alerts (created_at)",
            "CREATE INDEX alerts_rule ON alerts (rule)",
            "CREATE INDEX conversations_updated_at ON conversations (updated_at)",
        ),
    ),
    Migration(
        3,
        "reviewer labels of alerts (the review page)",
        (
            # One row per verdict given; the newest row of an alert is its current label, the
            # older ones are its history (who changed their mind, and when).
            """CREATE TABLE labels (
                id {id},
                alert_id BIGINT NOT NULL REFERENCES alerts (id),
                conversation_id TEXT NOT NULL REFERENCES conversations (conversation_id),
                verdict TEXT NOT NULL,
                note TEXT NOT NULL DEFAULT '',
                labeler TEXT NOT NULL,
                created_at {ts} NOT NULL
            )""",
            "CREATE INDEX labels_conversation ON labels (conversation_id, id)",
            "CREATE INDEX labels_alert ON labels (alert_id)",
            # The list view walks conversations newest first and pages by this key; without
            # it every page sorts the whole table.
            "CREATE INDEX conversations_recent ON conversations (updated_at, conversation_id)",
            # Its rule filter checks each walked conversation's alerts: by conversation first
            # (SQLite would otherwise scan every alert of the rule for each conversation).
            "CREATE INDEX alerts_conversation_rule ON alerts (conversation_id, rule)",
            # Its model filter, newest first, without walking the other models' rows.
            "CREATE INDEX conversations_model_recent ON conversations "
            "(model, updated_at, conversation_id)",
        ),
    ),
    Migration(
        4,
        "idempotent alert writes: a key per firing, unique",
        (
            # A retried transaction whose COMMIT reply was lost must not store its alerts twice.
            # Rows written before this version keep a NULL key (NULLs never conflict).
            "ALTER TABLE alerts ADD COLUMN alert_key TEXT",
            "CREATE UNIQUE INDEX alerts_key ON alerts (alert_key)",
        ),
    ),
)

LATEST_VERSION = MIGRATIONS[-1].version

_VERSION_TABLE = """CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER PRIMARY KEY,
    description TEXT NOT NULL,
    applied_at TEXT NOT NULL
)"""


class SchemaError(RuntimeError):
    """The store's schema is newer than this program, or a migration failed."""


def render(statement: str, dialect: str) -> str:
    """A migration statement with the dialect's column types filled in."""
    return statement.format(**TYPES[dialect])


def current_version(cursor: Any) -> int:
    """The schema version the database is at (0: none applied)."""
    cursor.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version")
    return int(cursor.fetchone()[0])


def migrate(cursor: Any, dialect: str, placeholder: str) -> list[int]:
    """Bring the schema to LATEST_VERSION inside the caller's (locked) transaction.

    Returns the versions applied (empty when already up to date, so re-opening is a no-op).
    """
    cursor.execute(_VERSION_TABLE)
    version = current_version(cursor)
    if version > LATEST_VERSION:
        raise SchemaError(
            f"audit store schema version {version} is newer than this safety-monitor "
            f"supports ({LATEST_VERSION}); upgrade safety-monitor"
        )
    applied = []
    insert = "INSERT INTO schema_version (version, description, applied_at) VALUES (?, ?, ?)"
    for migration in MIGRATIONS:
        if migration.version <= version:
            continue
        for statement in migration.statements:
            cursor.execute(render(statement, dialect))
        now = datetime.now(UTC).isoformat()
        cursor.execute(
            insert.replace("?", placeholder), (migration.version, migration.description, now)
        )
        applied.append(migration.version)
    return applied
