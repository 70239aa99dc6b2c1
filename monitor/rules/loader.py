"""Load rule files: YAML -> validated, compiled RuleSet, or one RuleLoadError listing every issue.

YAML is read with ``yaml.compose`` and the safe loader, which keeps a line/column mark on every
node; values are taken from the nodes directly so each problem can be pinned to the exact key,
value or character inside a condition string.
"""

from __future__ import annotations

import hashlib
import re
import string
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from monitor.rules.errors import ExpressionError, RuleIssue, RuleLoadError, SourceLocation
from monitor.rules.expressions import (
    FUNCTIONS,
    IDENTIFIER,
    KEYWORDS,
    Condition,
    MacroDef,
    Resolver,
    SourceText,
    did_you_mean,
    parse,
)
from monitor.rules.expressions import (
    Node as ExprNode,
)

TOP_KEYS = ("features", "macros", "rules")
RULE_KEYS = (
    "rule",
    "desc",
    "category",
    "severity",
    "condition",
    "for",
    "roles",
    "labels",
    "output",
    "actions",
    "enabled",
)
REQUIRED_RULE_KEYS = ("rule", "condition", "severity")
SEVERITIES = ("info", "warning", "critical")
ACTIONS = ("alert", "audit", "log")
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
DEFAULT_OUTPUT = "{rule} fired at token {position} of {conversation_id} (value {value:.3g})"
DEFAULT_CATEGORY = "uncategorized"
MAX_FOR_TOKENS = 1_000_000

_RULE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*\Z")
_LABEL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_FOR = re.compile(r"\s*(\d+)\s*(?:tokens?)?\s*\Z")
_BOOL_TAG = "tag:yaml.org,2002:bool"
_INT_TAG = "tag:yaml.org,2002:int"
_STR_TAG = "tag:yaml.org,2002:str"
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


@dataclass
class Rule:
    name: str
    desc: str
    category: str
    severity: str
    condition: Condition
    for_tokens: int = 1
    roles: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    output: str = DEFAULT_OUTPUT
    actions: tuple[str, ...] = ("alert",)
    enabled: bool = True
    source: SourceLocation = field(default_factory=lambda: SourceLocation("<memory>", 1, 1))

    @property
    def state_key(self) -> tuple[str, str, int]:
        """What must stay equal across a reload for the engine to keep this rule's state."""
        return (self.name, self.condition.digest, self.for_tokens)


@dataclass
class RuleSet:
    rules: list[Rule] = field(default_factory=list)
    feature_aliases: dict[str, str] = field(default_factory=dict)
    files: list[tuple[str, str]] = field(default_factory=list)  # (path, sha256 of content)
    macros: dict[str, str] = field(default_factory=dict)  # name -> expression text

    @property
    def required_features(self) -> set[str]:
        return {name for rule in self.rules if rule.enabled for name in rule.condition.features}

    @property
    def enabled_rules(self) -> list[Rule]:
        return [rule for rule in self.rules if rule.enabled]


# --------------------------------------------------------------------------- reading files


@dataclass
class _Document:
    path: str
    text: str
    sections: dict[str, Node]


class _Issues:
    """Ordered, de-duplicated issue collector."""

    def __init__(self) -> None:
        self.items: dict[RuleIssue, None] = {}

    def at(self, path: str, node: Node | None, message: str, offset: int = 0) -> None:
        line, col = (node.start_mark.line + 1, node.start_mark.column + 1) if node else (1, 1)
        self.add(RuleIssue(path, line, col + offset, message))

    def add(self, issue: RuleIssue) -> None:
        self.items.setdefault(issue, None)


def _expand_paths(paths: Sequence[str | Path], issues: _Issues) -> list[Path]:
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files = sorted(
                p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file()
            )
            if not files:
                issues.add(RuleIssue(str(path), 1, 1, "no *.yaml or *.yml files in directory"))
            found.extend(files)
        elif path.is_file():
            found.append(path)
        else:
            issues.add(RuleIssue(str(path), 1, 1, "file not found"))
    unique: dict[Path, Path] = {}
    for path in found:
        unique.setdefault(path.resolve(), path)  # a file named twice is loaded once
    return list(unique.values())


