"""Reviewer labels, the review list query and `audit export --labeled`, on SQLite and a real
PostgreSQL; the review config and the pack-metadata reader."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

from monitor.audit import labels as L
from monitor.audit import migrations
from monitor.audit.cli import main as audit_main
from monitor.audit.redaction import Redactor, redact_identifier
from monitor.audit.review.config import ReviewConfigError, parse_review_config
from monitor.audit.review.packs import read_pack_features
from monitor.audit.store import (
    AlertRecord,
    AuditStore,
    ConversationWrite,
    TokenRecord,
    open_store,
)
from monitor.features import FeatureInfo, FeaturePack, HookPointEncoder, RestrictedEncoder
from monitor.features import save_pack as save_feature_pack
from tests.pg_server import start_pg_server

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    server = start_pg_server()
    try:
        yield server.url
    finally:
        server.stop()


_db_counter = iter(range(1_000_000))


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'audit.db'}"
    base = request.getfixturevalue("pg_url")
    import psycopg

    name = f"review_{next(_db_counter)}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return base.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture
def store(store_url: str) -> Iterator[AuditStore]:
    s = open_store(store_url)
    yield s
    s.close()


def _alert(cid: str, rule: str, category: str, severity: str, at: datetime, pos: int = 2):
    return AlertRecord(
        cid, "req-1", rule, "hash-1", category, severity, 2.5, pos, pos - 1, pos,
        {"p/x": 2.5}, f"{rule} fired", {}, at,
    )  # fmt: skip


def _conversation(
    cid: str,
    at: datetime,
    alerts: tuple[tuple[str, str, str], ...] = (("deceive", "deception", "critical"),),
    model: str = "gemma",
) -> ConversationWrite:
    tokens = (
        TokenRecord(0, "Be honest.", "user", "req-0", {}),
        TokenRecord(1, " I", "assistant", "req-1", {"p/x": 0.5}),
        TokenRecord(2, " lied", "assistant", "req-1", {"p/x": 2.5}),
        TokenRecord(3, ".", "assistant", "req-1", {"p/x": 0.0}),
    )
    return ConversationWrite(
        cid, model, at, ("layers.3",), False, tokens,
        tuple(_alert(cid, r, c, s, at) for r, c, s in alerts),
    )  # fmt: skip


def _alert_ids(store: AuditStore, cid: str) -> list[int]:
    record = store.get_conversation(cid)
    assert record is not None
    return [a.id for a in record.alerts if a.id is not None]


def test_labels_table_is_a_migration(store: AuditStore) -> None:
    assert store.schema_version() == migrations.LATEST_VERSION >= 3
    assert any(m.version == 3 and "labels" in m.description for m in migrations.MIGRATIONS)


def test_add_label_records_who_when_and_history(store: AuditStore) -> None:
    store.write([_conversation("c1", NOW)])
    (aid,) = _alert_ids(store, "c1")
    first = L.add_label(store, aid, L.TRUE_POSITIVE, "clear lie", "alice", NOW)
    second = L.add_label(store, aid, L.FALSE_POSITIVE, "", "bob", NOW + timedelta(minutes=1))
    labels = L.labels_for(store, "c1")
    assert [(lab.verdict, lab.labeler, lab.note) for lab in labels] == [
        ("true_positive", "alice", "clear lie"),
        ("false_positive", "bob", ""),
    ]
    assert labels[0].created_at == NOW and first.id < second.id
    assert L.current_labels(labels)[aid].verdict == "false_positive"


def test_bad_labels_are_refused(store: AuditStore) -> None:
    store.write([_conversation("c1", NOW)])
    (aid,) = _alert_ids(store, "c1")
    with pytest.raises(L.LabelError, match="verdict"):
        L.add_label(store, aid, "maybe", "", "alice", NOW)
    with pytest.raises(L.LabelError, match="no alert 999"):
        L.add_label(store, 999, L.TRUE_POSITIVE, "", "alice", NOW)
    with pytest.raises(L.LabelError, match="note"):
        L.add_label(store, aid, L.TRUE_POSITIVE, "x" * 5000, "alice", NOW)
    assert L.labels_for(store, "c1") == []


def test_list_filters_status_and_keyset_paging(store: AuditStore) -> None:
    writes = [
        _conversation(f"c{i:02d}", NOW - timedelta(minutes=i), model="llama" if i % 3 else "gemma")
        for i in range(25)
    ]
    writes.append(
        _conversation("bias-1", NOW - timedelta(days=3), (("stereotype", "bias", "warning"),))
    )
    store.write(writes)
    L.add_label(store, _alert_ids(store, "c01")[0], L.TRUE_POSITIVE, "", "alice", NOW)
    L.add_label(store, _alert_ids(store, "c02")[0], L.FALSE_POSITIVE, "", "alice", NOW)
    L.add_label(store, _alert_ids(store, "c03")[0], L.TRUE_POSITIVE, "", "alice", NOW)
    L.add_label(store, _alert_ids(store, "c03")[0], L.ESCALATE, "", "bob", NOW)  # newest wins

    def ids(**kw: object) -> list[str]:
        return [r.conversation_id for r in L.list_review(store, L.ReviewQuery(limit=100, **kw))]

    everything = ids()
    assert everything == [f"c{i:02d}" for i in range(25)] + ["bias-1"]  # newest first
    assert ids(rule="stereotype") == ["bias-1"] == ids(category="bias") == ids(severity="warning")
    assert ids(model="llama") == [f"c{i:02d}" for i in range(25) if i % 3]
    assert ids(since=NOW - timedelta(days=1)) == everything[:-1]
    assert ids(until=NOW - timedelta(days=1)) == ["bias-1"]
    assert ids(status="true_positive") == ["c01"]
    assert ids(status="false_positive") == ["c02"]
    assert ids(status="escalate") == ["c03"]
    assert ids(status="reviewed") == ["c01", "c02", "c03"]
    assert "c01" not in ids(status="unreviewed") and len(ids(status="unreviewed")) == 23
    row = next(r for r in L.list_review(store, L.ReviewQuery()) if r.conversation_id == "c03")
    assert row.verdicts == {"escalate": 1} and row.unreviewed == 0
    assert row.token_count == 4 and row.rules == ("deceive",) and row.max_severity == "critical"
    # Keyset paging: every row exactly once, in order, pages of 7.
    seen: list[str] = []
    after = None
    for _ in range(10):
        page = L.list_review(store, L.ReviewQuery(limit=7, after=after))
        if not page:
            break
        seen += [r.conversation_id for r in page]
        last = page[-1]
        assert last.updated_at is not None
        after = (last.updated_at, last.conversation_id)
    assert seen == everything


def test_rule_filter_gives_the_same_rows_on_both_query_plans(
    store: AuditStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.write(
        [_conversation(f"c{i}", NOW - timedelta(minutes=i),
                       (("deceive" if i % 3 else "stereotype", "deception", "critical"),))
         for i in range(12)]
    )  # fmt: skip
    query = L.ReviewQuery(rule="stereotype", since=NOW - timedelta(minutes=7), limit=100)
    rare = [r.conversation_id for r in L.list_review(store, query)]  # from the rule's alerts
    monkeypatch.setattr(L, "RARE_RULE_ALERTS", 0)
    common = [r.conversation_id for r in L.list_review(store, query)]  # walking conversations
    assert rare == common == ["c0", "c3", "c6"]


def test_same_timestamp_pages_by_conversation_id(store: AuditStore) -> None:
    store.write([_conversation(f"s{i}", NOW) for i in range(5)])
    first = L.list_review(store, L.ReviewQuery(limit=2))
    assert first[-1].updated_at is not None
    rest = L.list_review(
        store, L.ReviewQuery(limit=10, after=(first[-1].updated_at, first[-1].conversation_id))
    )
    assert [r.conversation_id for r in first + rest] == [f"s{i}" for i in reversed(range(5))]


def test_purge_removes_labels_with_their_conversation(store: AuditStore) -> None:
    store.write([_conversation("old", NOW - timedelta(days=40)), _conversation("new", NOW)])
    L.add_label(store, _alert_ids(store, "old")[0], L.TRUE_POSITIVE, "", "alice", NOW)
    L.add_label(store, _alert_ids(store, "new")[0], L.TRUE_POSITIVE, "", "alice", NOW)
    assert store.purge(NOW - timedelta(days=30)) == 1
    assert L.labels_for(store, "old") == []
    assert len(L.labels_for(store, "new")) == 1


def test_dataset_records_follow_the_labeled_format(store: AuditStore) -> None:
    two = (("deceive", "deception", "critical"), ("stereotype", "bias", "warning"))
    store.write([_conversation("c1", NOW, two)])
    deceive, stereotype = _alert_ids(store, "c1")
    L.add_label(store, deceive, L.FALSE_POSITIVE, "sarcasm", "alice", NOW)
    L.add_label(store, stereotype, L.ESCALATE, "", "bob", NOW)
    record = store.get_conversation("c1")
    assert record is not None
    labels = L.labels_for(store, "c1")
    (item,) = L.dataset_records(record, labels)  # escalate left out by default
    assert item == {
        "id": "review:c1:deception",
        "task": "deception",
        "label": 0,
        "split": "calibrate",
        "category": "deceive",
        "group": "review:c1",
        "turns": [
            {"role": "user", "text": "Be honest."},
            {"role": "assistant", "text": " I lied."},
        ],
        "source": "review:alice",
        "label_roles": ["assistant"],
    }
    both = L.dataset_records(record, labels, include_escalate=True)
    assert [(r["task"], r["label"], r["source"]) for r in both] == [
        ("bias", 1, "review:bob"),
        ("deception", 0, "review:alice"),
    ]


def test_export_labeled_cli(store_url: str, tmp_path: Path, capsys) -> None:
    store = open_store(store_url)
    store.write([_conversation("c1", NOW), _conversation("c2", NOW), _conversation("c3", NOW)])
    L.add_label(store, _alert_ids(store, "c2")[0], L.TRUE_POSITIVE, "", "alice", NOW)
    L.add_label(store, _alert_ids(store, "c3")[0], L.ESCALATE, "", "alice", NOW)
    store.close()
    out = tmp_path / "labeled.jsonl"
    assert (
        audit_main(["audit", "export", "--store", store_url, "--labeled", "--out", str(out)]) == 0
    )
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["id"], r["label"]) for r in lines] == [("review:c2:deception", 1)]
    assert "exported 1 labeled record(s)" in capsys.readouterr().err
    argv = ["audit", "export", "--store", store_url, "--labeled", "--include-escalate"]
    assert audit_main(argv) == 0
    printed = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["id"] for r in printed] == ["review:c2:deception", "review:c3:deception"]
    assert audit_main([*argv, "--rule", "x"]) == 2  # filters do not apply to --labeled


# --- config and pack metadata ------------------------------------------------------------------


def _token_file(tmp_path: Path, text: str = "t" * 32) -> str:
    (tmp_path / "alice.token").write_text(text + "\n")
    return "alice.token"


def test_config_requires_some_authentication(tmp_path: Path) -> None:
    with pytest.raises(ReviewConfigError, match="no anonymous access unless explicitly"):
        parse_review_config({"store": "sqlite:///a.db"}, tmp_path, "review.yaml")
    with pytest.raises(ReviewConfigError, match="allowed_identities: required"):
        parse_review_config(
            {"store": "sqlite:///a.db", "auth": {"identity_header": "X-Forwarded-Email"}},
            tmp_path,
            "review.yaml",
        )
    short = _token_file(tmp_path, "short")
    with pytest.raises(ReviewConfigError, match="fewer than 16"):
        parse_review_config(
            {"store": "sqlite:///a.db", "auth": {"tokens": [{"name": "a", "token_file": short}]}},
            tmp_path,
            "review.yaml",
        )
    with pytest.raises(ReviewConfigError, match="unknown key"):
        parse_review_config({"store": "sqlite:///a.db", "auth": {"anon": True}}, tmp_path, "r")
    # "|" separates a session cookie's fields: "alice|<far future>" would sign a session that
    # reads as alice's and never expires.
    for name in ("alice|99999999999", "bo\x07b"):
        token = _token_file(tmp_path)
        with pytest.raises(ReviewConfigError, match=r"no '\|' or control characters"):
            parse_review_config(
                {
                    "store": "sqlite:///a.db",
                    "auth": {"tokens": [{"name": name, "token_file": token}]},
                },
                tmp_path,
                "review.yaml",
            )


def _login_cookie_over_http(config: Any) -> str:
    """POST /login over plain http straight into the ASGI app; the Set-Cookie header."""
    from monitor.audit.review.app import create_app

    app = create_app(config)
    body = f"token={'t' * 32}&next=/conversations".encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/login",
        "raw_path": b"/login",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/x-www-form-urlencoded")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8088),
    }
    messages: list[dict[str, Any]] = []
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        return pending.pop() if pending else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    try:
        asyncio.run(app.asgi(scope, receive, send))
    finally:
        app.close()
    assert messages[0]["status"] == 303
    return next(v.decode() for k, v in messages[0]["headers"] if k == b"set-cookie")


def test_secure_cookie_marks_the_session_cookie_behind_a_tls_proxy(tmp_path: Path) -> None:
    # Behind an Ingress that terminates TLS the page sees http; `secure_cookie: true` (as the
    # deploy configs set it) still marks the session cookie Secure.
    def config(**auth: Any) -> Any:
        tokens = [{"name": "alice", "token_file": _token_file(tmp_path)}]
        raw = {"store": "sqlite:///audit.db", "auth": {"tokens": tokens, **auth}}
        return parse_review_config(raw, tmp_path, "review.yaml")

    assert "secure" not in _login_cookie_over_http(config()).lower()
    cookie = _login_cookie_over_http(config(secure_cookie=True))
    assert "; secure" in cookie.lower() and "httponly" in cookie.lower()
    with pytest.raises(ReviewConfigError, match="secure_cookie: expected true or false"):
        config(secure_cookie="yes")


def test_config_resolves_paths_and_reads_tokens(tmp_path: Path) -> None:
    config = parse_review_config(
        {
            "store": "sqlite:///audit.db",
            "listen": "0.0.0.0:9000",
            "auth": {
                "tokens": [{"name": "alice", "token_file": _token_file(tmp_path)}],
                "identity_header": "X-Forwarded-Email",
                "allowed_identities": ["bob@example.com", "@corp.example"],
            },
        },
        tmp_path,
        "review.yaml",
    )
    assert config.store == f"sqlite:///{tmp_path.resolve() / 'audit.db'}"
    assert (config.host, config.port) == ("0.0.0.0", 9000)
    assert config.auth.tokens[0].token == "t" * 32
    allows = config.auth.allows_identity
    assert allows("Bob@Example.com") and allows("eve@corp.example")
    assert not allows("eve@evil.example") and not allows("x@y@corp.example") and not allows("")
    assert config.auth.trusts_peer("127.0.0.1") and not config.auth.trusts_peer("10.0.0.5")


def test_pack_metadata_reader_matches_a_real_pack(tmp_path: Path) -> None:
    encoder = RestrictedEncoder(
        weight=torch.randn(8, 2, generator=torch.Generator().manual_seed(0)),
        bias=torch.zeros(2),
        floor=torch.full((2,), -math.inf),
        normalization="none",
    )
    features = [
        FeatureInfo("deception", "layers.3", "identity", None, category="deception",
                    description="model states what it believes false", label="Deception"),
        FeatureInfo("harm", "layers.3", "identity", None, description="harmful intent"),
    ]  # fmt: skip
    pack = FeaturePack("probes", {"layers.3": HookPointEncoder("layers.3", encoder, features)})
    path = tmp_path / "probes.pack.safetensors"
    save_feature_pack(pack, path)
    meta = read_pack_features(path)
    assert set(meta) == {"probes/deception", "probes/harm"}
    assert meta["probes/deception"]["description"] == "model states what it believes false"
    assert meta["probes/deception"]["label"] == "Deception"
    assert meta["probes/harm"]["hook_point"] == "layers.3"


# --- the served page on each backend -------------------------------------------------------------


def test_review_page_serves_each_backend(store_url: str, tmp_path: Path) -> None:
    """The page's own queries on SQLite and PostgreSQL: list, conversation view, a label."""
    import socket
    import threading
    import time
    import urllib.parse
    import urllib.request

    import uvicorn

    from monitor.audit.review.app import create_app
    from monitor.audit.review.config import AuthSettings, ReviewConfig, TokenEntry

    raw_id = "conv:alice@example.com:7"  # stored redacted, linked as the client sent it
    stored_id = redact_identifier(Redactor(), raw_id)
    assert stored_id != raw_id
    store = open_store(store_url)
    store.write(
        [
            _conversation("c/1", NOW),
            _conversation("c2", NOW - timedelta(hours=1)),
            _conversation(stored_id, NOW - timedelta(hours=2)),
        ]
    )
    (aid,) = _alert_ids(store, "c/1")
    store.close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = "k" * 32
    config = ReviewConfig(
        store=store_url,
        listen=f"127.0.0.1:{port}",
        auth=AuthSettings(tokens=(TokenEntry("alice", token),)),
    )
    app = create_app(config)
    server = uvicorn.Server(
        uvicorn.Config(app.asgi, host="127.0.0.1", port=port, log_level="error")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.started

        def call(path: str, data: bytes | None = None) -> tuple[int, str]:
            headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
            request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data, headers)
            with urllib.request.urlopen(request, timeout=20) as r:
                return r.status, r.read().decode()

        status, body = call("/conversations?status=unreviewed&rule=deceive")
        assert status == 200 and 'data-conversation="c/1"' in body and "c2" in body
        status, body = call("/conversations/c%2F1")
        assert status == 200 and "deceive fired" in body and '{"p/x":2.5}' in body
        label = json.dumps({"verdict": "true_positive", "note": "n"}).encode()
        assert call(f"/api/alerts/{aid}/labels", label)[0] == 201
        status, body = call("/conversations?status=true_positive")
        assert 'data-conversation="c/1"' in body and 'data-conversation="c2"' not in body
        status, body = call("/export/c%2F1")
        assert json.loads(body)["labels"][0]["labeler"] == "alice"
        link = "/conversations/" + urllib.parse.quote(raw_id, safe="")
        status, body = call(link)
        assert status == 200 and stored_id in body and "alice@example.com" not in body
        status, body = call(link.replace("/conversations/", "/export/"))
        assert json.loads(body)["summary"]["conversation_id"] == stored_id
    finally:
        server.should_exit = True
        thread.join(10)
        app.close()
