"""Load rule files: YAML -> validated, compiled RuleSet, or one RuleLoadError listing every issue.

Files are read in order (directories expand to their sorted ``*.yaml``/``*.yml`` files). Names
are global across files: feature aliases and macros share one namespace, ``lists`` another, and
a later file may override a rule of an earlier one by name (see ``builder``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from monitor.escape import escape_text
from monitor.rules.builder import RULE_KEYS, RuleBuilder, check_template, gather_specs
from monitor.rules.errors import RuleIssue, RuleLoadError, SourceLocation
from monitor.rules.expressions import (
    FUNCTIONS,
    IDENTIFIER,
    KEYWORDS,
    POOLED,
    MacroDef,
    Number,
    PooledUse,
    Resolver,
)
from monitor.rules.expressions import did_you_mean as did_you_mean
from monitor.rules.model import Rule, RuleException, RuleSet, Threshold
from monitor.rules.pooling import (
    AggregationError,
    FeatureAggregation,
    Pooling,
    as_aggregations,
    parse_pooling,
)
from monitor.rules.yamlsource import (
    Document,
    Issues,
    construct,
    is_null,
    location,
    pairs,
    parse_expression,
    read_document,
    rule_files,
    section_mapping,
    string_value,
)

__all__ = [
    "RULE_KEYS",
    "TOP_KEYS",
    "Rule",
    "RuleException",
    "RuleSet",
    "check_template",
    "load_rules",
    "rule_files",
]

TOP_KEYS = ("features", "thresholds", "macros", "lists", "rules")
_LIST_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*\Z")


# --------------------------------------------------------------------------- names


@dataclass
class _Names:
    aliases: dict[str, str] = field(default_factory=dict)
    macros: dict[str, MacroDef] = field(default_factory=dict)
    macro_text: dict[str, str] = field(default_factory=dict)
    defined: dict[str, SourceLocation] = field(default_factory=dict)
    lists: dict[str, tuple[str, ...]] = field(default_factory=dict)
    list_defined: dict[str, SourceLocation] = field(default_factory=dict)
    thresholds: dict[str, Threshold] = field(default_factory=dict)


def _define(doc: Document, names: _Names, key: str, key_node: Node, issues: Issues) -> bool:
    """Check a new alias or macro name; both share one namespace across all files."""
    loc = location(doc.path, key_node)
    if not IDENTIFIER.match(key) or key in KEYWORDS or key in FUNCTIONS or key == POOLED:
        issues.add(loc.issue(f"{key!r} is not a valid name (letters, digits, _; not a keyword)"))
        return False
    if key in names.defined:
        issues.add(loc.issue(f"{key!r} is already defined at {names.defined[key]}"))
        return False
    names.defined[key] = loc
    return True


def _collect_aliases(
    doc: Document, names: _Names, known: Collection[str] | None, issues: Issues
) -> None:
    node = section_mapping(doc, "features", issues)
    if node is None:
        return
    for key, key_node, value in pairs(doc.path, node, issues):
        target = string_value(doc, value, f"feature alias {key!r}", issues)
        if target is None or not _define(doc, names, key, key_node, issues):
            continue
        pack, _, feature = target.partition("/")
        if not pack.strip() or not feature.strip() or target != target.strip():
            issues.at(doc.path, value, f"feature {target!r} must be '<pack>/<feature>'")
        elif known is not None and target not in known:
            hint = did_you_mean(target, sorted(known))
            issues.at(doc.path, value, f"unknown feature {target!r}{hint}")
        names.aliases[key] = target


def _collect_thresholds(
    doc: Document,
    names: _Names,
    known: Collection[str] | None,
    overrides: Mapping[str, float],
    issues: Issues,
) -> None:
    """``thresholds: {name: number | '<pack>/<feature>'}``: named constants for conditions.

    A number is written by ``safety-monitor rules calibrate`` (or by hand); a feature name
    takes that pack feature's calibrated ``alert_threshold``, known only when the rules are
    loaded with their packs (``known`` is then a mapping of feature name to threshold). Each
    becomes a macro whose expression is the number, so conditions use it like any name.
    """
    node = section_mapping(doc, "thresholds", issues)
    if node is None:
        return
    for key, key_node, value in pairs(doc.path, node, issues):
        if not _define(doc, names, key, key_node, issues):
            continue
        pooled: dict[str, str] = {}
        number: float | None = None
        feature = ""
        if isinstance(value, MappingNode):  # {value: N, pooled: {feature: aggregation}}
            entry, pooled = _calibrated_entry(doc, key, value, issues)
            if entry is not None:
                value = entry
                number, feature = _threshold_value(doc, key, value, known, issues)
        else:
            number, feature = _threshold_value(doc, key, value, known, issues)
        loc = location(doc.path, value)
        if number is None:
            # Reported already; a placeholder keeps conditions using the name from failing
            # a second time as an unknown name.
            names.macros[key] = MacroDef(key, Number(0.0, loc), loc)
            continue
        if key in overrides:
            number = float(overrides[key])
        names.thresholds[key] = Threshold(
            key, number, feature, location(doc.path, key_node), pooled
        )
        names.macros[key] = MacroDef(key, Number(number, loc), loc)
        names.macro_text[key] = repr(number)


def _calibrated_entry(
    doc: Document, key: str, node: MappingNode, issues: Issues
) -> tuple[Node | None, dict[str, str]]:
    """``{value: N, pooled: {'<pack>/<feature>': aggregation}}``, what `rules calibrate`
    writes for a threshold whose rules use pooled(): the number and the poolings it was
    calibrated under. Returns the value node (checked as a plain entry) and the poolings."""
    fields = {name: (key_node, value) for name, key_node, value in pairs(doc.path, node, issues)}
    for name, (key_node, _) in fields.items():
        if name not in ("value", "pooled"):
            hint = did_you_mean(name, ("value", "pooled"))
            issues.at(doc.path, key_node, f"threshold {key!r}: unknown key {name!r}{hint}")
    if "value" not in fields:
        issues.at(doc.path, node, f"threshold {key!r} must have a 'value'")
        return None, {}
    pooled: dict[str, str] = {}
    raw = fields.get("pooled", (None, None))[1]
    if raw is not None and not isinstance(raw, MappingNode):
        issues.at(doc.path, raw, f"threshold {key!r}: 'pooled' must map features to poolings")
    elif raw is not None:
        for feature, _, text in pairs(doc.path, raw, issues):
            aggregation = string_value(doc, text, f"threshold {key!r} pooling", issues)
            if aggregation is not None:
                pooled[feature] = aggregation
    return fields["value"][1], pooled


def _threshold_value(
    doc: Document, key: str, value: Node, known: Collection[str] | None, issues: Issues
) -> tuple[float | None, str]:
    if not isinstance(value, ScalarNode) or is_null(value):
        issues.at(doc.path, value, f"threshold {key!r} must be a number or '<pack>/<feature>'")
        return None, ""
    parsed = construct(value) if value.style is None else value.value
    if isinstance(parsed, int | float) and not isinstance(parsed, bool):
        if not math.isfinite(parsed):
            issues.at(doc.path, value, f"threshold {key!r} must be finite")
            return None, ""
        return float(parsed), ""
    target = value.value
    pack, _, feature = target.partition("/")
    if not pack.strip() or not feature.strip() or target != target.strip():
        issues.at(doc.path, value, f"threshold {key!r} must be a number or '<pack>/<feature>'")
        return None, ""
    if not isinstance(known, Mapping):
        issues.at(
            doc.path,
            value,
            f"threshold {key!r} is {target}'s calibrated alert threshold, which only its pack "
            "knows: load these rules with the packs (serve does; rules check --packs)",
        )
        return None, target
    if target not in known:
        hint = did_you_mean(target, sorted(known))
        issues.at(doc.path, value, f"threshold {key!r}: unknown feature {target!r}{hint}")
        return None, target
    calibrated = known[target]
    if calibrated is None:
        issues.at(
            doc.path,
            value,
            f"threshold {key!r}: feature {target!r} has no calibrated alert threshold "
            "(pack fit / pack calibrate --fpr sets one)",
        )
        return None, target
    return float(calibrated), target


def _collect_macros(doc: Document, names: _Names, issues: Issues) -> None:
    node = section_mapping(doc, "macros", issues)
    if node is None:
        return
    for key, key_node, value in pairs(doc.path, node, issues):
        if not _define(doc, names, key, key_node, issues):
            continue
        ast, source = parse_expression(doc, value, f"macro {key!r}", issues)
        loc = source.start if source else SourceLocation(doc.path, 1, 1)
        names.macros[key] = MacroDef(key, ast, loc)
        names.macro_text[key] = source.text if source else ""


def _collect_lists(doc: Document, names: _Names, issues: Issues) -> None:
    """``lists: {name: [items]}``; an item naming an earlier list expands to its items."""
    node = section_mapping(doc, "lists", issues)
    if node is None:
        return
    for key, key_node, value in pairs(doc.path, node, issues):
        loc = location(doc.path, key_node)
        if not _LIST_NAME.match(key):
            issues.add(loc.issue(f"invalid list name {key!r} (letters, digits, '_', '.', '-')"))
            continue
        if key in names.list_defined:
            issues.add(loc.issue(f"list {key!r} is already defined at {names.list_defined[key]}"))
            continue
        items = _list_items(doc, key, value, names.lists, issues)
        if items is not None:
            names.list_defined[key] = loc
            names.lists[key] = items


def _list_items(
    doc: Document, key: str, node: Node, lists: dict[str, tuple[str, ...]], issues: Issues
) -> tuple[str, ...] | None:
    if not isinstance(node, SequenceNode):
        issues.at(doc.path, node, f"list {key!r} must be a list of strings")
        return None
    items: list[str] = []
    for item in node.value:
        if not isinstance(item, ScalarNode) or is_null(item) or not item.value:
            issues.at(doc.path, item, f"entries of list {key!r} must be non-empty strings")
            return None
        items.extend(lists.get(item.value, (item.value,)))
    return tuple(dict.fromkeys(items))


# --------------------------------------------------------------------------- pooled()


class PooledFeatures:
    """Expands ``pooled(<alias>)`` from the packs' recorded aggregations (None: the rules are
    loaded without packs). With ``unexpanded`` (a list) and no aggregations, each use is noted
    there instead of being an error, and its rule is left out of the set: how ``rules check``
    without ``--packs`` validates everything else."""

    def __init__(
        self,
        aggregations: Mapping[str, FeatureAggregation] | None,
        unexpanded: list[RuleIssue] | None = None,
    ) -> None:
        self.aggregations = aggregations
        self.unexpanded = unexpanded
        self.parsed: dict[str, Pooling] = {}

    def window(self, use: PooledUse) -> int | str | None:
        """The window of `use`, or why there is none (see ``expressions.PooledWindow``)."""
        call = f"pooled({use.alias})"
        feature = escape_text(use.feature)  # rule-file text, shown on a terminal
        if self.aggregations is None:
            if self.unexpanded is not None:
                self.unexpanded.append(
                    use.loc.issue(
                        f"{call} not expanded: {feature}'s pooling is recorded in its pack "
                        "(pass --packs); the rule is checked without it"
                    )
                )
                return None
            return (
                f"{call} pools {feature} as its pack recorded, which only the pack knows: "
                "load these rules with their packs (serve, eval and rules calibrate do; "
                "rules check --packs; a rules test file declares 'aggregations:')"
            )
        recorded = self.aggregations.get(use.feature)
        if recorded is None:
            return f"{call}: no loaded pack provides {feature}"
        if not recorded.aggregation:
            return (
                f"{call}: {feature} records no aggregation (an SAE feature, or a pack "
                "written before pack fit recorded one); write the pooling you mean, e.g. "
                f"rolling_mean({use.alias}, 8)"
            )
        try:
            pooling = parse_pooling(recorded.aggregation, recorded.labeled_roles)
        except AggregationError as exc:
            return f"{call}: {feature}'s aggregation cannot be served by a rule: {exc}"
        self.parsed[use.feature] = pooling
        return pooling.window


# --------------------------------------------------------------------------- entry point


def load_rules(
    paths: Sequence[str | Path],
    known_features: Collection[str] | Mapping[str, float | None] | None = None,
    threshold_overrides: Mapping[str, float] | None = None,
    aggregations: Mapping[str, FeatureAggregation | str] | None = None,
    unexpanded: list[RuleIssue] | None = None,
) -> RuleSet:
    """Load, validate and compile rule files (or directories of them) into one RuleSet.

    ``known_features`` (optional) are the ``<pack>/<feature>`` names aliases must exist in; a
    mapping also gives each feature's calibrated alert threshold, which ``thresholds:``
    entries naming a feature take. ``threshold_overrides`` replaces the values of named
    thresholds (how ``rules calibrate`` tries values). ``aggregations`` (from
    ``pooling.pack_aggregations(packs)``; by default those of a ``pooling.PackFeatures``
    given as ``known_features``) is what each feature's pack records about its pooling, which
    ``pooled(<alias>)`` expands from; without it ``pooled()`` is an error,
    unless ``unexpanded`` is a list: then each use is noted there and its rule left out (a
    syntax-only check). Every problem in every file is collected and raised together as a
    RuleLoadError.
    """
    issues = Issues()
    files: list[tuple[str, str]] = []
    docs = [
        doc
        for path in rule_files(paths, issues)
        if (doc := read_document(path, issues, files, TOP_KEYS))
    ]
    names = _Names()
    known = frozenset(known_features) if known_features is not None else None
    unknown_overrides = set(threshold_overrides or {})
    for doc in docs:
        _collect_aliases(doc, names, known, issues)
        _collect_lists(doc, names, issues)
    for doc in docs:
        _collect_thresholds(doc, names, known_features, threshold_overrides or {}, issues)
    for doc in docs:
        _collect_macros(doc, names, issues)
    if aggregations is None:  # rules loaded with their packs (pooling.PackFeatures)
        aggregations = getattr(known_features, "aggregations", None)
    pooled = PooledFeatures(as_aggregations(aggregations), unexpanded)
    resolver = Resolver(names.aliases, names.macros, pooled.window)
    rules = _build_rules(docs, resolver, names, pooled, issues)
    for name in names.macros:  # report errors in macros that no rule uses, too
        resolver.macro(name)
    for issue in resolver.issues:
        issues.add(issue)
    unknown_overrides -= set(names.thresholds)
    if unknown_overrides and docs:
        issues.add(
            SourceLocation(docs[0].path, 1, 1).issue(
                f"no threshold named {sorted(unknown_overrides)[0]!r} to override"
            )
        )
    if issues.items:
        raise RuleLoadError(sorted(issues.items, key=_issue_order(files)))
    ruleset = RuleSet(
        [rule for rule, _ in rules],
        names.aliases,
        files,
        names.macro_text,
        names.lists,
        names.thresholds,
    )
    ruleset.pooled = {rule.name: uses for rule, uses in rules if uses}
    ruleset.notes = _recalibrate_notes(ruleset)
    return ruleset


def _recalibrate_notes(ruleset: RuleSet) -> list[str]:
    """A note per threshold whose recorded pooling (`rules calibrate` writes it) differs from
    what a rule using it now pools with pooled(): the pack was refitted with another
    aggregation, and the number was set for another score."""
    notes = []
    for rule in ruleset.rules:
        pooled = ruleset.pooled.get(rule.name, {})
        if not pooled:
            continue
        for name in _names_in(rule.condition.source, ruleset.macros):
            threshold = ruleset.thresholds.get(name)
            # A pack feature's own threshold travels with the refit: nothing to redo.
            if threshold is None or not threshold.pooled or threshold.feature:
                continue
            for feature, aggregation in sorted(pooled.items()):
                was = threshold.pooled.get(feature)
                if was != aggregation:
                    # `was` is rule-file text: escaped, a note must not drive a terminal.
                    shown = escape_text(repr(was)) if was is not None else "something else"
                    notes.append(
                        f"{threshold.source}: threshold {name!r} was calibrated with {feature} "
                        f"pooled as {shown}, and rule {rule.name!r} now pools "
                        f"it as {aggregation} (a refitted pack): the number was set for another "
                        "score; re-run rules calibrate"
                    )
    return list(dict.fromkeys(notes))


def _names_in(text: str, macros: Mapping[str, str]) -> set[str]:
    """Every identifier of `text`, through the macros it names (each expanded once)."""
    found: set[str] = set()
    pending = [text]
    while pending:
        for name in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", pending.pop()):
            if name not in found:
                found.add(name)
                if name in macros:
                    pending.append(macros[name])
    return found


def _build_rules(
    docs: list[Document],
    resolver: Resolver,
    names: _Names,
    pooled: PooledFeatures,
    issues: Issues,
) -> list[tuple[Rule, dict[str, str]]]:
    rules = []
    for spec in gather_specs(docs, issues):
        builder = RuleBuilder(spec, resolver, issues, names.lists, pooled.parsed)
        rule = builder.build()
        if rule is not None:
            rules.append((rule, builder.pooled))
    return rules


def _issue_order(
    files: list[tuple[str, str]],
) -> Callable[[RuleIssue], tuple[int, str, int, int]]:
    rank = {path: i for i, (path, _) in enumerate(files)}

    def key(issue: RuleIssue) -> tuple[int, str, int, int]:
        return (rank.get(issue.path, -1), issue.path, issue.line, issue.col)

    return key
