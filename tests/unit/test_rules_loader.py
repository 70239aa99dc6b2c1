"""Loading rule files: the happy path and every located validation error."""

from __future__ import annotations

import hashlib
import tempfile
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monitor.rules import RuleLoadError, load_rules

GOOD = """\
features:
  bars: bars/17
  bio_weapons: misuse/3
macros:
  hot: bars > 2
rules:
  - rule: bars-high
    desc: Bars stay high.
    category: misuse
    severity: critical
    condition: hot and bars < 100
    for: 4 tokens
    roles: [assistant]
    labels: {team: ts}
    output: "bars {value:.2f} at token {position} of {conversation_id}"
    actions: [alert, audit]
    enabled: true
  - rule: off
    severity: info
    condition: bio_weapons > 1
    for: 2
    enabled: false
"""


@pytest.fixture
def here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _write(name: str, text: str) -> str:
    Path(name).write_text(textwrap.dedent(text))
    return name


def issues(text: str, known: set[str] | None = None) -> list[str]:
    with pytest.raises(RuleLoadError) as info:
        load_rules([_write("r.yaml", text)], known_features=known)
    assert str(info.value) == "\n".join(str(i) for i in info.value.issues)
    return [str(i) for i in info.value.issues]


def test_good_file_loads(here):
    ruleset = load_rules([_write("r.yaml", GOOD)])
    high, off = ruleset.rules
    assert (high.name, high.desc, high.category, high.severity) == (
        "bars-high",
        "Bars stay high.",
        "misuse",
        "critical",
    )
    assert (high.for_tokens, high.roles, high.labels) == (4, ("assistant",), {"team": "ts"})
    assert high.actions == ("alert", "audit") and high.enabled
    assert high.output.startswith("bars {value:.2f}")
    assert (high.source.path, high.source.line, high.source.col) == ("r.yaml", 7, 5)
    assert high.condition.features == {"bars/17"}
    assert (off.for_tokens, off.enabled, off.actions, off.category) == (
        2,
        False,
        ("alert",),
        "uncategorized",
    )
    assert ruleset.feature_aliases == {"bars": "bars/17", "bio_weapons": "misuse/3"}
    assert ruleset.required_features == {"bars/17"}  # disabled rules need nothing
    assert ruleset.files == [("r.yaml", hashlib.sha256(GOOD.encode()).hexdigest())]
    assert ruleset.macros == {"hot": "bars > 2"}


def test_known_features_accept_good_aliases(here):
    load_rules([_write("r.yaml", GOOD)], known_features={"bars/17", "misuse/3"})


