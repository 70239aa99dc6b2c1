"""Rule entries -> validated Rule objects, including overrides from later files.

Rules are built in two steps. First every entry of every file is gathered by rule name into a
``RuleSpec`` (the YAML nodes of each key, with the file they came from); override entries from
later files replace or append to those nodes, and ``{rule: x, enabled: false}`` toggles a rule.
Then each spec is validated key by key, so an error in an override is located in the overriding
file.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, field

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from monitor.rules.errors import SourceLocation
from monitor.rules.expressions import (
    BoolOp,
    Condition,
    PooledUse,
    Resolver,
    SourceText,
    did_you_mean,
)
from monitor.rules.expressions import Node as ExprNode
from monitor.rules.model import (
    ACTIONS,
    AT_CHOICES,
    DEFAULT_CATEGORY,
    DEFAULT_OUTPUT,
    SCOPES,
    SEVERITIES,
    Rule,
    RuleException,
)
from monitor.rules.pooling import Pooling, role_list
from monitor.rules.yamlsource import (
    BOOL_TAG,
    INT_TAG,
    STR_TAG,
    Document,
    Issues,
    construct,
    is_null,
    location,
    pairs,
    parse_expression,
)

RULE_KEYS = (
    "rule",
    "desc",
    "category",
    "severity",
    "condition",
    "for",
    "scope",
    "roles",
    "window_roles",
    "at",
    "cooldown",
    "exceptions",
    "labels",
    "annotations",
    "output",
    "actions",
    "enabled",
)
REQUIRED_RULE_KEYS = ("rule", "condition", "severity")
# Keys whose values combine: conditions are and-ed, lists concatenated, mappings merged.
APPENDABLE_KEYS = (
    "condition",
    "exceptions",
    "roles",
    "window_roles",
    "labels",
    "annotations",
    "actions",
)
OVERRIDABLE_KEYS = tuple(key for key in RULE_KEYS if key != "rule")
OVERRIDE_MODES = ("append", "replace")
EXCEPTION_KEYS = ("name", "desc", "attributes")
OUTPUT_FIELDS = (
    "value",
    "position",
    "rule",
    "conversation_id",
    "request_id",
    "category",
    "severity",
    "start",
    "end",
)
MAX_TOKENS = 1_000_000
# Output templates: a rendered alert stays small whatever the template says.
MAX_FORMAT_WIDTH = 64
MAX_FORMAT_PRECISION = 17  # a float64 has 17 significant digits
# Python's format-spec mini-language (width and precision checked against the maxima above):
# [[fill]align][sign][z][#][0][width][grouping][.precision][type]
_FORMAT_SPEC = re.compile(
    r"(?:[^{}]?[<>=^])?[+\- ]?z?#?0?(?P<width>\d+)?[,_]?(?:\.(?P<precision>\d+))?"
    r"[bcdeEfFgGnosxX%]?\Z"
)

_RULE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*\Z")
_LABEL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_TOKENS = re.compile(r"\s*(\d+)\s*(?:tokens?)?\s*\Z")
_SAMPLE_FIELDS = {
    "value": 1.5,
    "position": 7,
    "rule": "rule",
    "conversation_id": "conversation",
    "request_id": "request",
    "category": "misuse",
    "severity": "warning",
    "start": 4,
    "end": 7,
}


@dataclass(frozen=True)
class Field:
    """One YAML value of a rule key and the file it was written in."""

    doc: Document
    node: Node


@dataclass
class RuleSpec:
    """A rule as collected from the YAML before validation: its name, where it starts, and every
    value given for each key (`append` mode and overrides can give several).
    """

    name: str
    source: SourceLocation
    fields: dict[str, list[Field]] = field(default_factory=dict)
    failed: bool = False  # a problem was already reported: validate, but do not build
    # Set on a second definition of a name: reported only if the entry is otherwise valid,
    # so a broken copy shows its own errors first.
    duplicate: tuple[Field, str] | None = None


# --------------------------------------------------------------------------- gathering entries


@dataclass
class _Entry:
    doc: Document
    node: MappingNode
    fields: dict[str, Field]
    keys: dict[str, Node]  # key nodes, for locating "unexpected key" errors
    failed: bool = False

    @property
    def name_field(self) -> Field | None:
        return self.fields.get("rule")


def gather_specs(docs: list[Document], issues: Issues) -> list[RuleSpec]:
    """Rule specs in definition order, with overrides and enable toggles applied."""
    specs: dict[str, RuleSpec] = {}
    extra: list[RuleSpec] = []  # duplicates and nameless entries: validated, never built
    for doc in docs:
        for node in _rule_nodes(doc, issues):
            entry = _entry(doc, node, issues)
            if entry is not None:
                _merge(entry, specs, extra, issues)
    return [*specs.values(), *extra]


def _rule_nodes(doc: Document, issues: Issues) -> list[Node]:
    node = doc.sections.get("rules")
    if node is None or is_null(node):
        return []
    if not isinstance(node, SequenceNode):
        issues.at(doc.path, node, "'rules' must be a list of rules")
        return []
    return list(node.value)


def _entry(doc: Document, node: Node, issues: Issues) -> _Entry | None:
    if not isinstance(node, MappingNode):
        issues.at(doc.path, node, "a rule must be a mapping")
        return None
    entry = _Entry(doc, node, {}, {})
    for key, key_node, value in pairs(doc.path, node, issues):
        if key in RULE_KEYS or key == "override":
            entry.fields[key] = Field(doc, value)
            entry.keys[key] = key_node
        else:
            entry.failed = True
            issues.at(
                doc.path, key_node, f"unknown rule key {key!r}" + did_you_mean(key, RULE_KEYS)
            )
    return entry


def _merge(
    entry: _Entry, specs: dict[str, RuleSpec], extra: list[RuleSpec], issues: Issues
) -> None:
    name_field = entry.name_field
    name = _rule_name(name_field, issues) if name_field else None
    if "override" in entry.fields:
        _override(entry, name, specs, issues)
    elif name in specs and set(entry.fields) == {"rule", "enabled"}:
        specs[name].fields["enabled"] = [entry.fields["enabled"]]  # Falco-style toggle
    else:
        spec = _define(entry, name, issues)
        if name is None or name in specs:
            extra.append(spec)
        else:
            specs[name] = spec
        if name in specs and spec is not specs[name]:
            assert name_field is not None
            spec.duplicate = (
                name_field,
                f"duplicate rule {name!r} (first at {specs[name].source})",
            )


def _rule_name(name_field: Field, issues: Issues) -> str | None:
    node = name_field.node
    if not isinstance(node, ScalarNode) or is_null(node):
        issues.at(name_field.doc.path, node, "rule name must be a string")
        return None
    if not _RULE_NAME.match(node.value):
        issues.at(
            name_field.doc.path,
            node,
            f"invalid rule name {node.value!r} (letters, digits, '_', '.', ':', '-')",
        )
        return None
    return node.value


def _define(entry: _Entry, name: str | None, issues: Issues) -> RuleSpec:
    missing = [key for key in REQUIRED_RULE_KEYS if key not in entry.fields]
    for key in missing:
        issues.at(entry.doc.path, entry.node, f"rule is missing required key {key!r}")
    return RuleSpec(
        name or "",
        location(entry.doc.path, entry.node),
        {key: [value] for key, value in entry.fields.items()},
        failed=entry.failed or bool(missing) or name is None,
    )


def _override(entry: _Entry, name: str | None, specs: dict[str, RuleSpec], issues: Issues) -> None:
    path = entry.doc.path
    target = specs.get(name) if name is not None else None
    if name is not None and target is None:
        issues.at(
            path,
            entry.fields["rule"].node,
            f"override of unknown rule {name!r}: define it in an earlier file or earlier in this"
            " one" + did_you_mean(name, list(specs)),
        )
    modes = _override_modes(entry, issues)
    if target is None or modes is None or entry.failed:
        return
    for key, mode in modes.items():
        value = entry.fields[key]
        if mode == "append" and key in target.fields:
            target.fields[key].append(value)
        else:
            target.fields[key] = [value]


def _override_modes(entry: _Entry, issues: Issues) -> dict[str, str] | None:
    """``override: {key: append|replace}``, checked against the keys the entry sets."""
    path, node = entry.doc.path, entry.fields["override"].node
    if not isinstance(node, MappingNode):
        issues.at(path, node, "'override' must be a mapping of rule keys to append or replace")
        return None
    modes: dict[str, str] = {}
    ok = True
    for key, key_node, value in pairs(path, node, issues):
        mode = value.value if isinstance(value, ScalarNode) else None
        if key not in OVERRIDABLE_KEYS:
            hint = (
                " (the name picks the rule)"
                if key == "rule"
                else did_you_mean(key, OVERRIDABLE_KEYS)
            )
            issues.at(path, key_node, f"cannot override {key!r}{hint}")
        elif mode not in OVERRIDE_MODES:
            issues.at(path, value, "override mode must be 'append' or 'replace'")
        elif mode == "append" and key not in APPENDABLE_KEYS:
            issues.at(path, value, f"{key!r} can only be replaced, not appended to")
        elif key not in entry.fields:
            issues.at(path, key_node, f"override names {key!r} but the entry does not set it")
        else:
            modes[key] = mode
            continue
        ok = False
    for key, key_node in entry.keys.items():
        if key not in ("rule", "override") and key not in modes and key not in _keys(node):
            ok = False
            issues.at(path, key_node, f"{key!r} is set in an override entry but not in 'override'")
    return modes if ok else None


def _keys(node: MappingNode) -> set[str]:
    return {k.value for k, _ in node.value if isinstance(k, ScalarNode)}


# --------------------------------------------------------------------------- building one rule


class RuleBuilder:
    """Validates one rule spec key by key; any issue means the rule is not built."""

    def __init__(
        self,
        spec: RuleSpec,
        resolver: Resolver,
        issues: Issues,
        lists: Mapping[str, tuple[str, ...]],
        poolings: Mapping[str, Pooling] | None = None,
    ) -> None:
        """``poolings``: the parsed aggregation of each feature a ``pooled()`` expanded."""
        self.spec = spec
        self.resolver = resolver
        self.issues = issues
        self.lists = lists
        self.poolings = poolings if poolings is not None else {}  # filled as pooled() expands
        self.failed = spec.failed
        self.pooled: dict[str, str] = {}  # feature -> aggregation, of the rule's pooled() uses

    def error(self, where: Field | None, message: str, node: Node | None = None) -> None:
        """Record an issue at `where` (or `node` inside it); the rule will not be built."""
        self.failed = True
        if where is not None:
            self.issues.at(where.doc.path, node or where.node, message)

    def last(self, key: str) -> Field | None:
        """The value that counts for `key`: the last one given."""
        values = self.spec.fields.get(key)
        return values[-1] if values else None

    def all(self, key: str) -> list[Field]:
        """Every value given for `key`, in order."""
        return self.spec.fields.get(key, [])

    def build(self) -> Rule | None:
        """The validated Rule, or None when any key had an issue (all of them are reported)."""
        condition = self.condition()
        rule = Rule(
            name=self.spec.name,
            desc=self.text(self.last("desc"), "desc", ""),
            category=self.text(self.last("category"), "category", DEFAULT_CATEGORY),
            severity=self.choice(self.last("severity"), "severity", SEVERITIES, ""),
            condition=condition,  # type: ignore[arg-type]  # None only when failed
            for_tokens=self.tokens(self.last("for"), "for", 1),
            roles=self.roles(),
            window_roles=self.roles("window_roles"),
            labels=self.mapping("labels", template=False),
            output=self.output(),
            actions=self.actions(),
            enabled=self.enabled(self.last("enabled")),
            source=self.spec.source,
            scope=self.choice(self.last("scope"), "scope", SCOPES, "conversation"),
            cooldown_tokens=self.tokens(self.last("cooldown"), "cooldown", 0),
            exceptions=self.exceptions(),
            annotations=self.mapping("annotations", template=True),
            at=self.choice(self.last("at"), "at", AT_CHOICES, "token"),
        )
        if condition is not None:
            self.follow_pooling(rule, self.resolver.last_uses)
        if rule.at == "turn_end" and rule.for_tokens > 1:
            # A turn-end rule is checked at one row per turn: a run of N > 1 such rows would
            # span N turns, which is not what `for` means anywhere else.
            self.error(
                self.last("for"),
                f"'for: {rule.for_tokens}' cannot hold with 'at: turn_end' (checked at one "
                "token per turn); drop 'for' or smooth with a temporal function such as "
                "rolling_mean",
            )
        if rule.window_roles and condition is not None and not condition.temporal:
            # Nothing to restrict: the user expects a restriction the rule would not apply.
            self.error(
                self.last("window_roles"),
                "'window_roles' restricts temporal functions (rolling_mean, ewma, ...), and "
                "this rule's condition has none; remove it or use 'roles'",
            )
        if self.failed or condition is None:
            return None
        if self.spec.duplicate is not None:
            where, message = self.spec.duplicate
            self.error(where, message)
            return None
        return rule

    # ----------------------------------------------------------------- pooled()

    def follow_pooling(self, rule: Rule, uses: tuple[PooledUse, ...]) -> None:
        """Give the rule the ``for``, ``window_roles``, ``at`` (and, when it names none,
        ``roles``) of the aggregation its ``pooled()`` features were fitted with. A key the rule
        sets to something else, or ``pooled()`` features that need different keys, is an
        issue naming the pack's aggregation."""
        found = [(use, self.poolings[use.feature]) for use in uses if use.feature in self.poolings]
        if not found:
            return
        (first_use, first), call = found[0], f"pooled({found[0][0].alias})"
        for use, other in found[1:]:
            if (other.guard, other.window_roles, other.at) != (
                first.guard,
                first.window_roles,
                first.at,
            ):
                self.issue_at(
                    use,
                    f"pooled({use.alias}) and {call} cannot pool in one rule: {use.feature} "
                    f"was fitted as {other.text} ({other.served()}), {first_use.feature} as "
                    f"{first.text} ({first.served()}); split the rule",
                )
        self.pooled = {use.feature: pooling.text for use, pooling in found}
        fitted = f"{first_use.feature} was fitted as {first.text} ({first.served()})"
        advice = (
            f"remove it to follow the pack, or write rolling_mean({first_use.alias}, "
            f"{first.window}) to pool differently on purpose"
        )
        where = self.last("for")
        if where is None:
            rule.for_tokens = first.guard
        elif rule.for_tokens != first.guard:
            self.error(where, f"'for: {rule.for_tokens}' conflicts with {call}: {fitted}; {advice}")
        wanted = first.window_roles
        where = self.last("window_roles")
        if wanted is None and where is None:
            self.issue_at(
                first_use,
                f"{call}: {first.text} takes the labeled roles' tokens alone, and the pack does "
                "not record which roles those are (a pack written before labeled_roles); set "
                "window_roles",
            )
        elif wanted is not None and where is None:
            rule.window_roles = wanted
        elif wanted is not None and set(rule.window_roles) != set(wanted):
            shown = f"'window_roles: [{role_list(rule.window_roles)}]'"
            self.error(where, f"{shown} conflicts with {call}: {fitted}; {advice}")
        where = self.last("at")
        if where is None:
            rule.at = first.at
        elif rule.at != first.at:
            self.error(where, f"'at: {rule.at}' conflicts with {call}: {fitted}; {advice}")
        if not self.all("roles") and first.labeled_roles:
            rule.roles = first.labeled_roles  # checked where the probe was fitted to fire

    def issue_at(self, use: PooledUse, message: str) -> None:
        """Record an issue at a ``pooled()`` call; the rule will not be built."""
        self.failed = True
        self.issues.add(use.loc.issue(message))

    # ----------------------------------------------------------------- scalars

    def text(self, where: Field | None, what: str, default: str) -> str:
        """A string value (`default` when absent); an issue for a non-string."""
        if where is None:
            return default
        node = where.node
        if isinstance(node, ScalarNode) and not is_null(node):
            return node.value
        self.error(where, f"{what} must be a string")
        return default

    def choice(self, where: Field | None, what: str, allowed: tuple[str, ...], default: str) -> str:
        """A string value that must be one of `allowed`, with a did-you-mean hint otherwise."""
        value = self.text(where, what, default)
        if where is not None and isinstance(where.node, ScalarNode) and value not in allowed:
            hint = did_you_mean(value, allowed) or f" (one of: {', '.join(allowed)})"
            self.error(where, f"invalid {what} {value!r}{hint}")
        return value

    def tokens(self, where: Field | None, what: str, default: int) -> int:
        """``for``/``cooldown``: ``4``, ``'4 tokens'``; for must be >= 1, cooldown >= 0."""
        if where is None:
            return default
        node, count = where.node, None
        if isinstance(node, ScalarNode) and node.tag == INT_TAG:
            count = construct(node)
        elif isinstance(node, ScalarNode) and node.tag == STR_TAG:
            match = _TOKENS.match(node.value)
            count = int(match.group(1)) if match else None
        lowest = 1 if what == "for" else 0
        if (
            not isinstance(count, int)
            or isinstance(count, bool)
            or not lowest <= count <= MAX_TOKENS
        ):
            kind = "positive" if lowest else "non-negative"
            self.error(where, f"'{what}' must be a {kind} number of tokens, like '4 tokens' or 4")
            return default
        return count

    def enabled(self, where: Field | None) -> bool:
        """The `enabled` flag (true when absent); an issue for a non-boolean."""
        if where is None:
            return True
        if isinstance(where.node, ScalarNode) and where.node.tag == BOOL_TAG:
            return bool(construct(where.node))
        self.error(where, "'enabled' must be true or false")
        return True

    # ----------------------------------------------------------------- collections

    def strings(self, where: Field, what: str) -> list[str]:
        """A list of non-empty strings; names of ``lists`` expand to their items."""
        if not isinstance(where.node, SequenceNode):
            self.error(where, f"'{what}' must be a list of strings")
            return []
        values: list[str] = []
        for item in where.node.value:
            if isinstance(item, ScalarNode) and not is_null(item) and item.value:
                values.extend(self.lists.get(item.value, (item.value,)))
            else:
                self.error(where, f"'{what}' entries must be non-empty strings", item)
        return values

    def roles(self, key: str = "roles") -> tuple[str, ...]:
        """The roles the rule applies to (`roles`) or whose tokens its temporal functions take
        in (`window_roles`), all values of the key merged (empty: every role)."""
        return tuple(dict.fromkeys(v for f in self.all(key) for v in self.strings(f, key)))

    def actions(self) -> tuple[str, ...]:
        """The rule's actions (`alert` when absent), each checked."""
        fields = self.all("actions")
        if not fields:
            return ("alert",)
        actions: list[str] = []
        for where in fields:
            for action in self.strings(where, "actions"):
                if action not in ACTIONS:
                    hint = did_you_mean(action, ACTIONS) or f" (one of: {', '.join(ACTIONS)})"
                    self.error(where, f"unknown action {action!r}{hint}")
                actions.append(action)
        return tuple(dict.fromkeys(actions))

    def mapping(self, key: str, template: bool) -> dict[str, str]:
        """labels / annotations: name -> string; appended mappings merge, later keys win."""
        merged: dict[str, str] = {}
        for where in self.all(key):
            if not isinstance(where.node, MappingNode):
                self.error(where, f"'{key}' must be a mapping of names to strings")
                continue
            for name, key_node, value in pairs(where.doc.path, where.node, self.issues):
                if not _LABEL_NAME.match(name):
                    self.error(
                        where, f"invalid {key[:-1]} name {name!r} (letters, digits, '_')", key_node
                    )
                elif not isinstance(value, ScalarNode) or is_null(value):
                    self.error(where, f"{key[:-1]} {name!r} must be a string", value)
                elif template and (problem := check_template(value.value, key[:-1])):
                    self.error(where, problem, value)
                else:
                    merged[name] = value.value
        return merged

    def output(self) -> str:
        """The `output` template (the default when absent), checked by `check_template`."""
        where = self.last("output")
        template = self.text(where, "output", DEFAULT_OUTPUT)
        problem = check_template(template)
        if problem:
            self.error(where, problem)
        return template

    def exceptions(self) -> tuple[RuleException, ...]:
        """The rule's exceptions, in order; a name used twice is an issue."""
        found: dict[str, RuleException] = {}
        for where in self.all("exceptions"):
            if not isinstance(where.node, SequenceNode):
                self.error(where, "'exceptions' must be a list of {name, attributes}")
                continue
            for item in where.node.value:
                exception = self.exception(Field(where.doc, item))
                if exception is None:
                    continue
                if exception.name in found:
                    self.error(where, f"duplicate exception {exception.name!r}", item)
                found[exception.name] = exception
        return tuple(found.values())

    def exception(self, where: Field) -> RuleException | None:
        """One exception mapping (name, attributes, desc), or None after reporting what is wrong."""
        if not isinstance(where.node, MappingNode):
            self.error(where, "an exception must be a mapping with name and attributes")
            return None
        parts: dict[str, Field] = {}
        for key, key_node, value in pairs(where.doc.path, where.node, self.issues):
            if key in EXCEPTION_KEYS:
                parts[key] = Field(where.doc, value)
            else:
                hint = did_you_mean(key, EXCEPTION_KEYS)
                self.error(where, f"unknown exception key {key!r}{hint}", key_node)
        for key in ("name", "attributes"):
            if key not in parts:
                self.error(where, f"exception is missing required key {key!r}")
        if "name" not in parts or "attributes" not in parts:
            return None
        name = self.text(parts["name"], "exception name", "")
        desc = self.text(parts.get("desc"), "exception desc", "")
        attributes = self.attributes(parts["attributes"])
        return RuleException(name, attributes, desc) if attributes else None

    def attributes(self, where: Field) -> tuple[tuple[str, frozenset[str]], ...]:
        """An exception's attributes: each key with the set of values that match."""
        if not isinstance(where.node, MappingNode) or not where.node.value:
            self.error(where, "exception 'attributes' must be a non-empty mapping")
            return ()
        out = []
        for name, key_node, value in pairs(where.doc.path, where.node, self.issues):
            if not _LABEL_NAME.match(name):
                self.error(
                    where, f"invalid attribute name {name!r} (letters, digits, '_')", key_node
                )
                continue
            if isinstance(value, ScalarNode) and not is_null(value) and value.value:
                values = list(self.lists.get(value.value, (value.value,)))
            else:
                values = self.strings(Field(where.doc, value), f"attribute {name}")
            out.append((name, frozenset(values)))
        return tuple(out)

    # ----------------------------------------------------------------- condition

    def condition(self) -> Condition | None:
        """The compiled condition (several `condition` values are and-ed), or None after an
        issue."""
        parsed: list[tuple[ExprNode, SourceText]] = []
        for where in self.all("condition"):
            ast, source = parse_expression(where.doc, where.node, "condition", self.issues)
            if ast is None or source is None:
                self.failed = True
            else:
                parsed.append((ast, source))
        if self.failed or not parsed:
            return None
        ast, source = _and_all(parsed)
        before = len(self.resolver.issues)
        condition = self.resolver.condition(ast, source)
        if condition is None or len(self.resolver.issues) != before:
            self.failed = True
        return condition