def _read(path: Path, issues: _Issues, files: list[tuple[str, str]]) -> _Document | None:
    name = str(path)
    try:
        data = path.read_bytes()
        text = data.decode("utf-8")
    except OSError as exc:
        issues.add(RuleIssue(name, 1, 1, f"cannot read file: {exc.strerror or exc}"))
        return None
    except UnicodeDecodeError as exc:
        prefix = data[: exc.start].decode("utf-8", "replace")
        line, col = _line_col(prefix, len(prefix))
        issues.add(RuleIssue(name, line, col, "file is not valid UTF-8"))
        return None
    files.append((name, hashlib.sha256(data).hexdigest()))
    root = _compose(name, text, issues)
    if root is None:
        return None
    return _Document(name, text, _sections(name, root, issues))


def _compose(name: str, text: str, issues: _Issues) -> Node | None:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = exc.problem or exc.context or "invalid YAML"
        issues.add(RuleIssue(name, line, col, f"YAML syntax error: {problem}"))
        return None
    except yaml.reader.ReaderError as exc:
        line, col = _line_col(text, exc.position)
        issues.add(RuleIssue(name, line, col, f"YAML syntax error: {exc.reason}"))
        return None
    except (yaml.YAMLError, RecursionError) as exc:
        # RecursionError: PyYAML composes recursively, so absurd nesting ends up here.
        issues.add(RuleIssue(name, 1, 1, f"YAML error: {type(exc).__name__}"))
        return None
    if root is not None and not isinstance(root, MappingNode):
        issues.at(name, root, "a rules file must be a mapping with features, macros and rules")
        return None
    return root


def _line_col(text: str, offset: int) -> tuple[int, int]:
    before = text[:offset]
    return before.count("\n") + 1, offset - (before.rfind("\n") + 1) + 1


def _sections(path: str, root: Node | None, issues: _Issues) -> dict[str, Node]:
    sections: dict[str, Node] = {}
    if root is None:  # an empty file is a valid, empty rule set
        return sections
    for key, key_node, value in _pairs(path, root, issues):
        if key in TOP_KEYS:
            sections[key] = value
        else:
            issues.at(
                path, key_node, f"unknown top-level key {key!r}" + did_you_mean(key, TOP_KEYS)
            )
    return sections


def _pairs(path: str, node: MappingNode, issues: _Issues) -> Iterator[tuple[str, Node, Node]]:
    """Key/value nodes of a mapping with string keys; flags duplicates PyYAML would hide."""
    seen: set[str] = set()
    for key_node, value in node.value:
        if not isinstance(key_node, ScalarNode):
            issues.at(path, key_node, "mapping keys must be strings")
            continue
        key = key_node.value
        if key in seen:
            issues.at(path, key_node, f"duplicate key {key!r}")
            continue
        seen.add(key)
        yield key, key_node, value


def _mapping(doc: _Document, key: str, issues: _Issues) -> MappingNode | None:
    node = doc.sections.get(key)
    if node is None or _is_null(node):
        return None
    if not isinstance(node, MappingNode):
        issues.at(doc.path, node, f"'{key}' must be a mapping")
        return None
    return node


def _is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def _string(doc: _Document, node: Node, what: str, issues: _Issues) -> str | None:
    if isinstance(node, ScalarNode) and not _is_null(node):
        return node.value
    issues.at(doc.path, node, f"{what} must be a string")
    return None


# --------------------------------------------------------------------------- expressions in YAML


def source_text(doc: _Document, node: ScalarNode) -> SourceText:
    """Map offsets in a scalar's value back to file positions.

    Exact for single-line plain or quoted scalars (col shifted past the opening quote) and for
    literal block scalars (``|``); other multi-line forms are located at the scalar's start.
    """
    start, end = node.start_mark, node.end_mark
    line, col = start.line + 1, start.column + 1
    if node.style in ("'", '"'):
        col += 1
    if node.style in (None, "'", '"') and start.line == end.line:
        return SourceText(node.value, doc.path, line, col)
    if node.style == "|":
        return SourceText(node.value, doc.path, line, col, _literal_origins(doc.text, node))
    return SourceText(node.value, doc.path, line, col, ())


