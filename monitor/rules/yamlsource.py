"""Reading rule files as located YAML nodes, safely and within fixed limits.

YAML is read with ``yaml.compose`` and the safe loader, which keeps a line/column mark on every
node; values are taken from the nodes directly so each problem can be pinned to the exact key,
value or character inside a condition string. Nothing is ever constructed from a tag: explicit
tags other than the plain YAML scalar/collection ones are refused before composing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from yaml.constructor import SafeConstructor
from yaml.events import (
    CollectionEndEvent,
    CollectionStartEvent,
    MappingStartEvent,
    NodeEvent,
)
from yaml.nodes import MappingNode, Node, ScalarNode

from monitor.rules.errors import ExpressionError, RuleIssue, SourceLocation
from monitor.rules.expressions import Node as ExprNode
from monitor.rules.expressions import SourceText, did_you_mean, parse

MAX_FILE_BYTES = 1 << 20  # 1 MiB: real rule files are a few KiB
MAX_YAML_DEPTH = 32  # rule files are 4-5 levels deep; PyYAML composes recursively
_PLAIN_TAGS = frozenset(
    f"tag:yaml.org,2002:{name}" for name in ("str", "int", "float", "bool", "null", "seq", "map")
) | {"!"}
NULL_TAG = "tag:yaml.org,2002:null"
BOOL_TAG = "tag:yaml.org,2002:bool"
INT_TAG = "tag:yaml.org,2002:int"
STR_TAG = "tag:yaml.org,2002:str"


@dataclass
class Document:
    """One rules file: its path, its text, and its top-level sections as YAML nodes."""

    path: str
    text: str
    sections: dict[str, Node]


class Issues:
    """Ordered, de-duplicated issue collector."""

    def __init__(self) -> None:
        self.items: dict[RuleIssue, None] = {}

    def at(self, path: str, node: Node | None, message: str, offset: int = 0) -> None:
        """Record `message` at `node`'s position in `path` (plus `offset` columns)."""
        line, col = (node.start_mark.line + 1, node.start_mark.column + 1) if node else (1, 1)
        self.add(RuleIssue(path, line, col + offset, message))

    def add(self, issue: RuleIssue) -> None:
        """Record an issue (each distinct issue once, in order)."""
        self.items.setdefault(issue, None)


def location(path: str, node: Node) -> SourceLocation:
    """Where `node` starts in `path`."""
    return SourceLocation(path, node.start_mark.line + 1, node.start_mark.column + 1)


# --------------------------------------------------------------------------- files


def rule_files(paths: Sequence[str | Path], issues: Issues | None = None) -> list[Path]:
    """The files a list of rule paths names: files as given, ``*.yaml``/``*.yml`` in dirs."""
    issues = issues if issues is not None else Issues()
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


def read_document(
    path: Path, issues: Issues, files: list[tuple[str, str]], top_keys: Sequence[str]
) -> Document | None:
    """Read and compose one rules file, recording its content hash in `files`; None after recording
    an issue (unreadable, too large, not UTF-8, not YAML, unknown top-level keys...).
    """
    name = str(path)
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise _TooLarge(path.stat().st_size)
        data = path.read_bytes()
        text = data.decode("utf-8")
    except _TooLarge as exc:
        issues.add(RuleIssue(name, 1, 1, f"file too large ({exc.size} bytes, max 1 MiB)"))
        return None
    except OSError as exc:
        issues.add(RuleIssue(name, 1, 1, f"cannot read file: {exc.strerror or exc}"))
        return None
    except UnicodeDecodeError as exc:
        prefix = data[: exc.start].decode("utf-8", "replace")
        line, col = line_col(prefix, len(prefix))
        issues.add(RuleIssue(name, line, col, "file is not valid UTF-8"))
        return None
    files.append((name, hashlib.sha256(data).hexdigest()))
    root = compose(name, text, issues)
    if root is None:
        return None
    return Document(name, text, _sections(name, root, issues, top_keys))


class _TooLarge(Exception):
    def __init__(self, size: int) -> None:
        self.size = size


