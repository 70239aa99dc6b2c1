"""`safety-monitor rules calibrate`: set named rule thresholds for a conversation-level FPR.

A rule's condition names a threshold of a ``thresholds:`` section (``rolling_mean(misuse, 8)
> misuse_request``). Calibration replays benign conversations through the real rules engine
(`engine_replay.py`) and searches, per threshold, the smallest value at which at most
``n - k`` of the ``n`` benign conversations see any rule using it fire, with
``k = ceil((n + 1)(1 - fpr))`` (the split-conformal rank, `monitor.conformal`): new benign
conversations from the same source then fire at a rate of at most ``fpr`` in expectation,
where allowing ``floor(fpr * n)`` would give ``(floor(fpr * n) + 1) / (n + 1)``. Whether a
larger value fires less or more is measured, not assumed. The chosen number is written in place
of the old one in the rule file (only that scalar changes; comments and layout stay), so rules
refer to it by name and nobody copies numbers by hand.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from monitor.conformal import allowed_above, fpr_upper_bound, minimum_negatives
from monitor.evaluation.engine_replay import EngineReplay
from monitor.rules import RuleSet, load_rules

_BRACKET_STEPS = 40
_BISECT_STEPS = 40
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass
class ThresholdResult:
    """One calibrated threshold: what it was, what it is now, and what that measures."""

    name: str
    path: str
    rules: list[str]
    old: float
    new: float
    fpr: float  # measured on the benign conversations at ``new``
    fired: int  # benign conversations any of its rules fired in, at ``new``
    # One-sided 95% Clopper-Pearson upper bound of the rate at ``new`` on new conversations
    # from the same source (not under distribution shift); None when ``kept``.
    fpr_upper_95: float | None = None
    note: str = ""
    # '<pack>/<feature>' -> aggregation of its rules' pooled() features: written with the
    # number, so a later load notices a refit that pools them otherwise.
    pooled: dict[str, str] = field(default_factory=dict)
    # True when the benign data cannot set this threshold (its rules fire in no more than the
    # allowed conversations at any value tried, e.g. no tokens of the roles they watch): the
    # old value stays and is not written.
    kept: bool = False


@dataclass
class CalibrationReport:
    """What `rules calibrate` found: each threshold's old and new value and measured FPR."""

    conversations: int
    target_fpr: float
    allowed: int = 0  # benign conversations that may fire: n - ceil((n + 1)(1 - fpr))
    minimum_conversations: int = 0  # the fewest that resolve target_fpr
    thresholds: list[ThresholdResult] = field(default_factory=list)
    uncalibrated: dict[str, float] = field(default_factory=dict)  # rule -> its benign FPR
    warnings: list[str] = field(default_factory=list)


def thresholds_used(ruleset: RuleSet) -> dict[str, list[str]]:
    """``{threshold name: [rules whose condition uses it, through macros too]}``."""
    used: dict[str, list[str]] = {}
    for rule in ruleset.enabled_rules:
        for name in _names(rule.condition.source, ruleset.macros, set()):
            if name in ruleset.thresholds:
                used.setdefault(name, []).append(rule.name)
    return used


def _names(text: str, macros: dict[str, str], seen: set[str]) -> set[str]:
    found = set()
    for name in _IDENT.findall(text):
        found.add(name)
        if name in macros and name not in seen:
            seen.add(name)
            found |= _names(macros[name], macros, seen)
    return found


def calibrate(
    replay: EngineReplay,
    rule_paths: Sequence[str | Path],
    known_features: dict[str, float | None],
    fpr: float,
    *,
    progress: Callable[[str], None] | None = None,
) -> CalibrationReport:
    """Search each numeric named threshold; returns the values (nothing is written)."""
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"--fpr: {fpr} is not in (0, 1)")
    n = len(replay.ids)
    allowed = allowed_above(n, fpr, "benign conversations")
    base = load_rules(rule_paths, known_features)
    report = CalibrationReport(n, fpr, allowed, minimum_negatives(fpr))
    used = thresholds_used(base)
    baseline = replay.run(base)
    calibrated_rules = {rule for names in used.values() for rule in names}
    for rule, fired in baseline.items():
        if rule not in calibrated_rules:
            report.uncalibrated[rule] = len(fired) / n
    values = {name: base.thresholds[name].value for name in used}
    for name, rules in sorted(used.items()):
        threshold = base.thresholds[name]
        if threshold.feature:
            report.warnings.append(
                f"threshold {name!r} takes {threshold.feature}'s calibrated value from its pack "
                "(pack calibrate sets it); not changed here"
            )
            continue
        if progress is not None:
            progress(name)

        def rate(value: float, name: str = name, rules: list[str] = rules) -> int:
            trial = load_rules(rule_paths, known_features, {**values, name: value})
            fired = replay.run(_only(trial, rules))
            return len(set().union(*fired.values())) if fired else 0

        new, fired, note = _search(rate, threshold.value, allowed)
        kept = note == _UNBOUNDED
        if kept:
            # The search walked as far as it could towards more firings (-5e11 for `x > t`)
            # without exceeding the allowance: the data says nothing about this threshold, and
            # writing that extreme would make its rules fire on every token of real traffic.
            new, fired = threshold.value, rate(threshold.value)
            note = (
                f"not changed: at no value tried do its rules fire in more than "
                f"{allowed} of the {n} benign conversations (do they hold tokens "
                "of the roles the rules watch?)"
            )
            report.warnings.append(f"threshold {name!r} ({', '.join(rules)}) {note}")
        values[name] = new
        pooled = {f: a for rule in rules for f, a in base.pooled.get(rule, {}).items()}
        report.thresholds.append(
            ThresholdResult(
                name,
                threshold.source.path,
                rules,
                threshold.value,
                new,
                fired / n,
                fired,
                None if kept else fpr_upper_bound(fired, n),
                note,
                pooled,
                kept,
            )
        )
    return report


