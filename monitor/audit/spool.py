"""The audit spool: records the store could not take before shutdown, kept in a local file.

When the sidecar stops (SIGTERM) while the store is down, the writer waits for it up to the
shutdown grace period, then appends every write it still holds to the spool file (JSON lines,
one per write job, fsynced) and logs an error with the count and the path. The next recorder
started with the same spool path writes the spooled jobs to the store, in order, before any new
one, and removes the file once they have committed. Writes are idempotent (tokens and
conversations are upserts, alerts have a unique key), so a spool replayed twice, or replayed
after part of it had committed, stores each record once.

The text in the spool is already redacted: redaction happens before a job is queued.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from monitor.audit.store import AlertRecord, ConversationWrite, TokenRecord

SPOOL_VERSION = 1


def _ts(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _write_to_json(write: ConversationWrite) -> dict[str, Any]:
    return {
        "conversation_id": write.conversation_id,
        "model": write.model,
        "at": _ts(write.at),
        "hook_points": list(write.hook_points),
        "ended": write.ended,
        "tokens": [
            [t.position, t.text, t.role, t.request_id, dict(t.features)] for t in write.tokens
        ],
        "alerts": [
            {
                "conversation_id": a.conversation_id,
                "request_id": a.request_id,
                "rule": a.rule,
                "rule_set_hash": a.rule_set_hash,
                "category": a.category,
                "severity": a.severity,
                "value": a.value,
                "position": a.position,
                "start": a.start,
                "end": a.end,
                "feature_values": dict(a.feature_values),
                "message": a.message,
                "labels": dict(a.labels),
                "created_at": _ts(a.created_at),
            }
            for a in write.alerts
        ],
    }


def _write_from_json(data: dict[str, Any]) -> ConversationWrite:
    alerts = []
    for a in data["alerts"]:
        created = a["created_at"]
        alerts.append(
            AlertRecord(
                **{**a, "created_at": None if created is None else datetime.fromisoformat(created)}
            )
        )
    return ConversationWrite(
        conversation_id=data["conversation_id"],
        model=data["model"],
        at=datetime.fromisoformat(data["at"]),
        hook_points=tuple(data["hook_points"]),
        ended=bool(data["ended"]),
        tokens=tuple(TokenRecord(*t) for t in data["tokens"]),
        alerts=tuple(alerts),
    )


def append(path: Path, jobs: Iterable[Sequence[ConversationWrite]]) -> int:
    """Append `jobs` to the spool at `path` and fsync it; returns how many were written."""
    lines = [
        json.dumps(
            {"v": SPOOL_VERSION, "writes": [_write_to_json(w) for w in job]},
            ensure_ascii=True,
        )
        for job in jobs
    ]
    if not lines:
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write("".join(line + "\n" for line in lines))
        handle.flush()
        os.fsync(handle.fileno())
    return len(lines)


def load(path: Path) -> list[list[ConversationWrite]]:
    """The spooled jobs in order. A torn last line (a crash while appending) is skipped; any
    other malformed line is an error, so a damaged spool is kept for an operator to look at."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    jobs = []
    for number, line in enumerate(lines, 1):
        try:
            data = json.loads(line)
            if data.get("v") != SPOOL_VERSION:
                raise ValueError(f"unknown spool version {data.get('v')!r}")
            jobs.append([_write_from_json(w) for w in data["writes"]])
        except (ValueError, KeyError, TypeError) as exc:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number}: damaged spool line: {exc}") from exc
    return jobs
