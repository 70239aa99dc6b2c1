"""`rules check` / `rules test`, the series notation, hot reload and the shipped rule sets."""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from monitor.rules import load_rules
from monitor.rules.cli import add_rules_commands, check_rules, main, run_tests
from monitor.rules.reload import RuleReloader
from monitor.rules.testing import parse_series

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "rules"

GOOD = """\
features: {a: p/a}
rules:
  - {rule: high, severity: warning, condition: a > 1, for: 3}
"""


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


# --------------------------------------------------------------------------- series notation


@pytest.mark.parametrize(
    ("text", "values"),
    [
        ("1", [1.0]),
        ("0x3 2.5x2", [0.0, 0.0, 0.0, 2.5, 2.5]),
        ("-1x2", [-1.0, -1.0]),
        ("1+1x4", [1.0, 2.0, 3.0, 4.0]),
        ("10-2.5x3 0", [10.0, 7.5, 5.0, 0.0]),
        ("1e1x2", [10.0, 10.0]),
    ],
)
def test_series_notation(text, values):
    assert parse_series(text) == values


@pytest.mark.parametrize("text", ["", "x3", "1x0", "1+x3", "abc", "1x", "1x200001"])
def test_bad_series(text):
    with pytest.raises(ValueError):
        parse_series(text)


# --------------------------------------------------------------------------- check


def test_check_ok_and_errors(tmp_path):
    good = write(tmp_path / "good.yaml", GOOD)
    bad = write(
        tmp_path / "bad.yaml",
        "features: {b: p/b}\nrules:\n  - {rule: x, severity: loud, condition: bb > 1}\n",
    )
    out, err = io.StringIO(), io.StringIO()
    assert check_rules([good], out=out, err=err) == 0
    assert out.getvalue().startswith("OK: 1 rules (1 enabled) in 1 files")
    assert check_rules([good, bad], out=out, err=err) == 1
    assert err.getvalue().splitlines() == [
        f"{bad}:3:25: invalid severity 'loud' (one of: info, warning, critical)",
        f"{bad}:3:42: unknown feature 'bb' (did you mean 'b'?)",
        "2 errors",
    ]


def test_check_against_known_features(tmp_path, capsys):
    good = write(tmp_path / "good.yaml", GOOD)
    assert main(["check", str(good), "--features", "p/a,p/z"]) == 0
    assert main(["check", str(good), "--features", "p/b"]) == 1
    assert "unknown feature 'p/a' (did you mean 'p/b'?)" in capsys.readouterr().err


def test_commands_register_on_a_rules_subparser(tmp_path):
    parser = argparse.ArgumentParser(prog="safety-monitor")
    rules = parser.add_subparsers().add_parser("rules")
    add_rules_commands(rules.add_subparsers())
    args = parser.parse_args(["rules", "check", str(write(tmp_path / "r.yaml", GOOD))])
    assert args.handler(args) == 0


# --------------------------------------------------------------------------- test


def _test_file(tmp_path: Path, tests: str) -> Path:
    write(tmp_path / "r.yaml", GOOD)
    return write(tmp_path / "t.yaml", "rule_files: [r.yaml]\ntests:\n" + textwrap.dedent(tests))


def test_rules_test_pass_and_fail(tmp_path):
    path = _test_file(
        tmp_path,
        """\
        - name: fires
          conversations: {c1: {series: {a: "0x2 2x5 0x2 2x3"}}}
          expect:
            - {rule: high, conversation: c1, at_token: 4}
            - {rule: high, conversation: c1, at_token: 11}
        - name: silent
          conversations: {c1: {series: {a: "2x2 0x1 2x2"}}}
          expect: []
        """,
    )
    out = io.StringIO()
    assert run_tests([path], out=out) == 0
    assert out.getvalue().strip() == "2 passed, 0 failed"
    failing = _test_file(
        tmp_path,
        """\
        - name: wrong position
          conversations: {c1: {series: {a: "2x5"}}}
          expect: [{rule: high, conversation: c1, at_token: 3}]
        """,
    )
    out = io.StringIO()
    assert run_tests([failing], out=out) == 1
    assert out.getvalue().splitlines() == [
        f"FAIL {failing}: wrong position",
        "  expected: high on c1 at token 3",
        "  fired:    high on c1 at token 2",
        "  missing:    high on c1 at token 3",
        "  unexpected: high on c1 at token 2",
        "0 passed, 1 failed",
    ]


@pytest.mark.parametrize(
    ("tests", "message"),
    [
        ("- {name: x, conversations: {c: {series: {zz: '1'}}}}\n", "unknown feature alias 'zz'"),
        ("- {name: x, conversations: {c: {series: {a: '1 q'}}}}\n", "bad series term 'q'"),
        (
            "- {name: x, conversations: {c: {series: {a: '1'}}}, expect: [{rule: nope, "
            "conversation: c, at_token: 0}]}\n",
            "no rule named 'nope'",
        ),
        (
            "- {name: x, conversations: {c: {series: {a: '1'}}}, expect: [{rule: high}]}\n",
            "missing 'conversation'",
        ),
        (
            "- {name: x, conversations: {c: {turns: [{tokens: 2}], series: {a: '1'}}}}\n",
            "turns cover 2 tokens",
        ),
        ("- {name: x, conversation: {}}\n", "unknown key(s) conversation"),
        ("- [1]\n", "must be a mapping"),
    ],
)
def test_bad_test_files_exit_2(tmp_path, tests, message):
    out = io.StringIO()
    assert run_tests([_test_file(tmp_path, tests)], out=out) == 2
    assert message in out.getvalue()