def _only(ruleset: RuleSet, names: list[str]) -> RuleSet:
    keep = set(names)
    return RuleSet(
        [r for r in ruleset.rules if r.name in keep],
        ruleset.feature_aliases,
        ruleset.files,
        ruleset.macros,
        ruleset.lists,
        ruleset.thresholds,
    )


_UNBOUNDED = "the rules fire on no more than allowed at any value tried"


def _search(rate: Callable[[float], int], start: float, allowed: int) -> tuple[float, int, str]:
    """The value nearest the boundary at which at most ``allowed`` conversations fire.

    Finds which way fires less (a rule may say ``x < t``), brackets the boundary by doubling
    steps from ``start``, then bisects. Returns (value, conversations fired, note)."""
    step = max(1.0, abs(start))
    up, down = rate(start + step), rate(start - step)
    direction = 1.0 if up <= down else -1.0  # towards fewer firings
    good, bad = start, None  # good: fires <= allowed
    fired = rate(start)
    if fired <= allowed:
        for k in range(_BRACKET_STEPS):  # walk towards more firings until too many
            candidate = start - direction * step * 2**k
            if rate(candidate) > allowed:
                bad = candidate
                break
            good = candidate
        if bad is None:
            return good, rate(good), _UNBOUNDED
    else:
        bad = start
        for k in range(_BRACKET_STEPS):
            candidate = start + direction * step * 2**k
            if rate(candidate) <= allowed:
                good = candidate
                break
            bad = candidate
        else:
            return bad, rate(bad), "no value tried brings the false-positive rate down"
    for _ in range(_BISECT_STEPS):
        middle = (good + bad) / 2
        if middle in (good, bad) or abs(good - bad) <= 1e-6 * max(1.0, abs(good)):
            break
        if rate(middle) <= allowed:
            good = middle
        else:
            bad = middle
    value = _round_towards(good, bad)
    return value, rate(value), ""


def _round_towards(good: float, bad: float) -> float:
    """``good`` at 6 significant digits, rounded away from the boundary (towards fewer
    firings), so the written number fires no more than the searched one."""
    if good == 0.0:
        return 0.0
    scale = 10.0 ** (5 - math.floor(math.log10(abs(good))))
    rounded = math.ceil(good * scale) if good > bad else math.floor(good * scale)
    return float(f"{rounded / scale:.6g}")


def write_thresholds(results: Sequence[ThresholdResult]) -> list[str]:
    """Write each new value in place of the old one in its file (with the poolings of its
    rules' pooled() features, when they have any); thresholds the data could not set
    (``kept``) are left as they are. Returns the files written."""
    by_file: dict[str, dict[str, float]] = {}
    pooled: dict[str, dict[str, dict[str, str]]] = {}
    for result in results:
        if result.kept:
            continue
        by_file.setdefault(result.path, {})[result.name] = result.new
        pooled.setdefault(result.path, {})[result.name] = result.pooled
    for path, values in by_file.items():
        text = Path(path).read_text(encoding="utf-8")
        Path(path).write_text(replace_thresholds(text, values, pooled[path]), encoding="utf-8")
    return sorted(by_file)


def replace_thresholds(
    text: str, values: dict[str, float], pooled: dict[str, dict[str, str]] | None = None
) -> str:
    """``text`` with the ``thresholds:`` entries named in ``values`` set to those numbers; an
    entry with poolings in ``pooled`` becomes ``{value: N, pooled: {feature: aggregation}}``
    (what the number was calibrated under), one without a plain number."""
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if not isinstance(root, MappingNode):
        raise ValueError("not a rules file (top level is not a mapping)")
    section = next(
        (v for k, v in root.value if isinstance(k, ScalarNode) and k.value == "thresholds"), None
    )
    if not isinstance(section, MappingNode):
        raise ValueError("no thresholds: section")
    spans = []
    for key, value in section.value:
        if isinstance(key, ScalarNode) and key.value in values:
            entry = _entry(values[key.value], (pooled or {}).get(key.value) or {})
            spans.append((value.start_mark.index, _end(value), entry))
    missing = set(values) - {k.value for k, _ in section.value if isinstance(k, ScalarNode)}
    if missing:
        raise ValueError(f"no threshold {sorted(missing)[0]!r} in the thresholds: section")
    for start, end, entry in sorted(spans, reverse=True):
        text = text[:start] + entry + text[end:]
    return text


def _end(node: Node) -> int:
    """Where a value's text ends. A block mapping or list ends (its end mark) where the next
    key starts, after the newline, comments and indentation that must stay: it ends with its
    last nested value instead."""
    while isinstance(node, MappingNode | SequenceNode) and not node.flow_style and node.value:
        last = node.value[-1]
        node = last[1] if isinstance(last, tuple) else last
    return node.end_mark.index


def _entry(value: float, pooled: dict[str, str]) -> str:
    if not pooled:
        return _number(value)
    # JSON strings are YAML double-quoted scalars: a name from a pack stays one scalar.
    poolings = ", ".join(f"{json.dumps(f)}: {json.dumps(a)}" for f, a in sorted(pooled.items()))
    return f"{{value: {_number(value)}, pooled: {{{poolings}}}}}"


def _number(value: float) -> str:
    return f"{value:.6g}"