def _literal_origins(text: str, node: ScalarNode) -> tuple[tuple[int, int], ...]:
    lines = text.splitlines()[node.start_mark.line + 1 : node.end_mark.line + 1]
    body = [raw for raw in lines if raw.strip()]
    indent = len(body[0]) - len(body[0].lstrip(" ")) if body else 0
    first = node.start_mark.line + 2
    return tuple((first + i, indent + 1) for i in range(node.value.count("\n") + 1))


def _parse_expression(
    doc: _Document, node: Node, what: str, issues: _Issues
) -> tuple[ExprNode | None, SourceText | None]:
    text = _string(doc, node, what, issues)
    if text is None:
        return None, None
    source = source_text(doc, node)
    try:
        return parse(source), source
    except ExpressionError as exc:
        for issue in exc.issues:
            issues.add(issue)
        return None, source


# --------------------------------------------------------------------------- names


@dataclass
class _Names:
    aliases: dict[str, str] = field(default_factory=dict)
    macros: dict[str, MacroDef] = field(default_factory=dict)
    macro_text: dict[str, str] = field(default_factory=dict)
    defined: dict[str, SourceLocation] = field(default_factory=dict)


def _define(doc: _Document, names: _Names, key: str, key_node: Node, issues: _Issues) -> bool:
    """Check a new alias or macro name; both share one namespace across all files."""
    loc = SourceLocation(doc.path, key_node.start_mark.line + 1, key_node.start_mark.column + 1)
    if not IDENTIFIER.match(key) or key in KEYWORDS or key in FUNCTIONS:
        issues.add(loc.issue(f"{key!r} is not a valid name (letters, digits, _; not a keyword)"))
        return False
    if key in names.defined:
        issues.add(loc.issue(f"{key!r} is already defined at {names.defined[key]}"))
        return False
    names.defined[key] = loc
    return True


def _collect_aliases(
    doc: _Document, names: _Names, known: Collection[str] | None, issues: _Issues
) -> None:
    node = _mapping(doc, "features", issues)
    if node is None:
        return
    for key, key_node, value in _pairs(doc.path, node, issues):
        target = _string(doc, value, f"feature alias {key!r}", issues)
        if target is None or not _define(doc, names, key, key_node, issues):
            continue
        pack, _, feature = target.partition("/")
        if not pack.strip() or not feature.strip() or target != target.strip():
            issues.at(doc.path, value, f"feature {target!r} must be '<pack>/<feature>'")
        elif known is not None and target not in known:
            hint = did_you_mean(target, sorted(known))
            issues.at(doc.path, value, f"unknown feature {target!r}{hint}")
        names.aliases[key] = target


def _collect_macros(doc: _Document, names: _Names, issues: _Issues) -> None:
    node = _mapping(doc, "macros", issues)
    if node is None:
        return
    for key, key_node, value in _pairs(doc.path, node, issues):
        if not _define(doc, names, key, key_node, issues):
            continue
        ast, source = _parse_expression(doc, value, f"macro {key!r}", issues)
        loc = source.start if source else SourceLocation(doc.path, 1, 1)
        names.macros[key] = MacroDef(key, ast, loc)
        names.macro_text[key] = source.text if source else ""


# --------------------------------------------------------------------------- rules


def _rule_nodes(doc: _Document, issues: _Issues) -> list[Node]:
    node = doc.sections.get("rules")
    if node is None or _is_null(node):
        return []
    if not isinstance(node, SequenceNode):
        issues.at(doc.path, node, "'rules' must be a list of rules")
        return []
    return list(node.value)


