"""`safety-monitor audit list | show | export | purge`: review the audit store.

Registered on the main parser by `add_audit_commands(subparsers)`; also runnable on its own as
`python -m monitor.audit.cli ...`. Handlers return an exit code: 0 ok, 1 the store failed,
2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

from monitor.audit.redaction import Redactor, redact_identifier
from monitor.audit.render import render_conversation, render_table
from monitor.audit.store import (
    AuditQuery,
    AuditStore,
    ConversationRecord,
    StoreError,
    open_store,
    sqlite_path,
)
from monitor.escape import csv_cell

ENV_URL = "SAFETY_MONITOR_AUDIT_URL"
DEFAULT_URL = "sqlite:///safety-monitor-audit.db"
EXIT_STORE = 1
EXIT_USAGE = 2
_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


class UsageError(ValueError):
    """A bad argument or a missing store: exit code 2 with a one-line message."""

    pass


def add_audit_commands(subparsers: Any) -> None:
    """Add `audit` and its actions to an argparse subparsers object (sets `handler`)."""
    audit = subparsers.add_parser("audit", help="review flagged conversations")
    actions = audit.add_subparsers(metavar="ACTION")

    listing = actions.add_parser("list", help="flagged conversations, newest first")
    _add_common(listing)
    listing.add_argument("--json", action="store_true", help="one JSON array instead of a table")
    listing.set_defaults(handler=cmd_list)

    show = actions.add_parser("show", help="one conversation, tokens coloured by feature strength")
    show.add_argument("conversation_id", metavar="ID")
    show.add_argument("--store", default=None, help=f"store URL (default ${ENV_URL})")
    show.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    show.set_defaults(handler=cmd_show)

    export = actions.add_parser("export", help="conversations for downstream review tools")
    _add_common(export)
    export.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    export.add_argument("--out", type=Path, help="file to write (default stdout)")
    export.add_argument(
        "--labeled",
        action="store_true",
        help="reviewer-labeled conversations as labeled-dataset JSONL (pack fit / rules calibrate)",
    )
    export.add_argument(
        "--include-escalate",
        action="store_true",
        help="with --labeled: count 'needs escalation' verdicts as label 1 (left out by default)",
    )
    export.set_defaults(handler=cmd_export)

    serve = actions.add_parser("serve", help="the review page (a web server on the store)")
    serve.add_argument("--config", required=True, type=Path, help="review page YAML config")
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    serve.set_defaults(handler=cmd_serve)

    purge = actions.add_parser("purge", help="delete conversations with no recent activity")
    purge.add_argument("--store", default=None, help=f"store URL (default ${ENV_URL})")
    purge.add_argument("--older-than-days", type=float, required=True, metavar="N")
    purge.set_defaults(handler=cmd_purge)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", default=None, help=f"store URL (default ${ENV_URL})")
    parser.add_argument("--since", help="alerts since: ISO date/time or a duration (30m, 24h, 7d)")
    parser.add_argument("--rule")
    parser.add_argument("--category")
    parser.add_argument("--severity", choices=("info", "warning", "critical"))
    parser.add_argument("--model")
    parser.add_argument("--limit", type=int, default=None, help="at most N conversations")


def _fail(message: str, code: int = EXIT_USAGE) -> int:
    print(f"safety-monitor audit: error: {message}", file=sys.stderr)
    return code


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """`--since`: an ISO date/time (UTC when it names no zone) or a span back from now (30m, 24h,
    7d)."""
    match = _RELATIVE.fullmatch(text.strip())
    if match:
        delta = timedelta(**{_UNITS[match.group(2)]: float(match.group(1))})
        return (now or datetime.now(UTC)) - delta
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"--since {text!r}: expected ISO date/time or 30m, 24h, 7d") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _query(args: argparse.Namespace, default_limit: int | None) -> AuditQuery:
    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be at least 1")
    return AuditQuery(
        since=parse_since(args.since) if args.since else None,
        rule=args.rule,
        category=args.category,
        severity=args.severity,
        model=args.model,
        limit=args.limit if args.limit is not None else default_limit,
    )


def _open(args: argparse.Namespace, readonly: bool) -> AuditStore:
    url = args.store or os.environ.get(ENV_URL) or DEFAULT_URL
    path = sqlite_path(url)
    if path is not None and not Path(path).exists():
        # Opening would create an empty store; a typo in the path deserves an error instead.
        raise UsageError(f"no audit store at {path}")
    return open_store(url, readonly=readonly)


def _run(args: argparse.Namespace, body: Any, readonly: bool = True) -> int:
    """Open the store, run `body(store)`, map errors to exit codes; always closes the store."""
    try:
        with ExitStack() as stack:
            store = _open(args, readonly)
            stack.callback(store.close)
            return int(body(store))
    except UsageError as exc:
        return _fail(str(exc))
    except (StoreError, OSError) as exc:
        return _fail(str(exc), EXIT_STORE)


def cmd_list(args: argparse.Namespace) -> int:
    """`audit list`: flagged conversations as a table or JSON."""

    def body(store: AuditStore) -> int:
        summaries = store.list_conversations(_query(args, default_limit=1000))
        if args.json:
            print(json.dumps([asdict(s) for s in summaries], default=_json_default, indent=2))
        elif summaries:
            print(render_table(summaries))
        else:
            print("no flagged conversations")
        return 0

    return _run(args, body)


def cmd_show(args: argparse.Namespace) -> int:
    """`audit show ID`: one conversation with its token text, alerts and feature sparklines."""

    def body(store: AuditStore) -> int:
        record = store.get_conversation(args.conversation_id)
        if record is None:
            # An id with personal data in it is stored redacted: accept the id as the client
            # sent it (from an alert) too.
            stored_id = redact_identifier(Redactor(), args.conversation_id)
            if stored_id != args.conversation_id:
                record = store.get_conversation(stored_id)
        if record is None:
            raise UsageError(f"no conversation {args.conversation_id!r} in the audit store")
        for warning in record.warnings:
            print(f"warning: damaged row: {warning}", file=sys.stderr)
        color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
        print(render_conversation(record, color=color))
        return 0

    return _run(args, body)


def cmd_export(args: argparse.Namespace) -> int:
    """`audit export`: full records as JSON lines or CSV."""
    if args.labeled:
        return _export_labeled(args)

    def body(store: AuditStore) -> int:
        query = _query(args, default_limit=None)
        with ExitStack() as stack:
            out: TextIO = sys.stdout
            if args.out is not None:
                out = stack.enter_context(args.out.open("w", encoding="utf-8", newline=""))
            records = store.iter_conversations(query)
            count = (
                _write_jsonl(records, out) if args.format == "jsonl" else _write_csv(records, out)
            )
        print(f"exported {count} conversation(s)", file=sys.stderr)
        return 0

    return _run(args, body)


def _export_labeled(args: argparse.Namespace) -> int:
    """`export --labeled`: one dataset record per labeled conversation and task."""
    from monitor.audit.labels import dataset_records, dumps_record, iter_labeled

    if args.format != "jsonl":
        return _fail("--labeled writes JSONL only")
    filters = ("since", "rule", "category", "severity", "model", "limit")
    if any(getattr(args, name) is not None for name in filters):
        return _fail("--labeled exports every labeled conversation; filters do not apply")

    def body(store: AuditStore) -> int:
        count = 0
        with ExitStack() as stack:
            out: TextIO = sys.stdout
            if args.out is not None:
                out = stack.enter_context(args.out.open("w", encoding="utf-8", newline=""))
            for record, labels in iter_labeled(store):
                for item in dataset_records(record, labels, args.include_escalate):
                    out.write(dumps_record(item) + "\n")
                    count += 1
        print(f"exported {count} labeled record(s)", file=sys.stderr)
        return 0

    return _run(args, body)


def cmd_serve(args: argparse.Namespace) -> int:
    """`audit serve --config FILE`: the review page, until SIGTERM."""
    try:
        from monitor.audit.review import ReviewConfigError, load_review_config, serve
    except ImportError as exc:  # the `review` extra is not installed
        return _fail(f"{exc}; install safety-monitor[review]", EXIT_STORE)
    try:
        config = load_review_config(args.config)
    except ReviewConfigError as exc:
        return _fail(str(exc))
    try:
        serve(config, log_level=args.log_level)
    except (StoreError, OSError) as exc:
        return _fail(str(exc), EXIT_STORE)
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    """`audit purge`: delete conversations older than `--older-than-days`."""
    if args.older_than_days < 0:
        return _fail("--older-than-days must be >= 0")

    def body(store: AuditStore) -> int:
        cutoff = datetime.now(UTC) - timedelta(days=args.older_than_days)
        purged = store.purge(cutoff)
        print(f"purged {purged} conversation(s) with no activity since {cutoff:%Y-%m-%d %H:%M}Z")
        return 0

    return _run(args, body, readonly=False)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def record_to_json(record: ConversationRecord) -> dict[str, Any]:
    """A conversation record as plain JSON-able data (with its request ids)."""
    data = asdict(record)
    data["request_ids"] = list(record.request_ids)
    return data


def _write_jsonl(records: Any, out: TextIO) -> int:
    count = 0
    for record in records:
        out.write(json.dumps(record_to_json(record), default=_json_default) + "\n")
        count += 1
    return count


CSV_COLUMNS = (
    "conversation_id",
    "model",
    "position",
    "request_id",
    "role",
    "text",
    "features",
    "alert_rules",
)


def _write_csv(records: Any, out: TextIO) -> int:
    """One row per token; `alert_rules` names the rules that fired at that token.

    Every cell goes through `csv_cell`: control and invisible characters escaped, and a cell a
    spreadsheet would evaluate as a formula (`= + - @` first) prefixed with `'`."""
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    count = 0
    for record in records:
        fired: dict[int, list[str]] = {}
        for a in record.alerts:
            fired.setdefault(a.position, []).append(a.rule)
        for t in record.tokens:
            writer.writerow(
                csv_cell(cell)
                for cell in (
                    record.summary.conversation_id,
                    record.summary.model,
                    t.position,
                    t.request_id,
                    t.role,
                    t.text if t.text is not None else "",
                    json.dumps(dict(t.features), sort_keys=True),
                    ";".join(fired.get(t.position, [])),
                )
            )
        count += 1
    return count


def main(argv: Sequence[str] | None = None) -> int:
    """The `audit` commands on their own (`safety-monitor audit ...` without the other groups)."""
    parser = argparse.ArgumentParser(prog="safety-monitor")
    add_audit_commands(parser.add_subparsers(metavar="COMMAND"))
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