def _and_all(parsed: list[tuple[ExprNode, SourceText]]) -> tuple[ExprNode, SourceText]:
    """An appended condition is ``(old) and (new)``: the operands keep their own locations."""
    if len(parsed) == 1:
        return parsed[0]
    first = parsed[0][1]
    text = " and ".join(f"({source.text})" for _, source in parsed)
    combined = SourceText(text, first.path, first.line, first.col, ())
    return BoolOp("and", tuple(ast for ast, _ in parsed)), combined


def check_template(template: str, what: str = "output") -> str | None:
    """Why an output template is unusable, or None. Only plain references to the documented
    fields with a fixed format spec are allowed: a spec is never taken from data (no nested
    ``{}``), and width and precision are bounded, so rendering an alert costs the same
    whatever the values are."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        return f"bad {what} template: {exc}"
    for _, name, spec, _ in parts:
        if name is None:
            continue
        if name not in OUTPUT_FIELDS:
            hint = did_you_mean(name, OUTPUT_FIELDS) or f" (allowed: {', '.join(OUTPUT_FIELDS)})"
            return f"unknown placeholder {{{name}}} in {what}{hint}"
        spec = spec or ""
        if "{" in spec or "}" in spec:
            return (
                f"format spec of {{{name}}} in {what} must be fixed text: a spec taken from "
                f"another field ({spec!r}) is not allowed"
            )
        match = _FORMAT_SPEC.match(spec)
        if match is None:
            return f"bad format spec {spec!r} of {{{name}}} in {what}"
        width, precision = match.group("width"), match.group("precision")
        if width and int(width) > MAX_FORMAT_WIDTH:
            return (
                f"format width {int(width)} of {{{name}}} in {what} is too large "
                f"(at most {MAX_FORMAT_WIDTH})"
            )
        if precision and int(precision) > MAX_FORMAT_PRECISION:
            return (
                f"format precision {int(precision)} of {{{name}}} in {what} is too large "
                f"(at most {MAX_FORMAT_PRECISION})"
            )
    try:
        template.format_map(_SAMPLE_FIELDS)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        return f"bad {what} template: {exc}"
    return None
