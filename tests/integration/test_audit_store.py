"""The audit store against real databases: SQLite always, PostgreSQL on a throwaway server."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from monitor.audit import migrations
from monitor.audit.store import (
    AlertRecord,
    AuditQuery,
    AuditStore,
    ConversationWrite,
    StoreError,
    TokenRecord,
    open_store,
)

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


_db_counter = iter(range(1_000_000))


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'audit.db'}"
    base = request.getfixturevalue("pg_url")
    import psycopg

    name = f"audit_{next(_db_counter)}"  # a fresh database per test
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return base.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture
def store(store_url: str) -> Iterator[AuditStore]:
    s = open_store(store_url)
    yield s
    s.close()


def alert(cid: str, rule: str = "sustained-deception", **kw: object) -> AlertRecord:
    fields: dict = dict(
        conversation_id=cid,
        request_id="req-1",
        rule=rule,
        rule_set_hash="abc123",
        category="deception",
        severity="critical",
        value=2.75,
        position=3,
        start=1,
        end=3,
        feature_values={"probes/deception": 2.75},
        message="deception 2.75",
        labels={"team": "trust"},
        created_at=NOW,
    )
    fields.update(kw)
    return AlertRecord(**fields)


def conversation(
    cid: str, at: datetime = NOW, model: str = "gemma", **kw: object
) -> ConversationWrite:
    tokens = tuple(
        TokenRecord(i, f"t{i}", "assistant", "req-1", {"probes/deception": float(i)})
        for i in range(4)
    )
    return ConversationWrite(cid, model, at, ("layers.12",), False, tokens, (alert(cid),), **kw)


def test_migrations_from_empty_and_reopen_is_idempotent(store_url: str) -> None:
    first = open_store(store_url)
    assert first.schema_version() == migrations.LATEST_VERSION
    first.write([conversation("c1")])
    first.close()
    again = open_store(store_url)
    assert again.schema_version() == migrations.LATEST_VERSION
    assert [s.conversation_id for s in again.list_conversations()] == ["c1"]
    again.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'a.db'}"
    open_store(url).close()
    with sqlite3.connect(tmp_path / "a.db") as conn:
        conn.execute("INSERT INTO schema_version VALUES (99, 'future', 'x')")
    with pytest.raises(migrations.SchemaError, match="newer"):
        open_store(url)


def test_unknown_url_is_rejected() -> None:
    with pytest.raises(StoreError, match="unsupported"):
        open_store("mysql://x")


def test_write_and_read_back(store: AuditStore) -> None:
    store.write([conversation("c1")])
    record = store.get_conversation("c1")
    assert record is not None and record.warnings == []
    assert record.summary.model == "gemma" and record.hook_points == ("layers.12",)
    assert [t.text for t in record.tokens] == ["t0", "t1", "t2", "t3"]
    assert record.tokens[2].features == {"probes/deception": 2.0}
    (a,) = record.alerts
    assert (a.rule, a.rule_set_hash, a.value, a.start, a.end) == (
        "sustained-deception",
        "abc123",
        2.75,
        1,
        3,
    )
    assert a.labels == {"team": "trust"} and a.created_at == NOW
    assert record.request_ids == ("req-1",)


def test_later_writes_extend_and_end_a_conversation(store: AuditStore) -> None:
    store.write([conversation("c1")])
    more = ConversationWrite(
        "c1",
        "gemma",
        NOW + timedelta(seconds=5),
        ended=True,
        tokens=(TokenRecord(4, "end", "assistant", "req-2", {}),),
    )
    store.write([more])
    record = store.get_conversation("c1")
    assert record is not None
    assert record.summary.ended and len(record.tokens) == 5
    assert record.hook_points == ("layers.12",)  # kept when a later write names none
    assert record.request_ids == ("req-1", "req-2")


def test_filters(store: AuditStore) -> None:
    store.write([conversation("c1"), conversation("c2", model="llama")])
    store.write(
        [
            ConversationWrite(
                "c3",
                "gemma",
                NOW,
                alerts=(
                    alert(
                        "c3",
                        rule="biased-hiring",
                        category="bias",
                        severity="warning",
                        created_at=NOW - timedelta(days=3),
                    ),
                ),
            )
        ]
    )
    ids = lambda **kw: sorted(s.conversation_id for s in store.list_conversations(AuditQuery(**kw)))  # noqa: E731
    assert ids() == ["c1", "c2", "c3"]
    assert ids(model="llama") == ["c2"]
    assert ids(rule="biased-hiring") == ["c3"]
    assert ids(category="deception") == ["c1", "c2"]
    assert ids(severity="warning") == ["c3"]
    assert ids(since=NOW - timedelta(days=1)) == ["c1", "c2"]
    assert ids(limit=1) in (["c1"], ["c2"], ["c3"])
    alerts = store.list_alerts(AuditQuery(category="bias"))
    assert [a.conversation_id for a in alerts] == ["c3"]
    summary = next(s for s in store.list_conversations() if s.conversation_id == "c1")
    assert (summary.alert_count, summary.token_count, summary.max_severity) == (1, 4, "critical")


def test_purge_deletes_only_old_conversations(store: AuditStore) -> None:
    store.write([conversation("old", at=NOW - timedelta(days=40)), conversation("new")])
    assert store.purge(NOW - timedelta(days=30)) == 1
    assert store.get_conversation("old") is None
    assert [s.conversation_id for s in store.list_conversations()] == ["new"]
    assert store.list_alerts() and all(a.conversation_id == "new" for a in store.list_alerts())


def test_a_write_is_one_transaction(store: AuditStore) -> None:
    good = conversation("c1")
    bad = ConversationWrite("c2", None, NOW)  # type: ignore[arg-type]  # model NOT NULL
    with pytest.raises(Exception):  # noqa: B017 - the driver's own error type
        store.write([good, bad])
    assert store.list_conversations() == []


def test_corrupt_rows_are_read_with_warnings(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    store = open_store(f"sqlite:///{path}")
    store.write([conversation("c1")])
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE tokens SET features = '{not json' WHERE position = 1")
        conn.execute("UPDATE tokens SET text = NULL WHERE position = 2")
        conn.execute("UPDATE alerts SET labels = '[1,', created_at = 'yesterday'")
        conn.execute("UPDATE conversations SET hook_points = 'oops'")
    record = store.get_conversation("c1")
    store.close()
    assert record is not None
    assert record.tokens[1].features == {} and record.tokens[2].text is None
    assert record.alerts[0].labels == {} and record.alerts[0].created_at is None
    assert len(record.warnings) == 4