class _RuleBuilder:
    """Validates one rule mapping field by field; any issue means the rule is not built."""

    def __init__(self, doc: _Document, resolver: Resolver, issues: _Issues) -> None:
        self.doc = doc
        self.resolver = resolver
        self.issues = issues
        self.failed = False

    def error(self, node: Node | None, message: str) -> None:
        self.failed = True
        self.issues.at(self.doc.path, node, message)

    def build(self, node: Node) -> Rule | None:
        if not isinstance(node, MappingNode):
            self.error(node, "a rule must be a mapping")
            return None
        fields: dict[str, Node] = {}
        for key, key_node, value in _pairs(self.doc.path, node, self.issues):
            if key in RULE_KEYS:
                fields[key] = value
            else:
                self.error(key_node, f"unknown rule key {key!r}" + did_you_mean(key, RULE_KEYS))
        missing = [key for key in REQUIRED_RULE_KEYS if key not in fields]
        for key in missing:
            self.error(node, f"rule is missing required key {key!r}")
        if missing:
            return None
        rule = self.assemble(fields, node)
        return None if self.failed else rule

    def assemble(self, fields: dict[str, Node], node: Node) -> Rule | None:
        name = self.name(fields["rule"])
        condition = self.condition(fields["condition"])
        rule = Rule(
            name=name or "",
            desc=self.text(fields.get("desc"), "desc", ""),
            category=self.text(fields.get("category"), "category", DEFAULT_CATEGORY),
            severity=self.severity(fields["severity"]),
            condition=condition,  # type: ignore[arg-type]  # None only when failed
            for_tokens=self.for_tokens(fields.get("for")),
            roles=self.strings(fields.get("roles"), "roles", ()),
            labels=self.labels(fields.get("labels")),
            output=self.output(fields.get("output")),
            actions=self.actions(fields.get("actions")),
            enabled=self.enabled(fields.get("enabled")),
            source=SourceLocation(
                self.doc.path, node.start_mark.line + 1, node.start_mark.column + 1
            ),
        )
        return rule if condition is not None else None

    def text(self, node: Node | None, what: str, default: str) -> str:
        if node is None:
            return default
        value = _string(self.doc, node, what, self.issues)
        if value is None:
            self.failed = True
        return value if value is not None else default

    def name(self, node: Node) -> str | None:
        name = self.text(node, "rule name", "")
        if not self.failed and not _RULE_NAME.match(name):
            self.error(node, f"invalid rule name {name!r} (letters, digits, '_', '.', ':', '-')")
        return name

    def severity(self, node: Node) -> str:
        value = self.text(node, "severity", "")
        if isinstance(node, ScalarNode) and value not in SEVERITIES:
            hint = did_you_mean(value, SEVERITIES) or f" (one of: {', '.join(SEVERITIES)})"
            self.error(node, f"invalid severity {value!r}{hint}")
        return value

    def for_tokens(self, node: Node | None) -> int:
        if node is None:
            return 1
        count = None
        if isinstance(node, ScalarNode) and node.tag == _INT_TAG:
            count = _construct(node)
        elif isinstance(node, ScalarNode) and node.tag == _STR_TAG:
            match = _FOR.match(node.value)
            count = int(match.group(1)) if match else None
        if not isinstance(count, int) or not 1 <= count <= MAX_FOR_TOKENS:
            self.error(node, "'for' must be a positive number of tokens, like '4 tokens' or 4")
            return 1
        return count

    def strings(self, node: Node | None, what: str, default: tuple[str, ...]) -> tuple[str, ...]:
        if node is None:
            return default
        if not isinstance(node, SequenceNode):
            self.error(node, f"'{what}' must be a list of strings")
            return default
        values = []
        for item in node.value:
            if isinstance(item, ScalarNode) and not _is_null(item) and item.value:
                values.append(item.value)
            else:
                self.error(item, f"'{what}' entries must be non-empty strings")
        return tuple(values)

    def labels(self, node: Node | None) -> dict[str, str]:
        if node is None:
            return {}
        if not isinstance(node, MappingNode):
            self.error(node, "'labels' must be a mapping of label names to strings")
            return {}
        labels = {}
        for key, key_node, value in _pairs(self.doc.path, node, self.issues):
            if not _LABEL_NAME.match(key):
                self.error(key_node, f"invalid label name {key!r} (letters, digits, '_')")
            elif not isinstance(value, ScalarNode):
                self.error(value, f"label {key!r} must be a string")
            else:
                labels[key] = value.value
        return labels

    def output(self, node: Node | None) -> str:
        if node is None:
            return DEFAULT_OUTPUT
        template = self.text(node, "output", DEFAULT_OUTPUT)
        problem = check_template(template)
        if problem:
            self.error(node, problem)
        return template

    def actions(self, node: Node | None) -> tuple[str, ...]:
        actions = self.strings(node, "actions", ("alert",))
        for action in actions:
            if action not in ACTIONS:
                hint = did_you_mean(action, ACTIONS) or f" (one of: {', '.join(ACTIONS)})"
                self.error(node, f"unknown action {action!r}{hint}")
        return actions

    def enabled(self, node: Node | None) -> bool:
        if node is None:
            return True
        if isinstance(node, ScalarNode) and node.tag == _BOOL_TAG:
            return bool(_construct(node))
        self.error(node, "'enabled' must be true or false")
        return True

    def condition(self, node: Node) -> Condition | None:
        ast, source = _parse_expression(self.doc, node, "condition", self.issues)
        if ast is None or source is None:
            self.failed = True
            return None
        before = len(self.resolver.issues)
        condition = self.resolver.condition(ast, source)
        if condition is None or len(self.resolver.issues) != before:
            self.failed = True
        return condition


