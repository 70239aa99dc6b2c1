"""Terminal and spreadsheet injection through stored text (issue 14, finding 6).

Client-controlled ids and model output reach `audit show`, `audit list`, `audit export --format
csv` and the console log. None of them may forge a line, drive the terminal, reorder or hide
text, or be evaluated as a spreadsheet formula.
"""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
import structlog

from monitor.audit.cli import main
from monitor.audit.store import AlertRecord, ConversationWrite, TokenRecord, open_store
from monitor.escape import csv_cell, escape_text
from monitor.logs import configure_logging

NOW = datetime.now(UTC)
FORGED_ALERT = "\n  ▲ [critical] forged-rule value=9 tokens 0: forged"
BIDI = "\u202eevil\u202c"
EVIL_ID = "conv\nforged-row  gemma  99  critical"
# One of each kind the terminal must never receive raw.
HOSTILE = [
    "\x1b[2J",  # ESC, C0
    "\x9b31m",  # CSI, C1
    "\x85",  # NEL, C1 line break
    "\r",
    "\n",
    "\t",
    "\x7f",
    "\u202e",  # RIGHT-TO-LEFT OVERRIDE
    "\u2066",  # LEFT-TO-RIGHT ISOLATE
    "\u200f",  # RIGHT-TO-LEFT MARK
    "\u200b",  # ZERO WIDTH SPACE
    "\u200d",  # ZERO WIDTH JOINER
    "\u2060",  # WORD JOINER
    "\ufeff",  # ZERO WIDTH NO-BREAK SPACE
    "\u2028",  # LINE SEPARATOR
    "\u2029",  # PARAGRAPH SEPARATOR
    "\u00ad",  # SOFT HYPHEN
    "\U000e0041",  # TAG LATIN CAPITAL LETTER A (invisible)
    "\u3164",  # HANGUL FILLER (renders blank)
]


def _raw_controls(text: str) -> list[str]:
    """Characters of `text` a terminal would act on or not show (layout newlines excepted)."""
    return [ch for ch in text if ch != "\n" and (ch in HOSTILE or not ch.isprintable())]


@pytest.fixture
def db(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    store = open_store(url)
    tokens = tuple(
        TokenRecord(i, text, "assistant", f"req{BIDI}", {"f": 1.0})
        for i, text in enumerate([" hello", FORGED_ALERT, *HOSTILE, '=HYPERLINK("x")'])
    )
    alert = AlertRecord(
        EVIL_ID, "req\n1", "real-rule", "h", "c", "warning", 1.0, 1, 1, 1, {"f": 1.0},
        f"msg{FORGED_ALERT}", {}, NOW,
    )  # fmt: skip
    store.write([ConversationWrite(EVIL_ID, f"gemma{BIDI}", NOW, (), False, tokens, (alert,))])
    store.write([ConversationWrite("=1+2", "@SUM(A1)", NOW, (), False, tokens[:1], ())])
    store.close()
    return url


def test_escape_text_covers_every_hostile_kind() -> None:
    for ch in HOSTILE:
        escaped = escape_text(f"a{ch}b")
        assert ch not in escaped and escaped.startswith("a\\") and escaped.endswith("b"), repr(ch)
    assert escape_text("plain ascii, ümlaut and 日本語") == "plain ascii, ümlaut and 日本語"


def test_audit_show_cannot_forge_an_alert_line_or_hide_text(db: str, capsys) -> None:
    assert main(["audit", "show", EVIL_ID, "--store", db, "--color", "always"]) == 0
    out = capsys.readouterr().out
    alert_lines = [line for line in out.splitlines() if line.lstrip().startswith("▲")]
    assert len(alert_lines) == 1 and "real-rule" in alert_lines[0]  # the one real alert
    assert "forged-rule" in out  # shown, as text inside a token line
    raw = [ch for ch in _raw_controls(out) if ch != "\x1b"]  # ESC only from our colours
    assert raw == []
    assert out.count("\x1b") == out.count("\x1b[")  # every ESC starts one of our SGR codes
    assert "\\x1b[2J" in out and "\\u202e" in out and "\\u200b" in out and "\\x0a" in out


def test_audit_list_cannot_forge_a_table_row(db: str, capsys) -> None:
    assert main(["audit", "list", "--store", db]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert len(lines) == 3  # header + the two conversations
    assert not any(line.startswith("forged-row") for line in lines)
    assert _raw_controls(out) == []
    assert "conv\\x0aforged-row" in out and "gemma\\u202eevil\\u202c" in out


def test_csv_export_escapes_control_bytes_and_defuses_formulas(db: str, capsys) -> None:
    assert main(["audit", "export", "--store", db, "--format", "csv"]) == 0
    out = capsys.readouterr().out
    assert _raw_controls(out.replace("\r\n", "\n")) == []
    rows = list(csv.reader(io.StringIO(out)))
    assert all(len(row) == 8 for row in rows)
    cells = [cell for row in rows[1:] for cell in row]
    assert not any(cell[:1] in {"=", "+", "-", "@", "\t", "\r"} for cell in cells)
    assert "'=1+2" in cells and "'@SUM(A1)" in cells and '\'=HYPERLINK("x")' in cells


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("=1+1", "'=1+1"),
        ("+1", "'+1"),
        ("-2", "'-2"),
        ("@cmd", "'@cmd"),
        ("  =1", "'  =1"),
        ("\t=1", "\\x09=1"),
        ("\r=1", "\\x0d=1"),
        ("＝1", "'＝1"),
        ("a=1", "a=1"),
        (12, "12"),
        (None, ""),
    ],
)
def test_csv_cell(value: object, expected: str) -> None:
    assert csv_cell(value) == expected


@pytest.mark.parametrize("log_format", ["console", "json"])
def test_logs_escape_c1_bidi_newlines_and_invisible_characters(
    log_format: str, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging(log_format)  # type: ignore[arg-type]
    try:
        log = structlog.get_logger("test")
        log.warning(
            "rule fired",
            conversation_id=f"c{FORGED_ALERT}",
            model=f"m\x9b31m{BIDI}",
            output=["x\u200by", {"k\x85": "v\u2028"}],
        )
        err = capsys.readouterr().err
    finally:
        configure_logging("json", "debug")  # back to the test session's set-up
    assert len(err.strip().splitlines()) == 1  # no forged second line
    assert _raw_controls(err.replace("\x1b[", "")) == []
    if log_format == "json":
        event = json.loads(err)
        assert event["conversation_id"].startswith("c\\x0a  ▲")
        assert event["model"] == "m\\x9b31m\\u202eevil\\u202c"
        assert event["output"] == ["x\\u200by", {"k\\x85": "v\\u2028"}]
