"""The audit store: records of flagged conversations, one interface over SQLite and PostgreSQL.

`open_store(url)` picks the backend from the URL. Both backends share the SQL in
`SqlAuditStore`; they differ in how they connect, lock, mark parameters and store timestamps.
The read side never raises on a damaged row: a column that does not decode becomes a
placeholder and a line in `ConversationRecord.warnings`.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from monitor.audit import migrations

SEVERITY_ORDER = {"info": 0, "warning": 1, "critical": 2}
CORRUPT = "\ufffd"  # shown in place of a value that could not be decoded


class StoreError(RuntimeError):
    """A store URL that cannot be used, or a backend failure (wraps the driver's error)."""


@dataclass(frozen=True)
class TokenRecord:
    """One stored token of a flagged conversation: position, redacted text, role, request and the
    feature values the rules used.
    """

    position: int
    text: str | None  # redacted; None when the client sent no token text
    role: str
    request_id: str
    features: Mapping[str, float | None]  # qualified feature name -> value at this token


@dataclass(frozen=True)
class AlertRecord:
    """One stored alert: which rule fired where, with its value, message and labels."""

    conversation_id: str
    request_id: str
    rule: str
    rule_set_hash: str
    category: str
    severity: str
    value: float | None
    position: int
    start: int
    end: int
    feature_values: Mapping[str, float | None]
    message: str
    labels: Mapping[str, str]
    created_at: datetime | None
    id: int | None = None  # assigned by the store


@dataclass(frozen=True)
class ConversationWrite:
    """Everything one step adds to one flagged conversation (written in the step's transaction)."""

    conversation_id: str
    model: str
    at: datetime
    hook_points: tuple[str, ...] = ()
    ended: bool = False
    tokens: tuple[TokenRecord, ...] = ()
    alerts: tuple[AlertRecord, ...] = ()


@dataclass(frozen=True)
class AuditQuery:
    """Filters of the read side; alert filters select conversations with a matching alert."""

    since: datetime | None = None
    rule: str | None = None
    category: str | None = None
    severity: str | None = None
    model: str | None = None
    limit: int | None = 1000


@dataclass(frozen=True)
class ConversationSummary:
    """One flagged conversation as `audit list` shows it."""

    conversation_id: str
    model: str
    first_flagged_at: datetime | None
    updated_at: datetime | None
    ended: bool
    alert_count: int
    token_count: int
    rules: tuple[str, ...]
    max_severity: str


@dataclass
class ConversationRecord:
    """Everything stored about one conversation (`audit show`), with a warning per damaged row."""

    summary: ConversationSummary
    hook_points: tuple[str, ...]
    tokens: list[TokenRecord]
    alerts: list[AlertRecord]
    warnings: list[str] = field(default_factory=list)

    @property
    def request_ids(self) -> tuple[str, ...]:
        """The conversation's request ids, in order of first appearance."""
        seen = dict.fromkeys(t.request_id for t in self.tokens)
        seen.update(dict.fromkeys(a.request_id for a in self.alerts))
        return tuple(seen)


class AuditStore:
    """Interface of an audit backend. Thread-safe; one transaction per `write` call."""

    dialect = "abstract"

    def write(self, writes: Sequence[ConversationWrite]) -> None:
        """Write one step's conversation updates in one transaction."""
        raise NotImplementedError

    def list_conversations(self, query: AuditQuery = AuditQuery()) -> list[ConversationSummary]:
        """Flagged conversations matching `query`, most recently updated first."""
        raise NotImplementedError

    def list_alerts(self, query: AuditQuery = AuditQuery()) -> list[AlertRecord]:
        """Alerts matching `query`."""
        raise NotImplementedError

    def get_conversation(self, conversation_id: str) -> ConversationRecord | None:
        """One conversation with its tokens and alerts; None when it is not stored."""
        raise NotImplementedError

    def purge(self, older_than: datetime) -> int:
        """Delete conversations with no activity since `older_than`; returns how many."""
        raise NotImplementedError

    def schema_version(self) -> int:
        """The schema version the store is at."""
        raise NotImplementedError

    def ping(self) -> None:
        """Raise if the store cannot be reached now."""
        self.schema_version()

    def close(self) -> None:
        """Release the connection."""
        raise NotImplementedError

    def iter_conversations(self, query: AuditQuery = AuditQuery()) -> Iterator[ConversationRecord]:
        """The full records of the conversations matching `query` (`audit export`)."""
        for summary in self.list_conversations(query):
            record = self.get_conversation(summary.conversation_id)
            if record is not None:
                yield record


# The audit backends, chosen here and nowhere else: by the URL's scheme.
SQLITE_SCHEME = "sqlite:///"
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def open_store(url: str, *, readonly: bool = False) -> AuditStore:
    """`sqlite:///relative.db`, `sqlite:////absolute.db` or `postgresql://user@host:port/db`.

    `readonly`: for readers (the review CLI and page) of a store a sidecar may be writing. A
    SQLite file is then opened read-only and neither migrated nor switched to WAL, so opening
    it never competes for the writer's lock.

    >>> store = open_store("sqlite:///audit.db")
    >>> store.list_conversations(AuditQuery(limit=10))
    []
    """
    path = sqlite_path(url)
    if path is not None:
        from monitor.audit.sqlite_store import SqliteAuditStore

        return SqliteAuditStore(path, readonly=readonly)
    if url.startswith(POSTGRES_SCHEMES):
        from monitor.audit.postgres_store import PostgresAuditStore

        return PostgresAuditStore(url)
    raise StoreError(f"unsupported audit store URL {url!r}: use sqlite:///PATH or postgresql://...")


def sqlite_path(url: str) -> str | None:
    """The file behind a sqlite URL (None for other URLs)."""
    return url.removeprefix(SQLITE_SCHEME) if url.startswith(SQLITE_SCHEME) else None


def is_store_url(url: str) -> bool:
    """Whether `open_store` knows the URL's scheme."""
    return url.startswith((SQLITE_SCHEME, *POSTGRES_SCHEMES))


def _dumps(value: Mapping[str, Any]) -> str:
    # NaN/Inf are not JSON; a value the encoder could not compute is stored as null.
    clean = {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in value.items()
    }
    return json.dumps(clean, sort_keys=True, separators=(",", ":"))


def alert_key(alert: AlertRecord) -> str:
    """The identity of a firing: this rule, over this span, in this conversation and request,
    under this rule set. The same firing written twice is one alert."""
    parts = (
        alert.conversation_id,
        alert.request_id,
        alert.rule,
        alert.rule_set_hash,
        str(alert.position),
        str(alert.start),
        str(alert.end),
    )
    digest = hashlib.sha256("\0".join(parts).encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def _finite(value: float | None) -> float | None:
    return value if value is None or math.isfinite(value) else None


_TOKEN_UPSERT = """INSERT INTO tokens (conversation_id, position, request_id, role, text, features)
VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (conversation_id, position) DO UPDATE SET request_id = excluded.request_id,
  role = excluded.role, text = excluded.text, features = excluded.features"""

_CONVERSATION_UPSERT = """INSERT INTO conversations
  (conversation_id, model, hook_points, first_flagged_at, updated_at, ended)
VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (conversation_id) DO UPDATE SET updated_at = excluded.updated_at,
  model = excluded.model,
  hook_points = CASE WHEN excluded.hook_points = '[]' THEN conversations.hook_points
                     ELSE excluded.hook_points END,
  ended = CASE WHEN excluded.ended = 1 THEN 1 ELSE conversations.ended END"""

# Idempotent: the key names the firing (see `alert_key`), so writing it again (a transaction
# retried after its COMMIT reply was lost, a spool replayed) leaves the one row there is.
_ALERT_INSERT = """INSERT INTO alerts (conversation_id, request_id, rule, rule_set_hash, category,
  severity, value, position, start_position, end_position, feature_values, message, labels,
  created_at, alert_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (alert_key) DO NOTHING"""

_ALERT_COLUMNS = """id, conversation_id, request_id, rule, rule_set_hash, category, severity, value,
  position, start_position, end_position, feature_values, message, labels, created_at"""


class _Decoder:
    """Decodes stored columns, collecting a warning for each one that is damaged."""

    def __init__(self, read_ts: Any) -> None:
        self.warnings: list[str] = []
        self._read_ts = read_ts

    def json_map(self, raw: Any, where: str) -> dict[str, Any]:
        try:
            value = json.loads(raw)
        except (TypeError, ValueError):
            value = None
        if not isinstance(value, dict):
            self.warnings.append(f"{where}: malformed JSON {str(raw)[:40]!r}")
            return {}
        return value

    def json_list(self, raw: Any, where: str) -> list[str]:
        try:
            value = json.loads(raw)
        except (TypeError, ValueError):
            value = None
        if not isinstance(value, list):
            self.warnings.append(f"{where}: malformed JSON {str(raw)[:40]!r}")
            return []
        return [str(v) for v in value]

    def number_map(self, raw: Any, where: str) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for key, value in self.json_map(raw, where).items():
            ok = value is None or (isinstance(value, int | float) and not isinstance(value, bool))
            if not ok:
                self.warnings.append(f"{where}: feature {key!r} is not a number")
            out[str(key)] = float(value) if ok and value is not None else None
        return out

    def ts(self, raw: Any, where: str) -> datetime | None:
        try:
            return self._read_ts(raw)
        except (TypeError, ValueError):
            self.warnings.append(f"{where}: malformed timestamp {str(raw)[:40]!r}")
            return None

    def text(self, raw: Any, where: str) -> str:
        if isinstance(raw, str):
            return raw
        self.warnings.append(f"{where}: missing text")
        return CORRUPT

    def number(self, raw: Any, where: str) -> float | None:
        if raw is None or isinstance(raw, int | float):
            return None if raw is None else float(raw)
        self.warnings.append(f"{where}: value {str(raw)[:20]!r} is not a number")
        return None


class SqlAuditStore(AuditStore):
    """SQL shared by both backends; subclasses provide connections, locking and timestamps."""

    placeholder = "?"

    def __init__(self) -> None:
        self._lock = threading.Lock()

    # --- backend hooks -------------------------------------------------------------------
    def _transaction(self, write: bool) -> AbstractContextManager[Any]:
        raise NotImplementedError

    def _lock_for_migration(self, cursor: Any) -> None:
        """Serialise concurrent migrations (SQLite: BEGIN IMMEDIATE already does)."""

    def _write_ts(self, value: datetime) -> Any:
        return value

    def _read_ts(self, value: Any) -> datetime:
        if not isinstance(value, datetime):
            raise TypeError(f"not a timestamp: {value!r}")
        return value

    # --- shared implementation -------------------------------------------------------------
    def _sql(self, statement: str) -> str:
        return statement if self.placeholder == "?" else statement.replace("?", self.placeholder)

    def _migrate(self) -> list[int]:
        with self._lock, self._transaction(write=True) as cur:
            self._lock_for_migration(cur)
            return migrations.migrate(cur, self.dialect, self.placeholder)

    def schema_version(self) -> int:
        """The schema version the store is at (migrations applied)."""
        with self._lock, self._transaction(write=False) as cur:
            return migrations.current_version(cur)

    def ping(self) -> None:
        """Raise if the store cannot be reached now (the writer's idle health probe)."""
        with self._lock, self._transaction(write=False) as cur:
            cur.execute("SELECT 1")
            cur.fetchall()

    def write(self, writes: Sequence[ConversationWrite]) -> None:
        """Write one step's conversation updates in one transaction (see AuditStore.write)."""
        if not writes:
            return
        with self._lock, self._transaction(write=True) as cur:
            for item in writes:
                self._write_one(cur, item)

    def _write_one(self, cur: Any, item: ConversationWrite) -> None:
        at = self._write_ts(item.at)
        cur.execute(
            self._sql(_CONVERSATION_UPSERT),
            (
                item.conversation_id,
                item.model,
                json.dumps(list(item.hook_points)),
                at,
                at,
                int(item.ended),
            ),
        )
        if item.tokens:
            cur.executemany(
                self._sql(_TOKEN_UPSERT),
                [
                    (
                        item.conversation_id,
                        t.position,
                        t.request_id,
                        t.role,
                        t.text,
                        _dumps(t.features),
                    )
                    for t in item.tokens
                ],
            )
        if item.alerts:
            rows = [self._alert_row(a, item.at) for a in item.alerts]
            cur.executemany(self._sql(_ALERT_INSERT), rows)

    def _alert_row(self, a: AlertRecord, at: datetime) -> tuple[Any, ...]:
        return (
            a.conversation_id,
            a.request_id,
            a.rule,
            a.rule_set_hash,
            a.category,
            a.severity,
            _finite(a.value),
            a.position,
            a.start,
            a.end,
            _dumps(a.feature_values),
            a.message,
            json.dumps(dict(a.labels), sort_keys=True),
            self._write_ts(a.created_at or at),
            alert_key(a),
        )

    def _alert_filter(self, query: AuditQuery, alias: str) -> tuple[list[str], list[Any]]:
        clauses, params = [], []
        if query.since is not None:
            clauses.append(f"{alias}.created_at >= ?")
            params.append(self._write_ts(query.since))
        for column in ("rule", "category", "severity"):
            value = getattr(query, column)
            if value is not None:
                clauses.append(f"{alias}.{column} = ?")
                params.append(value)
        return clauses, params

    def list_conversations(self, query: AuditQuery = AuditQuery()) -> list[ConversationSummary]:
        """Flagged conversations matching `query`, most recently updated first."""
        clauses, params = self._alert_filter(query, "a")
        where = []
        if clauses:
            where.append(
                "EXISTS (SELECT 1 FROM alerts a WHERE a.conversation_id = c.conversation_id AND "
                + " AND ".join(clauses)
                + ")"
            )
        if query.model is not None:
            where.append("c.model = ?")
            params.append(query.model)
        sql = (
            "SELECT c.conversation_id, c.model, c.first_flagged_at, c.updated_at, c.ended, "
            "(SELECT COUNT(*) FROM tokens t WHERE t.conversation_id = c.conversation_id) "
            "FROM conversations c"
            + (" WHERE " + " AND ".join(where) if where else "")
            + " ORDER BY c.updated_at DESC, c.conversation_id"
        )
        if query.limit is not None:
            sql += " LIMIT ?"
            params.append(query.limit)
        with self._lock, self._transaction(write=False) as cur:
            cur.execute(self._sql(sql), params)
            rows = cur.fetchall()
            alert_rows = self._alert_rules(cur, [r[0] for r in rows])
        return [
            self._summary(row, alert_rows.get(row[0], []), _Decoder(self._read_ts)) for row in rows
        ]

    def _alert_rules(self, cur: Any, ids: Sequence[str]) -> dict[str, list[tuple[str, str]]]:
        out: dict[str, list[tuple[str, str]]] = {}
        for start in range(0, len(ids), 500):  # stay under SQLite's bound-parameter limit
            chunk = ids[start : start + 500]
            marks = ", ".join("?" * len(chunk))
            cur.execute(
                self._sql(
                    "SELECT conversation_id, rule, severity FROM alerts "
                    f"WHERE conversation_id IN ({marks}) ORDER BY id"
                ),
                list(chunk),
            )
            for conversation_id, rule, severity in cur.fetchall():
                out.setdefault(conversation_id, []).append((str(rule), str(severity)))
        return out

    def _summary(
        self, row: Sequence[Any], alerts: list[tuple[str, str]], dec: _Decoder
    ) -> ConversationSummary:
        conversation_id, model, first, updated, ended, token_count = row
        severities = [s for _, s in alerts]
        return ConversationSummary(
            conversation_id=conversation_id,
            model=dec.text(model, "conversation model"),
            first_flagged_at=dec.ts(first, "conversation first_flagged_at"),
            updated_at=dec.ts(updated, "conversation updated_at"),
            ended=bool(ended),
            alert_count=len(alerts),
            token_count=int(token_count),
            rules=tuple(dict.fromkeys(r for r, _ in alerts)),
            max_severity=max(severities, key=lambda s: SEVERITY_ORDER.get(s, -1), default=""),
        )

    def list_alerts(self, query: AuditQuery = AuditQuery()) -> list[AlertRecord]:
        """Alerts matching `query`, newest first."""
        clauses, params = self._alert_filter(query, "a")
        if query.model is not None:
            clauses.append("c.model = ?")
            params.append(query.model)
        sql = (
            f"SELECT {', '.join('a.' + c.strip() for c in _ALERT_COLUMNS.split(','))} "
            "FROM alerts a JOIN conversations c ON c.conversation_id = a.conversation_id"
            + (" WHERE " + " AND ".join(clauses) if clauses else "")
            + " ORDER BY a.id DESC"
        )
        if query.limit is not None:
            sql += " LIMIT ?"
            params.append(query.limit)
        with self._lock, self._transaction(write=False) as cur:
            cur.execute(self._sql(sql), params)
            rows = cur.fetchall()
        dec = _Decoder(self._read_ts)
        return [self._alert(row, dec) for row in rows]

    def _alert(self, row: Sequence[Any], dec: _Decoder) -> AlertRecord:
        (aid, cid, rid, rule, rhash, cat, sev, value, pos, start, end, fv, msg, labels, ts) = row
        where = f"alert {aid}"
        return AlertRecord(
            conversation_id=cid,
            request_id=dec.text(rid, where),
            rule=dec.text(rule, where),
            rule_set_hash=dec.text(rhash, where),
            category=dec.text(cat, where),
            severity=dec.text(sev, where),
            value=dec.number(value, where),
            position=int(pos),
            start=int(start),
            end=int(end),
            feature_values=dec.number_map(fv, f"{where} feature_values"),
            message=dec.text(msg, where),
            labels={str(k): str(v) for k, v in dec.json_map(labels, f"{where} labels").items()},
            created_at=dec.ts(ts, f"{where} created_at"),
            id=int(aid),
        )

    def get_conversation(self, conversation_id: str) -> ConversationRecord | None:
        """One conversation with its tokens and alerts (damaged rows become warnings); None if
        absent."""
        with self._lock, self._transaction(write=False) as cur:
            cur.execute(
                self._sql(
                    "SELECT conversation_id, model, first_flagged_at, updated_at, ended, "
                    "hook_points FROM conversations WHERE conversation_id = ?"
                ),
                (conversation_id,),
            )
            head = cur.fetchone()
            if head is None:
                return None
            cur.execute(
                self._sql(
                    "SELECT position, text, role, request_id, features FROM tokens "
                    "WHERE conversation_id = ? ORDER BY position"
                ),
                (conversation_id,),
            )
            token_rows = cur.fetchall()
            cur.execute(
                self._sql(
                    f"SELECT {_ALERT_COLUMNS} FROM alerts WHERE conversation_id = ? "
                    "ORDER BY position, id"
                ),
                (conversation_id,),
            )
            alert_rows = cur.fetchall()
        return self._record(head, token_rows, alert_rows)

    def _record(
        self, head: Sequence[Any], token_rows: list[Any], alert_rows: list[Any]
    ) -> ConversationRecord:
        dec = _Decoder(self._read_ts)
        alerts = [self._alert(row, dec) for row in alert_rows]
        tokens = [self._token(row, dec) for row in token_rows]
        hooks = dec.json_list(head[5], "conversation hook_points")
        summary = self._summary(
            (*head[:5], len(tokens)), [(a.rule, a.severity) for a in alerts], dec
        )
        return ConversationRecord(summary, tuple(hooks), tokens, alerts, dec.warnings)

    def _token(self, row: Sequence[Any], dec: _Decoder) -> TokenRecord:
        position, text, role, request_id, features = row
        where = f"token {position}"
        return TokenRecord(
            position=int(position),
            text=text if text is None or isinstance(text, str) else dec.text(None, where),
            role=dec.text(role, where),
            request_id=dec.text(request_id, where),
            features=dec.number_map(features, f"{where} features"),
        )

    def purge(self, older_than: datetime) -> int:
        """Delete conversations with no activity since `older_than`; returns how many."""
        cutoff = self._write_ts(older_than)
        old = "SELECT conversation_id FROM conversations WHERE updated_at < ?"
        with self._lock, self._transaction(write=True) as cur:
            # Labels first: they reference the alerts (a foreign key PostgreSQL enforces).
            cur.execute(
                self._sql(f"DELETE FROM labels WHERE conversation_id IN ({old})"), (cutoff,)
            )
            cur.execute(
                self._sql(f"DELETE FROM tokens WHERE conversation_id IN ({old})"), (cutoff,)
            )
            cur.execute(
                self._sql(f"DELETE FROM alerts WHERE conversation_id IN ({old})"), (cutoff,)
            )
            cur.execute(self._sql("DELETE FROM conversations WHERE updated_at < ?"), (cutoff,))
            return int(cur.rowcount)
