"""`safety-monitor audit list | show | export | purge` on a real SQLite store."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from monitor.audit.cli import main
from monitor.audit.store import AlertRecord, ConversationWrite, TokenRecord, open_store

NOW = datetime.now(UTC)
REPO = Path(__file__).resolve().parents[2]


def _alert(cid: str, rule: str, severity: str, position: int, at: datetime) -> AlertRecord:
    return AlertRecord(
        cid,
        "req-1",
        rule,
        "h1",
        "deception" if rule != "bias" else "bias",
        severity,
        3.0,
        position,
        position - 1,
        position,
        {"probes/deception": 3.0},
        f"{rule} fired",
        {"team": "ts"},
        at,
    )


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "audit.db"
    store = open_store(f"sqlite:///{path}")
    tokens = tuple(
        TokenRecord(i, f" tok{i}", "assistant", "req-1", {"probes/deception": float(i % 4)})
        for i in range(8)
    )
    store.write(
        [
            ConversationWrite(
                "conv-a",
                "gemma",
                NOW,
                ("layers.12",),
                True,
                tokens,
                (_alert("conv-a", "sustained-deception", "critical", 3, NOW),),
            ),
            ConversationWrite(
                "conv-b",
                "llama",
                NOW - timedelta(days=10),
                (),
                False,
                tokens[:2],
                (_alert("conv-b", "bias", "warning", 1, NOW - timedelta(days=10)),),
            ),
        ]
    )
    store.close()
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_list_table_and_filters(db: Path, capsys) -> None:
    code, out, _ = run(capsys, "audit", "list", "--store", f"sqlite:///{db}")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["CONVERSATION", "MODEL", "ALERTS", "SEVERITY"]
    assert lines[1].split()[:4] == ["conv-a", "gemma", "1", "critical"]
    _, out, _ = run(capsys, "audit", "list", "--store", f"sqlite:///{db}", "--since", "2d")
    assert "conv-a" in out and "conv-b" not in out
    _, out, _ = run(capsys, "audit", "list", "--store", f"sqlite:///{db}", "--category", "bias")
    assert "conv-b" in out and "conv-a" not in out


def test_list_json_and_env_default(db: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("SAFETY_MONITOR_AUDIT_URL", f"sqlite:///{db}")
    code, out, _ = run(capsys, "audit", "list", "--json", "--model", "llama")
    assert code == 0
    (item,) = json.loads(out)
    assert item["conversation_id"] == "conv-b" and item["rules"] == ["bias"]


def test_bad_input_is_one_line_and_exit_2(db: Path, capsys) -> None:
    code, _, err = run(capsys, "audit", "list", "--store", f"sqlite:///{db}", "--since", "soon")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--since" in err
    code, _, err = run(capsys, "audit", "list", "--store", f"sqlite:///{db.parent / 'nope.db'}")
    assert code == 2 and "no audit store" in err
    code, _, err = run(capsys, "audit", "show", "missing", "--store", f"sqlite:///{db}")
    assert code == 2 and "no conversation" in err


def test_show_plain_and_coloured(db: Path, capsys) -> None:
    code, out, _ = run(
        capsys, "audit", "show", "conv-a", "--store", f"sqlite:///{db}", "--color", "never"
    )
    assert code == 0 and "\x1b[" not in out
    assert " tok0 tok1 tok2 tok3" in out
    assert "▲ [critical] sustained-deception value=3 tokens 2-3" in out
    assert "probes/deception" in out and "▁" in out and "█" in out
    _, coloured, _ = run(
        capsys, "audit", "show", "conv-a", "--store", f"sqlite:///{db}", "--color", "always"
    )
    assert "\x1b[48;5;196m\x1b[38;5;16m tok3\x1b[0m" in coloured  # the peak token is red
    assert "\x1b[48;5;" in coloured and " tok0" in coloured  # zero-valued token uncoloured


def test_show_survives_corrupt_rows(db: Path, capsys) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE tokens SET features = 'garbage' WHERE position = 2")
        conn.execute("UPDATE tokens SET text = NULL WHERE position = 1")
        conn.execute("UPDATE alerts SET feature_values = '{\"x\": \"high\"}', value = 'n/a'")
        conn.execute("UPDATE tokens SET text = 'evil\x1b[2J' WHERE position = 0")
    code, out, err = run(
        capsys, "audit", "show", "conv-a", "--store", f"sqlite:///{db}", "--color", "always"
    )
    assert code == 0
    assert "warning: damaged row" in err and "malformed JSON" in err
    assert "value=\ufffd" in out
    assert "\x1b[2J" not in out and "evil\\x1b[2J" in out  # model text cannot drive the terminal


def test_export_jsonl_and_csv(db: Path, tmp_path: Path, capsys) -> None:
    out_file = tmp_path / "out.jsonl"
    code, _, err = run(
        capsys,
        "audit",
        "export",
        "--store",
        f"sqlite:///{db}",
        "--format",
        "jsonl",
        "--out",
        str(out_file),
    )
    assert code == 0 and "exported 2" in err
    records = [json.loads(line) for line in out_file.read_text().splitlines()]
    a = next(r for r in records if r["summary"]["conversation_id"] == "conv-a")
    assert len(a["tokens"]) == 8 and a["alerts"][0]["rule"] == "sustained-deception"
    code, out, _ = run(
        capsys, "audit", "export", "--store", f"sqlite:///{db}", "--format", "csv", "--rule", "bias"
    )
    rows = list(csv.DictReader(io.StringIO(out)))
    assert {r["conversation_id"] for r in rows} == {"conv-b"} and len(rows) == 2
    assert rows[1]["alert_rules"] == "bias" and json.loads(rows[1]["features"]) == {
        "probes/deception": 1.0
    }


def test_purge(db: Path, capsys) -> None:
    code, out, _ = run(
        capsys, "audit", "purge", "--store", f"sqlite:///{db}", "--older-than-days", "5"
    )
    assert code == 0 and "purged 1 conversation" in out
    _, out, _ = run(capsys, "audit", "list", "--store", f"sqlite:///{db}", "--json")
    assert [c["conversation_id"] for c in json.loads(out)] == ["conv-a"]
    code, _, err = run(
        capsys, "audit", "purge", "--store", f"sqlite:///{db}", "--older-than-days", "-1"
    )
    assert code == 2 and "--older-than-days" in err


def test_module_entry_point(db: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "monitor.audit.cli", "audit", "list", "--store", f"sqlite:///{db}"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert proc.returncode == 0 and "conv-a" in proc.stdout
