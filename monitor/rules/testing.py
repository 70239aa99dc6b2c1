"""Rule unit tests, promtool style: feature series in a compact notation -> expected firings.

A test file::

    rule_files: [../deception.yaml]       # relative to the test file
    model: gemma-2-2b                     # optional, what exceptions see as `model`
    aggregations:                         # optional: what pooled() expands from, as the
      deception: max_rolling_mean:8       # pack records it (`pack inspect --json`), per
      bias:                               # alias or pack/feature name
        aggregation: max_rolling_mean:512,for:8,roles
        labeled_roles: [assistant]
    tests:
      - name: sustained deception fires once
        rules: [sustained-deception]      # optional: only compare these rules' firings
        conversations:
          c1:
            role: assistant               # default assistant
            request_id: r1                # optional
            attributes: {tenant: acme}    # optional, for exceptions
            turns:                        # optional: split the series into turns
              - {role: user, tokens: 10}
              - {role: assistant, tokens: 24, request_id: r2, turn_end: false}
            series:                       # per feature alias (or pack/feature name)
              deception: "0x16 3x8 0x10"
        expect:
          - {rule: sustained-deception, conversation: c1, at_token: 19}

Series notation: ``V`` is one token of value V, ``VxN`` is N tokens of V, and ``A+DxN`` /
``A-DxN`` is N tokens A, A+D, A+2D, ... (N values, unlike promtool's N+1, so that ``0x16``
reads as "16 zeros"). Features a rule needs but a conversation does not list are 0.

Turn ends: each turn's last token ends that turn (rules with ``at: turn_end`` are checked
there), as a capture client marks a finished prompt or answer; ``turn_end: false`` on a turn
leaves it open (an answer still streaming). A conversation without ``turns`` is one turn,
ended unless the conversation says ``turn_end: false``; that key is also its turns' default.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from monitor.rules.engine import RuleEngine, SequenceSlice
from monitor.rules.errors import RuleLoadError
from monitor.rules.loader import load_rules
from monitor.rules.model import RuleSet
from monitor.rules.pooling import FeatureAggregation
from monitor.rules.yamlsource import MAX_FILE_BYTES

MAX_SERIES_TOKENS = 100_000
DEFAULT_ROLE = "assistant"

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_TERM = re.compile(rf"(?P<start>{_NUMBER})(?:(?P<step>[-+]\d+\.?\d*|[-+]\.\d+)?x(?P<count>\d+))?\Z")


class TestFileError(ValueError):
    """The test file itself is malformed (exit code 2), as opposed to a failing test."""

    __test__ = False  # not a pytest test class despite the name


@dataclass(frozen=True, order=True)
class Occurrence:
    """A firing, expected or observed: rule, conversation and 0-based token position."""

    rule: str
    conversation: str
    at_token: int

    def __str__(self) -> str:
        return f"{self.rule} on {self.conversation} at token {self.at_token}"


@dataclass
class Turn:
    """One turn of a test conversation: its role, token count and request id."""

    role: str
    tokens: int
    request_id: str
    turn_end: bool = True  # its last token ends the turn


@dataclass
class Conversation:
    """A test conversation: feature series per token, turns, and attributes exceptions match on."""

    name: str
    series: dict[str, list[float]]  # qualified feature name -> values
    turns: list[Turn]
    attributes: dict[str, str] = field(default_factory=dict)

    @property
    def length(self) -> int:
        """Its token count."""
        return sum(turn.tokens for turn in self.turns)


@dataclass
class TestCase:
    """One test of a rule test file: conversations to replay and the firings expected."""

    __test__ = False

    name: str
    conversations: list[Conversation]
    expect: list[Occurrence]
    rules: tuple[str, ...] | None = None  # None: compare every rule's firings


@dataclass
class CaseResult:
    """A test's firings against its expectations."""

    name: str
    fired: list[Occurrence]
    expected: list[Occurrence]

    @property
    def missing(self) -> list[Occurrence]:
        """Expected firings that did not happen."""
        return _minus(self.expected, self.fired)

    @property
    def unexpected(self) -> list[Occurrence]:
        """Firings that were not expected."""
        return _minus(self.fired, self.expected)

    @property
    def passed(self) -> bool:
        """The firings are exactly the expected ones."""
        return sorted(self.fired) == sorted(self.expected)


