"""``safety-monitor rules check|test``: validate rule files and run their unit tests.

Exit codes follow promtool: 0 all good; 1 invalid rules or failing tests; 2 a malformed test
file (or bad usage).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from monitor.escape import escape_text
from monitor.rules.errors import RuleIssue, RuleLoadError
from monitor.rules.loader import load_rules
from monitor.rules.pooling import PackFeatures
from monitor.rules.testing import CaseResult, FileResult, TestFileError, run_test_file

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


def add_rules_commands(rules_subparsers: argparse._SubParsersAction) -> None:
    """Register ``check`` and ``test`` on the ``rules`` command's subparsers.

    Each sets ``handler`` (as the other commands do) returning an exit code.
    """
    check = rules_subparsers.add_parser(
        "check", help="validate rule files; print every error as path:line:col: message"
    )
    check.add_argument("paths", nargs="+", type=Path, metavar="FILE|DIR", help="rule files")
    check.add_argument(
        "--features",
        help="comma-separated <pack>/<feature> names the aliases must exist in "
        "(default: any well-formed name)",
    )
    check.add_argument(
        "--packs",
        nargs="+",
        type=Path,
        metavar="PACK",
        help="feature packs: aliases must exist in them, and thresholds naming a pack feature "
        "take its calibrated value",
    )
    check.set_defaults(handler=rules_check_command)

    test = rules_subparsers.add_parser("test", help="run rule unit tests (promtool-like)")
    test.add_argument(
        "files", nargs="+", type=Path, metavar="TESTFILE", help="test files, or dirs of them"
    )
    test.add_argument("-v", "--verbose", action="store_true", help="also list passing tests")
    test.set_defaults(handler=rules_test_command)


# --------------------------------------------------------------------------- check


def rules_check_command(args: argparse.Namespace) -> int:
    """`safety-monitor rules check`."""
    known: Any = _feature_names(args.features) if args.features else None
    if args.packs:
        from monitor.features.errors import FeatureError
        from monitor.features.pack import load_pack

        try:
            packs = [load_pack(path) for path in args.packs]
        except FeatureError as exc:
            print(f"safety-monitor: error: {exc}", file=sys.stderr)
            return EXIT_FAILED
        known = PackFeatures.of(packs)  # thresholds and aggregations: pooled() expands
    return check_rules(args.paths, known, out=sys.stdout, err=sys.stderr)


def _feature_names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def check_rules(
    paths: Sequence[str | Path],
    known_features: Sequence[str] | Mapping[str, float | None] | None = None,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """Load the rule files and print every issue to `err` (exit 1) or a summary to `out` (exit
    0).

    Without packs (``known_features`` not a ``PackFeatures``), ``pooled(<alias>)`` cannot be
    expanded: its window, guard and roles are in the pack. Such rules are checked for
    everything else, each ``pooled()`` is listed on `out` as not expanded, and the summary says
    how many rules that left unchecked (exit 0: nothing found is wrong)."""
    unexpanded: list[RuleIssue] = []
    try:
        ruleset = load_rules(paths, known_features=known_features, unexpanded=unexpanded)
    except RuleLoadError as exc:
        for issue in exc.issues:
            print(issue, file=err)
        count = len(exc.issues)
        print(f"{count} error{'s' if count != 1 else ''}", file=err)
        return EXIT_FAILED
    for note in unexpanded:
        print(f"note: {note}", file=out)
    for line in ruleset.notes:  # they quote rule files and packs: escaped for the terminal
        print(f"note: {escape_text(line)}", file=out)
    enabled = len(ruleset.enabled_rules)
    summary = f"OK: {len(ruleset.rules)} rules ({enabled} enabled) in {len(ruleset.files)} files"
    if unexpanded:
        summary += (
            f"; {len(unexpanded)} pooled() not expanded without --packs: the rules using "
            "them are checked except for their pooling and not counted"
        )
    print(summary, file=out)
    return EXIT_OK


# --------------------------------------------------------------------------- test


def rules_test_command(args: argparse.Namespace) -> int:
    """`safety-monitor rules test`."""
    return run_tests(args.files, verbose=args.verbose, out=sys.stdout)


def run_tests(files: Sequence[str | Path], verbose: bool = False, out: TextIO = sys.stdout) -> int:
    """Run test files; 0 all pass, 1 a test failed or rules did not load, 2 bad test file."""
    code, passed, failed = EXIT_OK, 0, 0
    for path in _test_files(files):
        try:
            result = run_test_file(path)
        except TestFileError as exc:
            print(f"ERROR {exc}", file=out)
            code = EXIT_BAD_INPUT
            continue
        _report_file(result, verbose, out)
        passed += sum(case.passed for case in result.cases)
        failed += sum(not case.passed for case in result.cases) + (result.load_error is not None)
        if not result.passed and code == EXIT_OK:
            code = EXIT_FAILED
    print(f"{passed} passed, {failed} failed", file=out)
    return code


def _test_files(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given; a directory stands for its ``*.yaml``/``*.yml`` files."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.extend(sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml")))
        else:
            found.append(path)
    return found


def _report_file(result: FileResult, verbose: bool, out: TextIO) -> None:
    if result.load_error is not None:
        print(f"FAIL {result.path}: rule files do not load:", file=out)
        for issue in result.load_error.issues:
            print(f"  {issue}", file=out)
        return
    for case in result.cases:
        if not case.passed:
            _report_failure(result.path, case, out)
        elif verbose:
            print(f"ok   {result.path}: {case.name}", file=out)


def _report_failure(path: str, case: CaseResult, out: TextIO) -> None:
    print(f"FAIL {path}: {case.name}", file=out)
    print(f"  expected: {_listing(case.expected)}", file=out)
    print(f"  fired:    {_listing(case.fired)}", file=out)
    for item in case.missing:
        print(f"  missing:    {item}", file=out)
    for item in case.unexpected:
        print(f"  unexpected: {item}", file=out)


def _listing(items: Sequence[object]) -> str:
    return "; ".join(map(str, items)) if items else "(nothing)"


# --------------------------------------------------------------------------- python -m


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m monitor.rules.cli check|test ...``, the same commands without the sidecar."""
    parser = argparse.ArgumentParser(prog="safety-monitor rules")
    add_rules_commands(parser.add_subparsers(metavar="COMMAND"))
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return EXIT_BAD_INPUT
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
