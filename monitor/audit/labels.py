"""Reviewer labels and the review page's queries, over the same SQL stores as `store.py`.

A reviewer gives an alert a verdict (true positive, false positive, needs escalation) with a
note; each verdict is a row in `labels` (migration 3), the newest row of an alert is its
current label. `dataset_records` turns labeled conversations into the labeled-conversation
JSONL format that `pack fit`, `eval` and `rules calibrate` read, so a false positive found in
review becomes calibration data.

The functions take a `SqlAuditStore` and use its connection, lock and dialect helpers: this is
the store's SQL, kept in its own module because only the review page and `audit export
--labeled` need it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from monitor.audit.store import (
    SEVERITY_ORDER,
    AuditStore,
    ConversationRecord,
    ConversationSummary,
    SqlAuditStore,
    StoreError,
)

TRUE_POSITIVE = "true_positive"
FALSE_POSITIVE = "false_positive"
ESCALATE = "escalate"
VERDICTS = (TRUE_POSITIVE, FALSE_POSITIVE, ESCALATE)
# Review status filter of the list view: a verdict, or whether any/no alert has a label.
STATUSES = ("unreviewed", "reviewed", *VERDICTS)
MAX_NOTE_CHARS = 4000
MAX_LABELER_CHARS = 256
DATASET_SPLIT = "calibrate"
# Up to this many alerts of a filtered rule, the list query starts from those alerts and sorts
# them; above it, walking conversations newest first finds a page sooner.
RARE_RULE_ALERTS = 5000  # review labels are calibration data, never fit or test data


class LabelError(ValueError):
    """A label that cannot be stored: unknown verdict or alert, note too long."""


@dataclass(frozen=True)
class LabelRecord:
    """One verdict given to one alert."""

    id: int
    alert_id: int
    conversation_id: str
    verdict: str
    note: str
    labeler: str
    created_at: datetime | None


@dataclass(frozen=True)
class ReviewQuery:
    """Filters and keyset paging of the list view (newest activity first).

    `after` is the (updated_at, conversation_id) of the last row of the previous page: paging
    by key stays as fast on page 2,000 as on page 1, where OFFSET would scan every row before.
    """

    since: datetime | None = None
    until: datetime | None = None
    rule: str | None = None
    category: str | None = None
    severity: str | None = None
    model: str | None = None
    status: str | None = None
    after: tuple[datetime, str] | None = None
    limit: int = 50


@dataclass(frozen=True)
class ReviewRow(ConversationSummary):
    """One line of the list view: the conversation as `audit list` shows it, plus how its
    alerts were reviewed."""

    verdicts: Mapping[str, int]  # current verdict -> number of alerts with it
    unreviewed: int  # alerts without a label


def _sql_store(store: AuditStore) -> SqlAuditStore:
    if not isinstance(store, SqlAuditStore):
        raise StoreError(f"labels need a SQL audit store, not {type(store).__name__}")
    return store


def add_label(
    store: AuditStore, alert_id: int, verdict: str, note: str, labeler: str, at: datetime
) -> LabelRecord:
    """Store one verdict for an alert; raises LabelError for a bad verdict or unknown alert."""
    sql = _sql_store(store)
    if verdict not in VERDICTS:
        raise LabelError(f"verdict must be one of {', '.join(VERDICTS)}")
    if len(note) > MAX_NOTE_CHARS:
        raise LabelError(f"note longer than {MAX_NOTE_CHARS} characters")
    if not labeler or len(labeler) > MAX_LABELER_CHARS:
        raise LabelError("labeler identity missing or too long")
    if not 0 <= alert_id < 2**63:
        # Ids are 64-bit in both stores; a bigger number from the URL is no alert, not a
        # driver overflow (which the page reported as a store failure).
        raise LabelError(f"no alert {alert_id}")
    note = note.replace("\x00", "\ufffd")  # PostgreSQL text cannot hold NUL
    with sql._lock, sql._transaction(write=True) as cur:
        cur.execute(sql._sql("SELECT conversation_id FROM alerts WHERE id = ?"), (alert_id,))
        row = cur.fetchone()
        if row is None:
            raise LabelError(f"no alert {alert_id}")
        cur.execute(
            sql._sql(
                "INSERT INTO labels (alert_id, conversation_id, verdict, note, labeler, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?) RETURNING id"
            ),
            (alert_id, row[0], verdict, note, labeler, sql._write_ts(at)),
        )
        label_id = int(cur.fetchone()[0])
    return LabelRecord(label_id, alert_id, str(row[0]), verdict, note, labeler, at)


_LABEL_COLUMNS = "id, alert_id, conversation_id, verdict, note, labeler, created_at"


def _label(sql: SqlAuditStore, row: Sequence[Any]) -> LabelRecord:
    lid, aid, cid, verdict, note, labeler, ts = row
    try:
        created = sql._read_ts(ts)
    except (TypeError, ValueError):
        created = None
    return LabelRecord(int(lid), int(aid), str(cid), str(verdict), str(note), str(labeler), created)


def labels_for(store: AuditStore, conversation_id: str) -> list[LabelRecord]:
    """Every verdict given to the conversation's alerts, oldest first."""
    sql = _sql_store(store)
    with sql._lock, sql._transaction(write=False) as cur:
        cur.execute(
            sql._sql(f"SELECT {_LABEL_COLUMNS} FROM labels WHERE conversation_id = ? ORDER BY id"),
            (conversation_id,),
        )
        rows = cur.fetchall()
    return [_label(sql, r) for r in rows]