RULE = "rules:\n  - rule: r\n    severity: info\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("feature: {}\n", "r.yaml:1:1: unknown top-level key 'feature' (did you mean 'features'?)"),
        (RULE + "    condition: x > 1\n", "r.yaml:4:16: unknown feature 'x'"),
        (
            "features: {bio_weapons: p/1}\n" + RULE + "    condition: bio_weapon > 1\n",
            "r.yaml:5:16: unknown feature 'bio_weapon' (did you mean 'bio_weapons'?)",
        ),
        (
            "features: {a: p/1}\n" + RULE + "    condition: 'a > 1 and  b'\n",
            "r.yaml:5:28: unknown feature 'b'",
        ),
        (
            "features: {a: p/1}\n" + RULE + '    condition: "a > 1 and b"\n',
            "r.yaml:5:27: unknown feature 'b'",
        ),
        (
            "features: {a: p/1}\n" + RULE + "    condition: |\n      a > 1 and\n        b > 2\n",
            "r.yaml:7:9: unknown feature 'b'",
        ),
        (
            "features: {a: p/1}\nrules:\n  - {rule: r, severity: info, condition: a > 1 and c}\n",
            "r.yaml:3:52: unknown feature 'c'",
        ),
        ("features: {a: p/1}\n" + RULE + "    condition: a > \n", "r.yaml:5:19: unexpected end"),
        ("features: {a: p/1}\n" + RULE + "    condition: a and 1\n", "r.yaml:5:16: operand of"),
        (
            "features: {a: p/1}\n" + RULE + "    condition: a > 1 > 2\n",
            "r.yaml:5:22: cannot compare a boolean with '>' (left side)",
        ),
        (
            "features: {a: p/1}\n" + RULE + "    condition: max(a) > 1\n",
            "r.yaml:5:16: max() takes at least 2 arguments (1 given)",
        ),
        (
            "features: {a: p/1}\n" + RULE + "    condition: a > 1\n    sevrity: x\n",
            "r.yaml:6:5: unknown rule key 'sevrity' (did you mean 'severity'?)",
        ),
        (
            "rules:\n  - rule: r\n    condition: a\n",
            "r.yaml:2:5: rule is missing required key 'severity'",
        ),
        ("rules:\n  - severity: info\n", "r.yaml:2:5: rule is missing required key 'rule'"),
        ("rules:\n  - rule: r\n    severity: info\n", "r.yaml:2:5: rule is missing required key"),
        (
            "features: {a: p/1}\nrules:\n  - {rule: r, severity: crit, condition: a > 1}\n",
            "r.yaml:3:25: invalid severity 'crit' (did you mean 'critical'?)",
        ),
        (
            "features: {a: p/1}\n" + RULE + "    condition: a > 1\n    for: 0 tokens\n",
            "r.yaml:6:10: 'for' must be a positive number of tokens",
        ),
        (
            "features: {a: p/1}\n" + RULE + "    condition: a > 1\n    for: 1.5\n",
            "r.yaml:6:10: 'for' must be a positive number of tokens",
        ),
        (
            "features: {a: p/1}\n" + RULE + "    condition: a > 1\n    for: -3\n",
            "r.yaml:6:10: 'for' must be a positive number of tokens",
        ),
        (
            "features: {a: p/1}\n" + RULE + "    condition: a > 1\n    output: '{valu:.2f}'\n",
            "r.yaml:6:13: unknown placeholder {valu} in output (did you mean 'value'?)",
        ),
        (
            "features: {a: p/1}\n" + RULE + "    condition: a > 1\n    output: '{value.real}'\n",
            "r.yaml:6:13: unknown placeholder {value.real}",
        ),
        (
            "features: {a: p/1}\n" + RULE + "    condition: a > 1\n    output: '{rule:.2f}'\n",
            "r.yaml:6:13: bad output template",
        ),
        (
            "features: {a: p/1}\n" + RULE + "    condition: a > 1\n    output: 'x {'\n",
            "r.yaml:6:13: bad output template",
        ),
        (
            "features: {a: p/1}\n" + RULE + "    condition: a > 1\n    actions: [alret]\n",
            "r.yaml:6:14: unknown action 'alret' (did you mean 'alert'?)",
        ),
        (
            "features: {a: p/1}\n" + RULE + "    condition: a > 1\n    enabled: maybe\n",
            "r.yaml:6:14: 'enabled' must be true or false",
        ),
        (
            "features: {a: p/1}\n" + RULE + "    condition: a > 1\n    roles: assistant\n",
            "r.yaml:6:12: 'roles' must be a list of strings",
        ),
        (
            "features: {a: p/1}\n" + RULE + "    condition: a > 1\n    labels: {bad-name: x}\n",
            "r.yaml:6:14: invalid label name 'bad-name'",
        ),
        (
            "features: {a: p/1}\nrules:\n  - {rule: r, severity: info, condition: a > 1}\n"
            "  - {rule: r, severity: info, condition: a > 2}\n",
            "r.yaml:4:12: duplicate rule 'r' (first at r.yaml:3:5)",
        ),
        (
            "macros:\n  x: y and 1 > 0\n  y: x\n" + RULE + "    condition: x\n",
            "r.yaml:3:6: macro cycle: x -> y -> x",
        ),
        ("macros:\n  m: nope > 1\n", "r.yaml:2:6: unknown feature 'nope'"),
        ("macros:\n  m: (1 > \n", "r.yaml:2:10: unexpected end of expression"),
        (
            "features: {a: p/1}\nmacros: {a: 1 > 0}\n",
            "r.yaml:2:10: 'a' is already defined at r.yaml:1:12",
        ),
        ("features: {and: p/1}\n", "r.yaml:1:12: 'and' is not a valid name"),
        ("features: {a: nopack}\n", "r.yaml:1:15: feature 'nopack' must be '<pack>/<feature>'"),
        ("features: {a: p/1, a: p/2}\n", "r.yaml:1:20: duplicate key 'a'"),
        ("rules: {}\n", "r.yaml:1:8: 'rules' must be a list of rules"),
        ("rules:\n  - just a string\n", "r.yaml:2:5: a rule must be a mapping"),
        ("features: [a]\n", "r.yaml:1:11: 'features' must be a mapping"),
        ("- 1\n- 2\n", "r.yaml:1:1: a rules file must be a mapping"),
        ("rules: [\n", "r.yaml:2:1: YAML syntax error"),
        ("a: b: c\n", "r.yaml:1:5: YAML syntax error: mapping values are not allowed here"),
        ("a: 1\n---\nb: 2\n", "r.yaml:2:1: YAML syntax error"),
        ("x: \x07\n", "r.yaml:1:4: YAML syntax error"),
    ],
)
def test_errors_are_located(here, text, expected):
    found = issues(text)
    assert any(line.startswith(expected) for line in found), found