def _construct(node: ScalarNode) -> object:
    try:
        return SafeConstructor().construct_object(node)
    except (yaml.YAMLError, ValueError, OverflowError):
        return None


def check_template(template: str) -> str | None:
    """Why an output template is unusable, or None. Only the documented fields are allowed."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        return f"bad output template: {exc}"
    for _, name, spec, _ in parts:
        if name is None:
            continue
        if name not in OUTPUT_FIELDS:
            hint = did_you_mean(name, OUTPUT_FIELDS) or f" (allowed: {', '.join(OUTPUT_FIELDS)})"
            return f"unknown placeholder {{{name}}} in output{hint}"
        nested = check_template(spec or "")
        if nested:
            return nested
        if re.search(r"\d{4,}", spec or ""):
            return f"format width in {{{name}:{spec}}} is too large"
    try:
        template.format_map(_SAMPLE_FIELDS)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        return f"bad output template: {exc}"
    return None


# --------------------------------------------------------------------------- entry point


def load_rules(
    paths: Sequence[str | Path], known_features: Collection[str] | None = None
) -> RuleSet:
    """Load, validate and compile rule files (or directories of them) into one RuleSet.

    Every problem in every file is collected and raised together as a RuleLoadError.
    """
    issues = _Issues()
    files: list[tuple[str, str]] = []
    docs = [doc for path in _expand_paths(paths, issues) if (doc := _read(path, issues, files))]
    names = _Names()
    known = frozenset(known_features) if known_features is not None else None
    for doc in docs:
        _collect_aliases(doc, names, known, issues)
    for doc in docs:
        _collect_macros(doc, names, issues)
    resolver = Resolver(names.aliases, names.macros)
    rules = _build_rules(docs, resolver, issues)
    for name in names.macros:  # report errors in macros that no rule uses, too
        resolver.macro(name)
    for issue in resolver.issues:
        issues.add(issue)
    if issues.items:
        raise RuleLoadError(sorted(issues.items, key=_issue_order(files)))
    return RuleSet(rules, names.aliases, files, names.macro_text)


def _build_rules(docs: list[_Document], resolver: Resolver, issues: _Issues) -> list[Rule]:
    rules: list[Rule] = []
    first_seen: dict[str, SourceLocation] = {}
    for doc in docs:
        for node in _rule_nodes(doc, issues):
            rule = _RuleBuilder(doc, resolver, issues).build(node)
            if rule is None:
                continue
            if rule.name in first_seen:
                name_node = next(v for k, v in node.value if k.value == "rule")
                issues.at(
                    doc.path,
                    name_node,
                    f"duplicate rule {rule.name!r} (first at {first_seen[rule.name]})",
                )
                continue
            first_seen[rule.name] = rule.source
            rules.append(rule)
    return rules


def _issue_order(
    files: list[tuple[str, str]],
) -> Callable[[RuleIssue], tuple[int, str, int, int]]:
    rank = {path: i for i, (path, _) in enumerate(files)}

    def key(issue: RuleIssue) -> tuple[int, str, int, int]:
        return (rank.get(issue.path, -1), issue.path, issue.line, issue.col)

    return key