def test_broken_rule_file_fails_the_test_file(tmp_path):
    write(tmp_path / "r.yaml", "rules:\n  - {rule: r, severity: info, condition: nope > 1}\n")
    path = write(tmp_path / "t.yaml", "rule_files: [r.yaml]\ntests: []\n")
    out = io.StringIO()
    assert run_tests([path, tmp_path / "missing.yaml"], out=out) == 2
    text = out.getvalue()
    assert "rule files do not load" in text and "r.yaml:2:42: unknown feature 'nope'" in text
    assert f"ERROR {tmp_path / 'missing.yaml'}: cannot read file" in text


def test_turns_roles_requests_and_attributes(tmp_path):
    write(
        tmp_path / "r.yaml",
        """\
        features: {a: p/a}
        rules:
          - rule: r
            severity: info
            condition: rolling_sum(a, 4) >= 3
            scope: request
            roles: [assistant]
            exceptions: [{name: e, attributes: {tenant: [t1], model: [m1]}}]
        """,
    )
    path = write(
        tmp_path / "t.yaml",
        """\
        rule_files: [r.yaml]
        model: m1
        tests:
          - name: requests reset, users are skipped, t1 on m1 is excepted
            conversations:
              c1:
                turns:
                  - {role: assistant, tokens: 2, request_id: q1}
                  - {role: assistant, tokens: 3, request_id: q2}
                  - {role: user, tokens: 3}
                series: {a: "1x8"}
              c2:
                attributes: {tenant: t1}
                series: {a: "1x8"}
            expect: [{rule: r, conversation: c1, at_token: 4}]
        """,
    )
    out = io.StringIO()
    assert run_tests([path], out=out) == 0, out.getvalue()


# --------------------------------------------------------------------------- reload


def test_reloader_picks_up_changes_and_keeps_old_set_on_error(tmp_path):
    path = write(tmp_path / "r.yaml", GOOD)
    reloader = RuleReloader([tmp_path], known_features={"p/a"})
    first = reloader.check()
    assert first is not None and first.ok and [r.name for r in first.ruleset.rules] == ["high"]
    assert reloader.check() is None  # nothing changed
    path.write_text(GOOD)  # same content, new mtime: still nothing to do
    assert reloader.check() is None

    path.write_text(GOOD.replace("high", "higher"))
    changed = reloader.check()
    assert changed.ok and [r.name for r in changed.ruleset.rules] == ["higher"]

    path.write_text(GOOD.replace("a > 1", "b > 1"))
    broken = reloader.check()
    assert not broken.ok and broken.ruleset is None
    assert f"{path}:3:48: unknown feature 'b'" in broken.error
    assert [r.name for r in reloader.ruleset.rules] == ["higher"]  # the old set stays
    assert reloader.check() is None  # the same broken content is reported once
    assert not reloader.check(force=True).ok  # SIGHUP re-reads anyway

    write(tmp_path / "more.yaml", "rules:\n  - {rule: more, severity: info, condition: a > 2}\n")
    path.write_text(GOOD)
    fixed = reloader.check()
    assert fixed.ok and sorted(r.name for r in fixed.ruleset.rules) == ["high", "more"]


def test_reloader_baseline_and_deleted_file(tmp_path):
    path = write(tmp_path / "r.yaml", GOOD)
    running = load_rules([path])
    reloader = RuleReloader([path], ruleset=running)
    assert reloader.check() is None and reloader.ruleset is running
    assert reloader.check(force=True).ok
    path.unlink()
    gone = reloader.check()
    assert not gone.ok and "file not found" in gone.error


# --------------------------------------------------------------------------- shipped rule sets


def test_shipped_rules_check_and_test(capsys):
    files = [SHIPPED / f"{name}.yaml" for name in ("deception", "bias", "misuse")]
    assert all(path.is_file() for path in files)
    assert main(["check", str(SHIPPED)]) == 0
    for path in files:  # each file also stands alone
        assert main(["check", str(path)]) == 0
    tests = sorted((SHIPPED / "tests").glob("*_test.yaml"))
    assert [t.name for t in tests] == ["bias_test.yaml", "deception_test.yaml", "misuse_test.yaml"]
    assert main(["test", *map(str, tests)]) == 0, capsys.readouterr().out
    # The shipped rules pool with pooled(): loaded with the shipped pack, which records how.
    from monitor.demo_minilm import PACK
    from monitor.features.pack import load_pack
    from monitor.rules import PackFeatures

    ruleset = load_rules([SHIPPED], PackFeatures.of([load_pack(PACK)]))
    assert len(ruleset.rules) == 4
    assert {"probes/deception", "probes/bias", "probes/misuse"} <= ruleset.required_features
    # No SAE feature ids whose meaning the project has not checked (issue 13).
    assert not any(name.startswith("gemma2-2b") for name in ruleset.required_features)


def test_python_dash_m_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "monitor.rules.cli", "test", str(SHIPPED / "tests")],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("12 passed, 0 failed")