def test_unknown_pack_feature_with_did_you_mean(here):
    found = issues("features:\n  x: bars/18\n", known={"bars/17", "bars/3"})
    assert found == ["r.yaml:2:6: unknown feature 'bars/18' (did you mean 'bars/17'?)"]


def test_all_errors_collected_across_files(here):
    _write(
        "a.yaml", "features: {x: p/1}\nrules:\n  - {rule: r, severity: info, condition: x > 1}\n"
    )
    _write("b.yaml", "features: {x: p/2}\nrules:\n  - {rule: r, severity: bad, condition: x > 1}\n")
    with pytest.raises(RuleLoadError) as info:
        load_rules(["a.yaml", "b.yaml", "missing.yaml"])
    assert [str(i) for i in info.value.issues] == [
        "missing.yaml:1:1: file not found",
        "b.yaml:1:12: 'x' is already defined at a.yaml:1:12",
        "b.yaml:3:25: invalid severity 'bad' (one of: info, warning, critical)",
    ]


def test_names_are_shared_across_files(here):
    Path("d").mkdir()
    _write("d/2.yml", "rules:\n  - {rule: two, severity: info, condition: hot}\n")
    _write("d/1.yaml", "features: {x: p/1}\nmacros: {hot: x > 1}\n")
    _write("d/ignored.txt", "not yaml: [")
    ruleset = load_rules(["d"])
    assert [path for path, _ in ruleset.files] == ["d/1.yaml", "d/2.yml"]
    assert ruleset.rules[0].condition.features == {"p/1"}


def test_same_file_twice_loads_once(here):
    _write("r.yaml", GOOD)
    assert len(load_rules(["r.yaml", "./r.yaml", "."]).rules) == 2


def test_empty_directory_and_empty_file(here):
    Path("empty").mkdir()
    with pytest.raises(RuleLoadError, match="empty:1:1: no"):
        load_rules(["empty"])
    assert load_rules([_write("e.yaml", "")]).rules == []


def test_not_utf8(here):
    Path("r.yaml").write_bytes(b"rules:\n  - \xff\n")
    with pytest.raises(RuleLoadError, match=r"r.yaml:2:5: file is not valid UTF-8"):
        load_rules(["r.yaml"])


def test_huge_format_width_rejected(here):
    text = "features: {a: p/1}\n" + RULE + "    condition: a > 1\n    output: '{value:>99999999}'\n"
    assert "too large" in issues(text)[0]


_FRAGMENTS = st.sampled_from(
    [
        "features:\n",
        "macros:\n",
        "rules:\n",
        "  - rule: r\n",
        "  - {rule: r, severity: info, condition: a > 1}\n",
        "    severity: info\n",
        "    condition: a > 1 and\n",
        "    condition: 'rolling_mean(a, 3) > 1'\n",
        "    for: 3 tokens\n",
        "    output: '{value}'\n",
        "  a: p/1\n",
        "  m: a > 1\n",
        "  m: m\n",
        "    roles: [assistant]\n",
        "  - [\n",
        "&x a: *x\n",
        "!!python/object:os.system\n",
        "\t",
        ": ",
        "- ",
        "'",
        '"',
        "{",
        "}",
        "#",
        "%YAML 1.1\n",
        "---\n",
    ]
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=200), st.lists(_FRAGMENTS, max_size=25).map("".join)))
def test_fuzz_only_rule_load_errors(text):
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "r.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            load_rules([path])
        except RuleLoadError as exc:
            assert exc.issues
            assert all(i.line >= 1 and i.col >= 1 for i in exc.issues)