def current_labels(labels: Sequence[LabelRecord]) -> dict[int, LabelRecord]:
    """alert id -> its newest label."""
    out: dict[int, LabelRecord] = {}
    for label in sorted(labels, key=lambda lab: lab.id):
        out[label.alert_id] = label
    return out


def list_review(store: AuditStore, query: ReviewQuery) -> list[ReviewRow]:
    """One page of flagged conversations for the list view (at most `query.limit` rows)."""
    sql = _sql_store(store)
    where: list[str] = []
    params: list[Any] = []
    alert_clauses: list[str] = []
    if query.since is not None:
        alert_clauses.append("a.created_at >= ?")
        params.append(sql._write_ts(query.since))
    if query.until is not None:
        alert_clauses.append("a.created_at < ?")
        params.append(sql._write_ts(query.until))
    for column in ("rule", "category", "severity"):
        value = getattr(query, column)
        if value:
            alert_clauses.append(f"a.{column} = ?")
            params.append(value)
    if query.since is not None:
        # A conversation last written before `since` has no alert since then: this bounds the
        # newest-first walk.
        where.append("c.updated_at >= ?")
        params.append(sql._write_ts(query.since))
    rare_rule = False
    if query.rule:
        with sql._lock, sql._transaction(write=False) as cur:
            cur.execute(sql._sql("SELECT COUNT(*) FROM alerts WHERE rule = ?"), (query.rule,))
            rare_rule = int(cur.fetchone()[0]) <= RARE_RULE_ALERTS
    if alert_clauses and rare_rule:
        # Few alerts of this rule: start from them (the alerts_rule index) rather than walk
        # every conversation looking for one.
        where.insert(
            0,
            "c.conversation_id IN (SELECT a.conversation_id FROM alerts a WHERE "
            + " AND ".join(alert_clauses)
            + ")",
        )
    elif alert_clauses:
        where.insert(
            0,
            "EXISTS (SELECT 1 FROM alerts a WHERE a.conversation_id = c.conversation_id AND "
            + " AND ".join(alert_clauses)
            + ")",
        )
    if query.model:
        where.append("c.model = ?")
        params.append(query.model)
    status_clause = _status_clause(query.status)
    if status_clause:
        where.append(status_clause[0])
        params.extend(status_clause[1])
    if query.after is not None:
        at, cid = query.after
        where.append("(c.updated_at, c.conversation_id) < (?, ?)")
        params.extend([sql._write_ts(at), cid])
    statement = (
        "SELECT c.conversation_id, c.model, c.first_flagged_at, c.updated_at, c.ended "
        "FROM conversations c"
        + (" WHERE " + " AND ".join(where) if where else "")
        # Both keys descending: one backward walk of conversations_recent, no sort.
        + " ORDER BY c.updated_at DESC, c.conversation_id DESC LIMIT ?"
    )
    params.append(max(1, query.limit))
    with sql._lock, sql._transaction(write=False) as cur:
        cur.execute(sql._sql(statement), params)
        heads = cur.fetchall()
        ids = [h[0] for h in heads]
        details = _page_details(sql, cur, ids)
    rows = []
    for cid, model, first, updated, ended in heads:
        alerts, tokens, verdict_of = details.get(cid, ([], 0, {}))
        verdicts: dict[str, int] = {}
        for aid, _, _ in alerts:
            if aid in verdict_of:
                verdicts[verdict_of[aid]] = verdicts.get(verdict_of[aid], 0) + 1
        severities = [s for _, _, s in alerts]
        rows.append(
            ReviewRow(
                conversation_id=str(cid),
                model=str(model),
                first_flagged_at=_ts_or_none(sql, first),
                updated_at=_ts_or_none(sql, updated),
                ended=bool(ended),
                alert_count=len(alerts),
                token_count=tokens,
                rules=tuple(dict.fromkeys(r for _, r, _ in alerts)),
                max_severity=max(severities, key=lambda s: SEVERITY_ORDER.get(s, -1), default=""),
                verdicts=verdicts,
                unreviewed=sum(1 for aid, _, _ in alerts if aid not in verdict_of),
            )
        )
    return rows


