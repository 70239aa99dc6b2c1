"""The README's benchmark commands exist: every `safety-monitor bench ...` it shows (and the
earlier passes in docs/benchmarks-history.md) parses with the real command line (subcommand and
options), so a renamed or removed benchmark or option cannot leave stale instructions behind."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from monitor.cli import _parser

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
HISTORY = ROOT / "docs" / "benchmarks-history.md"
_SPAN = re.compile(r"`(safety-monitor bench[^`]*)`")


def _bench_spans(*files: Path) -> list[str]:
    return [span for path in files or (README, HISTORY) for span in _SPAN.findall(path.read_text())]


def _bench_names() -> set[str]:
    parser = _parser()
    commands = next(a for a in parser._actions if a.dest == "==SUPPRESS==" or a.choices)
    bench = commands.choices["bench"]
    sub = next(a for a in bench._actions if getattr(a, "choices", None))
    return set(sub.choices)


def test_the_readme_shows_bench_commands():
    spans = _bench_spans(README)
    assert len(spans) >= 4  # the Benchmarks section names each benchmark with its command
    assert {"encoder", "rules", "overhead", "sidecar"} <= _bench_names()


@pytest.mark.parametrize("span", _bench_spans())
def test_every_bench_command_in_the_readme_parses(span):
    words = shlex.split(span)[1:]  # without the program name
    if "|" in words:  # `safety-monitor bench a | b | c`: a list of benchmark names
        names = [w for w in words[1:] if w != "|"]
        assert set(names) <= _bench_names(), span
        return
    try:
        args = _parser().parse_args(words)
    except SystemExit as exc:  # argparse's way of refusing a command line
        pytest.fail(f"README shows {span!r}, which the command line refuses ({exc})")
    assert callable(args.handler), span