@dataclass
class FileResult:
    """The results of one test file, or why its rules did not load."""

    path: str
    cases: list[CaseResult] = field(default_factory=list)
    load_error: RuleLoadError | None = None

    @property
    def passed(self) -> bool:
        """The rules loaded and every test passed."""
        return self.load_error is None and all(case.passed for case in self.cases)


def _minus(left: list[Occurrence], right: list[Occurrence]) -> list[Occurrence]:
    rest = list(right)
    out = []
    for item in sorted(left):
        if item in rest:
            rest.remove(item)
        else:
            out.append(item)
    return out


# --------------------------------------------------------------------------- series notation


def parse_series(text: str) -> list[float]:
    """Expand ``"0x16 3x8 1+0.5x4"``; raises ValueError naming the bad term."""
    values: list[float] = []
    for term in str(text).split():
        match = _TERM.match(term)
        if match is None:
            raise ValueError(f"bad series term {term!r} (use V, VxN or A+DxN)")
        start = float(match.group("start"))
        count = int(match.group("count") or 1)
        step = float(match.group("step") or 0.0)
        if count < 1 or len(values) + count > MAX_SERIES_TOKENS:
            raise ValueError(f"series term {term!r}: count must be 1..{MAX_SERIES_TOKENS} in all")
        values.extend(start + step * i for i in range(count))
    if not values:
        raise ValueError("empty series")
    return values


# --------------------------------------------------------------------------- reading test files


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise TestFileError(f"{path}: file too large (max 1 MiB)")
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise TestFileError(f"{path}: cannot read file: {exc.strerror or exc}") from None
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as exc:
        raise TestFileError(f"{path}: not a valid YAML test file: {exc}") from None
    if not isinstance(data, dict):
        raise TestFileError(f"{path}: a test file must be a mapping with rule_files and tests")
    return data


def _expect_type(value: object, kind: type | tuple[type, ...], where: str, what: str) -> Any:
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise TestFileError(f"{where}: must be {what}")
    return value