def _ts_or_none(sql: SqlAuditStore, value: Any) -> datetime | None:
    try:
        return sql._read_ts(value)
    except (TypeError, ValueError):
        return None


def _status_clause(status: str | None) -> tuple[str, list[Any]] | None:
    if not status:
        return None
    if status == "unreviewed":
        # Some alert of the conversation has no label yet.
        return (
            "EXISTS (SELECT 1 FROM alerts a WHERE a.conversation_id = c.conversation_id AND "
            "NOT EXISTS (SELECT 1 FROM labels l WHERE l.alert_id = a.id))",
            [],
        )
    # Labeled conversations are the few: start from the labels rather than walk every
    # conversation looking for one.
    if status == "reviewed":
        return ("c.conversation_id IN (SELECT l.conversation_id FROM labels l)", [])
    if status in VERDICTS:
        return (
            "c.conversation_id IN (SELECT l.conversation_id FROM labels l WHERE l.verdict = ? "
            "AND l.id = (SELECT MAX(l2.id) FROM labels l2 WHERE l2.alert_id = l.alert_id))",
            [status],
        )
    raise LabelError(f"status must be one of {', '.join(STATUSES)}")


def _page_details(
    sql: SqlAuditStore, cur: Any, ids: Sequence[str]
) -> dict[str, tuple[list[tuple[int, str, str]], int, dict[int, str]]]:
    """Alerts, token count and current verdicts of one page of conversations (3 queries)."""
    if not ids:
        return {}
    marks = ", ".join("?" * len(ids))
    alerts: dict[str, list[tuple[int, str, str]]] = {}
    cur.execute(
        sql._sql(
            "SELECT conversation_id, id, rule, severity FROM alerts "
            f"WHERE conversation_id IN ({marks}) ORDER BY id"
        ),
        list(ids),
    )
    for cid, aid, rule, severity in cur.fetchall():
        alerts.setdefault(cid, []).append((int(aid), str(rule), str(severity)))
    counts: dict[str, int] = {}
    cur.execute(
        sql._sql(
            f"SELECT conversation_id, COUNT(*) FROM tokens WHERE conversation_id IN ({marks}) "
            "GROUP BY conversation_id"
        ),
        list(ids),
    )
    for cid, count in cur.fetchall():
        counts[cid] = int(count)
    verdicts: dict[str, dict[int, str]] = {}
    cur.execute(
        sql._sql(
            "SELECT conversation_id, alert_id, verdict FROM labels "
            f"WHERE conversation_id IN ({marks}) ORDER BY id"
        ),
        list(ids),
    )
    for cid, aid, verdict in cur.fetchall():
        verdicts.setdefault(cid, {})[int(aid)] = str(verdict)  # newest wins (ORDER BY id)
    return {cid: (alerts.get(cid, []), counts.get(cid, 0), verdicts.get(cid, {})) for cid in ids}


def labeled_conversation_ids(store: AuditStore) -> list[str]:
    """Conversations with at least one label, in the order they were first labeled."""
    sql = _sql_store(store)
    with sql._lock, sql._transaction(write=False) as cur:
        cur.execute(
            "SELECT conversation_id, MIN(id) AS first FROM labels "
            "GROUP BY conversation_id ORDER BY first"
        )
        return [str(r[0]) for r in cur.fetchall()]


def iter_labeled(store: AuditStore) -> Iterator[tuple[ConversationRecord, list[LabelRecord]]]:
    """Each labeled conversation with its labels (one conversation in memory at a time)."""
    for cid in labeled_conversation_ids(store):
        record = store.get_conversation(cid)
        if record is not None:
            yield record, labels_for(store, cid)


def dataset_records(
    record: ConversationRecord, labels: Sequence[LabelRecord], include_escalate: bool = False
) -> list[dict[str, Any]]:
    """The conversation as labeled-conversation JSONL records, one per task (alert category).

    label 1: some alert of that category is a true positive (the thing the task detects is
    there); 0: every labeled alert of that category is a false positive. `escalate` verdicts
    are no answer yet and are left out unless `include_escalate` (then they count as 1: a
    reviewer could not rule the harm out). `label_roles` are the roles of the tokens the
    labeled alerts spanned, so a per-token fit labels those tokens rather than the prompt.
    """
    current = current_labels(labels)
    by_task: dict[str, list[tuple[Any, LabelRecord]]] = {}
    for alert in record.alerts:
        label = current.get(alert.id) if alert.id is not None else None
        if label is None or (label.verdict == ESCALATE and not include_escalate):
            continue
        by_task.setdefault(alert.category, []).append((alert, label))
    turns = _turns(record)
    out = []
    cid = record.summary.conversation_id
    for task, items in sorted(by_task.items()):
        positive = any(lab.verdict in (TRUE_POSITIVE, ESCALATE) for _, lab in items)
        spanned = {
            t.role
            for alert, _ in items
            for t in record.tokens
            if alert.start <= t.position <= alert.end and t.role
        }
        labelers = sorted({lab.labeler for _, lab in items})
        item: dict[str, Any] = {
            "id": f"review:{cid}:{task}",
            "task": task,
            "label": 1 if positive else 0,
            "split": DATASET_SPLIT,
            "category": ",".join(dict.fromkeys(alert.rule for alert, _ in items)),
            "group": f"review:{cid}",
            "turns": turns,
            "source": "review:" + ",".join(labelers),
        }
        if spanned:
            item["label_roles"] = sorted(spanned)
        out.append(item)
    return out