def compose(name: str, text: str, issues: Issues, what: str = "a rules file") -> Node | None:
    """Compose one YAML document into nodes, or record a located issue and return None."""
    try:
        if not _prescan(name, text, issues):
            return None
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = exc.problem or exc.context or "invalid YAML"
        issues.add(RuleIssue(name, line, col, f"YAML syntax error: {problem}"))
        return None
    except yaml.reader.ReaderError as exc:
        line, col = line_col(text, exc.position)
        issues.add(RuleIssue(name, line, col, f"YAML syntax error: {exc.reason}"))
        return None
    except (yaml.YAMLError, RecursionError) as exc:
        issues.add(RuleIssue(name, 1, 1, f"YAML error: {type(exc).__name__}"))
        return None
    if root is not None and not isinstance(root, MappingNode):
        issues.at(name, root, f"{what} must be a mapping")
        return None
    return root


def _prescan(name: str, text: str, issues: Issues) -> bool:
    """Refuse object-building tags and absurd nesting from the event stream, which PyYAML
    produces iteratively, before the recursive composer sees the document."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, NodeEvent) and _bad_tag(event):
            issues.at(name, event, f"YAML tag {event.tag!r} is not allowed in rule files")  # type: ignore[arg-type]
            return False
        if isinstance(event, CollectionStartEvent):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                issues.at(name, event, f"YAML nested too deeply (max depth {MAX_YAML_DEPTH})")  # type: ignore[arg-type]
                return False
        elif isinstance(event, CollectionEndEvent):
            depth -= 1
    return True


def _bad_tag(event: NodeEvent) -> bool:
    tag = getattr(event, "tag", None)
    if tag is None or (isinstance(event, MappingStartEvent) and tag == "tag:yaml.org,2002:map"):
        return False
    return tag not in _PLAIN_TAGS


def line_col(text: str, offset: int) -> tuple[int, int]:
    """The 1-based line and column of `offset` in `text`."""
    before = text[:offset]
    return before.count("\n") + 1, offset - (before.rfind("\n") + 1) + 1


def _sections(path: str, root: Node | None, issues: Issues, top_keys: Sequence[str]) -> dict:
    sections: dict[str, Node] = {}
    if root is None:  # an empty file is a valid, empty rule set
        return sections
    for key, key_node, value in pairs(path, root, issues):
        if key in top_keys:
            sections[key] = value
        else:
            issues.at(
                path, key_node, f"unknown top-level key {key!r}" + did_you_mean(key, top_keys)
            )
    return sections


# --------------------------------------------------------------------------- nodes


def pairs(path: str, node: MappingNode, issues: Issues) -> Iterator[tuple[str, Node, Node]]:
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


def section_mapping(doc: Document, key: str, issues: Issues) -> MappingNode | None:
    """The top-level section `key` as a mapping node; None when absent, or after an issue."""
    node = doc.sections.get(key)
    if node is None or is_null(node):
        return None
    if not isinstance(node, MappingNode):
        issues.at(doc.path, node, f"'{key}' must be a mapping")
        return None
    return node


def is_null(node: Node) -> bool:
    """Whether the node is YAML null (`~`, `null` or empty)."""
    return isinstance(node, ScalarNode) and node.tag == NULL_TAG


def string_value(doc: Document, node: Node, what: str, issues: Issues) -> str | None:
    """A scalar's text; None after recording an issue for anything else."""
    if isinstance(node, ScalarNode) and not is_null(node):
        return node.value
    issues.at(doc.path, node, f"{what} must be a string")
    return None


def construct(node: ScalarNode) -> object:
    """The Python value of a plain scalar (int, bool, ...), or None when it has none."""
    try:
        return SafeConstructor().construct_object(node)
    except (yaml.YAMLError, ValueError, OverflowError):
        return None


# --------------------------------------------------------------------------- expressions in YAML


def source_text(doc: Document, node: ScalarNode) -> SourceText:
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


def parse_expression(
    doc: Document, node: Node, what: str, issues: Issues
) -> tuple[ExprNode | None, SourceText | None]:
    """Parse an expression scalar, with a SourceText that maps its offsets to file positions;
    (None, None) after recording an issue.
    """
    text = string_value(doc, node, what, issues)
    if text is None:
        return None, None
    source = source_text(doc, node)  # type: ignore[arg-type]  # a ScalarNode here
    try:
        return parse(source), source
    except ExpressionError as exc:
        for issue in exc.issues:
            issues.add(issue)
        return None, source