def _unknown_keys(data: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    extra = sorted(set(map(str, data)) - set(allowed))
    if extra:
        raise TestFileError(f"{where}: unknown key(s) {', '.join(extra)} (allowed: {allowed})")


def load_test_file(path: Path) -> tuple[list[Path], str, list[dict[str, Any]]]:
    """rule file paths (resolved against the test file), model, raw test entries."""
    data = _read_yaml(path)
    where = str(path)
    _unknown_keys(data, ("rule_files", "model", "aggregations", "tests"), where)
    files = _expect_type(data.get("rule_files"), list, f"{where}: rule_files", "a list of paths")
    if not files or not all(isinstance(f, str) and f for f in files):
        raise TestFileError(f"{where}: rule_files must be a non-empty list of paths")
    model = _expect_type(data.get("model", ""), str, f"{where}: model", "a string")
    tests = _expect_type(data.get("tests"), list, f"{where}: tests", "a list of tests")
    return [path.parent / f for f in files], model, tests


def build_case(raw: object, index: int, path: Path, rules: RuleSet) -> TestCase:
    """Parse test `index` of a test file into a TestCase, checking it against `rules`."""
    where = f"{path}: tests[{index}]"
    raw = _expect_type(raw, dict, where, "a mapping with name, conversations and expect")
    _unknown_keys(raw, ("name", "rules", "conversations", "expect"), where)
    name = str(raw.get("name") or f"test {index + 1}")
    where = f"{path}: test {name!r}"
    convs = _expect_type(raw.get("conversations"), dict, f"{where}: conversations", "a mapping")
    if not convs:
        raise TestFileError(f"{where}: conversations must not be empty")
    conversations = [_conversation(str(k), v, f"{where}: {k}", rules) for k, v in convs.items()]
    expect = [_occurrence(item, f"{where}: expect") for item in _list(raw.get("expect"), where)]
    names = {rule.name for rule in rules.rules}
    only = raw.get("rules")
    if only is not None:
        only = tuple(_expect_type(only, list, f"{where}: rules", "a list of rule names"))
    for rule in [*(only or ()), *(o.rule for o in expect)]:
        if rule not in names:
            raise TestFileError(f"{where}: no rule named {rule!r} in the rule files")
    return TestCase(name, conversations, expect, only)


def _list(value: object, where: str) -> list[Any]:
    if value is None:
        return []
    return _expect_type(value, list, f"{where}: expect", "a list (empty: nothing fires)")


def _occurrence(item: object, where: str) -> Occurrence:
    item = _expect_type(item, dict, where, "a list of {rule, conversation, at_token}")
    _unknown_keys(item, ("rule", "conversation", "at_token"), where)
    try:
        rule, conversation, at = item["rule"], item["conversation"], item["at_token"]
    except KeyError as exc:
        raise TestFileError(f"{where}: entry is missing {exc.args[0]!r}") from None
    _expect_type(at, int, f"{where}: at_token", "a token position (integer >= 0)")
    return Occurrence(str(rule), str(conversation), at)


def _conversation(name: str, raw: object, where: str, rules: RuleSet) -> Conversation:
    raw = _expect_type(raw, dict, where, "a mapping with series")
    _unknown_keys(raw, ("role", "request_id", "attributes", "turns", "series", "turn_end"), where)
    series = _series(raw.get("series"), where, rules)
    length = len(next(iter(series.values())))
    role = str(raw.get("role", DEFAULT_ROLE))
    request = str(raw.get("request_id", ""))
    ended = _expect_type(raw.get("turn_end", True), bool, f"{where}: turn_end", "true or false")
    turns = _turns(raw.get("turns"), where, role, request, ended) or [
        Turn(role, length, request, ended)
    ]
    if sum(turn.tokens for turn in turns) != length:
        raise TestFileError(
            f"{where}: turns cover {sum(t.tokens for t in turns)} tokens, the series have {length}"
        )
    attributes = _expect_type(raw.get("attributes", {}), dict, f"{where}: attributes", "a mapping")
    return Conversation(name, series, turns, {str(k): str(v) for k, v in attributes.items()})


def _series(raw: object, where: str, rules: RuleSet) -> dict[str, list[float]]:
    raw = _expect_type(raw, dict, f"{where}: series", "a mapping of feature alias to values")
    if not raw:
        raise TestFileError(f"{where}: series must name at least one feature")
    series = {}
    for key, text in raw.items():
        qualified = rules.feature_aliases.get(str(key)) or (str(key) if "/" in str(key) else None)
        if qualified is None:
            known = ", ".join(sorted(rules.feature_aliases)) or "none"
            raise TestFileError(f"{where}: unknown feature alias {key!r} (aliases: {known})")
        try:
            series[qualified] = parse_series(text)
        except ValueError as exc:
            raise TestFileError(f"{where}: series {key}: {exc}") from None
    lengths = {len(values) for values in series.values()}
    if len(lengths) != 1:
        raise TestFileError(f"{where}: series have different lengths {sorted(lengths)}")
    return series


def _turns(raw: object, where: str, role: str, request: str, ended: bool) -> list[Turn]:
    if raw is None:
        return []
    turns = []
    for item in _expect_type(raw, list, f"{where}: turns", "a list of {role, tokens}"):
        item = _expect_type(item, dict, f"{where}: turns", "a list of {role, tokens}")
        _unknown_keys(item, ("role", "tokens", "request_id", "turn_end"), f"{where}: turns")
        tokens = _expect_type(item.get("tokens"), int, f"{where}: turns", "{tokens: N >= 1}")
        if tokens < 1:
            raise TestFileError(f"{where}: turns: tokens must be >= 1")
        turn_end = _expect_type(
            item.get("turn_end", ended), bool, f"{where}: turns: turn_end", "true or false"
        )
        turns.append(
            Turn(
                str(item.get("role", role)),
                tokens,
                str(item.get("request_id", request)),
                turn_end,
            )
        )
    return turns


def _aggregations(path: Path, rule_paths: list[Path]) -> dict[str, FeatureAggregation] | None:
    """The test file's ``aggregations:`` (None without one: ``pooled()`` is then an error),
    keyed by ``<pack>/<feature>``; an alias key is looked up in the rule files' aliases."""
    raw = _read_yaml(path).get("aggregations")
    if raw is None:
        return None
    where = f"{path}: aggregations"
    raw = _expect_type(raw, dict, where, "a mapping of feature alias to aggregation")
    try:  # the aliases alone; pooled() is expanded by the real load that follows
        aliases: Mapping[str, str] = load_rules(rule_paths, unexpanded=[]).feature_aliases
    except RuleLoadError:
        return None  # the real load reports why (and pooled() too)
    found = {}
    for key, value in raw.items():
        name = aliases.get(str(key))
        if name is None and str(key) in aliases.values():
            name = str(key)  # a '<pack>/<feature>' the rule files alias
        if name is None:
            known = ", ".join(sorted(aliases)) or "none"
            raise TestFileError(f"{where}: unknown feature alias {key!r} (aliases: {known})")
        if isinstance(value, str):
            found[name] = FeatureAggregation(value)
            continue
        value = _expect_type(
            value, dict, f"{where}: {key}", "an aggregation or {aggregation, labeled_roles}"
        )
        _unknown_keys(value, ("aggregation", "labeled_roles"), f"{where}: {key}")
        text = _expect_type(value.get("aggregation"), str, f"{where}: {key}", "an aggregation")
        roles = _expect_type(
            value.get("labeled_roles", []), list, f"{where}: {key}", "a list of roles"
        )
        if not all(isinstance(role, str) and role for role in roles):
            raise TestFileError(f"{where}: {key}: labeled_roles must be non-empty strings")
        found[name] = FeatureAggregation(text, tuple(roles))
    return found


# --------------------------------------------------------------------------- running


def run_case(case: TestCase, rules: RuleSet, model: str = "") -> CaseResult:
    """Feed every conversation of a case as one batch (one slice per turn) to a fresh engine."""
    engine = RuleEngine(rules, max_conversations=max(1, len(case.conversations)))
    names = rules.required_features | {n for c in case.conversations for n in c.series}
    total = sum(c.length for c in case.conversations)
    columns = {name: torch.zeros(total, dtype=torch.float32) for name in names}
    slices, row = [], 0
    for conv in case.conversations:
        for name, values in conv.series.items():
            columns[name][row : row + conv.length] = torch.tensor(values, dtype=torch.float32)
        position = 0
        for turn in conv.turns:
            slices.append(
                SequenceSlice(
                    conv.name,
                    row + position,
                    turn.tokens,
                    position,
                    turn.role,
                    request_id=turn.request_id,
                    attributes=conv.attributes,
                    turn_end=turn.turn_end,
                )
            )
            position += turn.tokens
        row += conv.length
    result = engine.evaluate(columns, slices, model=model)
    fired = [
        Occurrence(f.rule, f.conversation_id, f.position)
        for f in result.firings
        if case.rules is None or f.rule in case.rules
    ]
    return CaseResult(case.name, sorted(fired), sorted(case.expect))


def run_test_file(path: str | Path) -> FileResult:
    """Run every test of one file. Raises TestFileError when the file itself is malformed."""
    path = Path(path)
    rule_paths, model, raw_tests = load_test_file(path)
    result = FileResult(str(path))
    try:
        rules = load_rules(rule_paths, aggregations=_aggregations(path, rule_paths))
    except RuleLoadError as exc:
        result.load_error = exc
        return result
    cases = [build_case(raw, i, path, rules) for i, raw in enumerate(raw_tests)]
    result.cases = [run_case(case, rules, model) for case in cases]
    return result