_ROLES = ("system", "user", "assistant")


def _turns(record: ConversationRecord) -> list[dict[str, str]]:
    """Consecutive tokens of one role and request form one turn (redacted text, as stored)."""
    turns: list[dict[str, str]] = []
    key: tuple[str, str] | None = None
    for token in record.tokens:
        role = token.role if token.role in _ROLES else "assistant"
        if key != (role, token.request_id):
            turns.append({"role": role, "text": ""})
            key = (role, token.request_id)
        turns[-1]["text"] += token.text or ""
    return turns


def label_to_json(label: LabelRecord) -> dict[str, Any]:
    """A label as plain JSON values (for the review page's API)."""
    return {
        "id": label.id,
        "alert_id": label.alert_id,
        "verdict": label.verdict,
        "note": label.note,
        "labeler": label.labeler,
        "created_at": label.created_at.isoformat() if label.created_at else None,
    }


def dumps_record(item: Mapping[str, Any]) -> str:
    """One JSONL line (no ASCII escaping: the loaders read UTF-8)."""
    return json.dumps(item, ensure_ascii=False)


@dataclass
class RawConversation:
    """A conversation as stored, with token features still JSON text (the review page's fast
    path: it parses all tokens' features in one call instead of one per token)."""

    conversation_id: str
    model: str
    first_flagged_at: datetime | None
    updated_at: datetime | None
    ended: bool
    hook_points: tuple[str, ...]
    positions: list[int]
    texts: list[str | None]
    roles: list[str]
    request_ids: list[str]
    features_json: list[str]
    alerts: list[Any]  # AlertRecord
    warnings: list[str]


def raw_conversation(store: AuditStore, conversation_id: str) -> RawConversation | None:
    """The conversation's columns, or None when it is not in the store."""
    from monitor.audit.store import _ALERT_COLUMNS, _Decoder

    sql = _sql_store(store)
    with sql._lock, sql._transaction(write=False) as cur:
        cur.execute(
            sql._sql(
                "SELECT conversation_id, model, first_flagged_at, updated_at, ended, hook_points "
                "FROM conversations WHERE conversation_id = ?"
            ),
            (conversation_id,),
        )
        head = cur.fetchone()
        if head is None:
            return None
        cur.execute(
            sql._sql(
                "SELECT position, text, role, request_id, features FROM tokens "
                "WHERE conversation_id = ? ORDER BY position"
            ),
            (conversation_id,),
        )
        token_rows = cur.fetchall()
        cur.execute(
            sql._sql(
                f"SELECT {_ALERT_COLUMNS} FROM alerts WHERE conversation_id = ? "
                "ORDER BY position, id"
            ),
            (conversation_id,),
        )
        alert_rows = cur.fetchall()
    dec = _Decoder(sql._read_ts)
    columns: list[list[Any]] = [list(c) for c in zip(*token_rows, strict=True)] or [[]] * 5
    positions, texts, roles, request_ids, features = columns
    return RawConversation(
        conversation_id=str(head[0]),
        model=dec.text(head[1], "conversation model"),
        first_flagged_at=dec.ts(head[2], "conversation first_flagged_at"),
        updated_at=dec.ts(head[3], "conversation updated_at"),
        ended=bool(head[4]),
        hook_points=tuple(dec.json_list(head[5], "conversation hook_points")),
        positions=[int(p) for p in positions],
        texts=[t if t is None or isinstance(t, str) else CORRUPT_TEXT for t in texts],
        roles=[r if isinstance(r, str) else CORRUPT_TEXT for r in roles],
        request_ids=[q if isinstance(q, str) else CORRUPT_TEXT for q in request_ids],
        features_json=[f if isinstance(f, str) else "null" for f in features],
        alerts=[sql._alert(row, dec) for row in alert_rows],
        warnings=dec.warnings,
    )


CORRUPT_TEXT = "\ufffd"
