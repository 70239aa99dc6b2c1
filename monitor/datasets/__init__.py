"""Labeled conversations: the data sets this project ships and the reader for your own.

Each set is a JSONL file, one conversation per line (the format is described in
``DATASHEET.md`` next to this file)::

    {"id": "misuse-000123", "task": "misuse", "label": 1, "split": "fit",
     "category": "weapons", "group": "misuse-h-0042",
     "turns": [{"role": "user", "text": "..."}],
     "label_roles": ["user"], "source": "safety-monitor/datasets v1"}

``label`` is 1 for the thing the task detects (harmful, dishonest, stereotyping). Items that
share a ``group`` (paraphrases of one seed, the two halves of a contrast pair) are always in the
same ``split``, so a fit never sees a paraphrase of a test item.

Usage::

    from monitor import datasets

    test = datasets.load("misuse", split="test")
    harmful = [c for c in test if c.label == 1]
    mine = datasets.read_jsonl("benign.jsonl")  # same checks, errors name file:line

The shipped files are produced by ``python -m monitor.datasets.build`` from the hand-written
seed lists in ``monitor/datasets/seeds``; this module only reads them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "LABELS",
    "ROLES",
    "SPLITS",
    "DatasetError",
    "LabeledConversation",
    "Turn",
    "dataset_path",
    "load",
    "read_jsonl",
    "tasks",
    "validate",
    "write_jsonl",
]

ROLES = ("system", "user", "assistant")
SPLITS = ("fit", "calibrate", "test")
LABELS = (0, 1)

_DATA_DIR = Path(__file__).resolve().parent
_REQUIRED = ("id", "task", "label", "turns")
_OPTIONAL = ("split", "category", "group", "label_roles", "source", "meta")


class DatasetError(ValueError):
    """A data set file is missing or malformed; ``str(e)`` is ``'<file>:<line>: <problem>'``."""

    def __init__(self, detail: str, *, where: str | Path | None = None, line: int | None = None):
        self.where = None if where is None else str(where)
        self.line = line
        self.detail = detail
        location = self.where or ""
        if line is not None:
            location = f"{location}:{line}"
        # One line per error, so a CLI or a log shows it whole.
        message = f"{location}: {detail}" if location else detail
        super().__init__(" ".join(message.splitlines()))


@dataclass(frozen=True)
class Turn:
    """One message of a conversation: who spoke (``system``, ``user``, ``assistant``) and what."""

    role: str
    text: str

    def __getitem__(self, key: str) -> str:
        # Lets code written against the JSON shape (turn["text"]) work on the dataclass too.
        if key == "role":
            return self.role
        if key == "text":
            return self.text
        raise KeyError(key)

    def to_dict(self) -> dict[str, str]:
        """The turn as it is written in JSONL."""
        return {"role": self.role, "text": self.text}


@dataclass(frozen=True)
class LabeledConversation:
    """One labeled conversation.

    ``split`` is ``None`` for a user file that does not split its data. ``group`` defaults to
    the ``id`` (every conversation its own group). ``label_roles`` names the roles whose tokens
    carry the label; ``None`` means all of them (see :attr:`labeled_roles`).
    """

    id: str
    task: str
    label: int
    turns: tuple[Turn, ...]
    split: str | None = None
    category: str = ""
    group: str = ""
    label_roles: tuple[str, ...] | None = None
    source: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def labeled_roles(self) -> tuple[str, ...]:
        """Roles whose tokens carry the label (all roles present when none were named)."""
        if self.label_roles is not None:
            return self.label_roles
        return tuple(dict.fromkeys(t.role for t in self.turns))

    @property
    def labeled_text(self) -> str:
        """The text of the turns that carry the label, joined by blank lines."""
        roles = set(self.labeled_roles)
        return "\n\n".join(t.text for t in self.turns if t.role in roles)

    def to_dict(self) -> dict[str, Any]:
        """The conversation as one JSONL object (optional fields left out when unset)."""
        out: dict[str, Any] = {"id": self.id, "task": self.task, "label": self.label}
        if self.split is not None:
            out["split"] = self.split
        out["category"] = self.category
        out["group"] = self.group
        out["turns"] = [t.to_dict() for t in self.turns]
        if self.label_roles is not None:
            out["label_roles"] = list(self.label_roles)
        out["source"] = self.source
        if self.meta:
            out["meta"] = dict(self.meta)
        return out


def _parse(obj: Any, where: str, line: int) -> LabeledConversation:
    def fail(detail: str) -> DatasetError:
        return DatasetError(detail, where=where, line=line)

    if not isinstance(obj, dict):
        raise fail(f"expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise fail(
            f"unknown field(s) {', '.join(map(repr, unknown))} "
            f"(known: {', '.join(_REQUIRED + _OPTIONAL)}; put extras under 'meta')"
        )
    missing = [k for k in _REQUIRED if k not in obj]
    if missing:
        raise fail(f"missing field(s) {', '.join(map(repr, missing))}")

    def text_field(name: str, *, required: bool) -> str:
        value = obj.get(name, "")
        if not isinstance(value, str):
            raise fail(f"{name}: expected a string, got {type(value).__name__}")
        if required and not value.strip():
            raise fail(f"{name}: must not be empty")
        return value

    conv_id = text_field("id", required=True)
    task = text_field("task", required=True)
    label = obj["label"]
    # bool is an int in Python; true/false in a file is almost always a mistake worth naming.
    if isinstance(label, bool) or label not in LABELS:
        raise fail(f"label: expected 0 or 1, got {json.dumps(label)}")
    split = obj.get("split")
    if split is not None and split not in SPLITS:
        raise fail(f"split: expected one of {', '.join(SPLITS)}, got {json.dumps(split)}")
    category = text_field("category", required=False)
    group = text_field("group", required=False) or conv_id
    source = text_field("source", required=False)

    raw_turns = obj["turns"]
    if not isinstance(raw_turns, list) or not raw_turns:
        raise fail("turns: expected a non-empty list of {role, text} objects")
    turns = []
    for i, turn in enumerate(raw_turns):
        if not isinstance(turn, dict):
            raise fail(f"turns[{i}]: expected an object, got {type(turn).__name__}")
        extra = sorted(set(turn) - {"role", "text"})
        if extra:
            raise fail(f"turns[{i}]: unknown field(s) {', '.join(map(repr, extra))}")
        role, text = turn.get("role"), turn.get("text")
        if role not in ROLES:
            raise fail(
                f"turns[{i}].role: expected one of {', '.join(ROLES)}, got {json.dumps(role)}"
            )
        if not isinstance(text, str) or not text.strip():
            raise fail(f"turns[{i}].text: expected a non-empty string")
        turns.append(Turn(role, text))

    label_roles = obj.get("label_roles")
    if label_roles is not None:
        if not isinstance(label_roles, list) or not label_roles:
            raise fail("label_roles: expected a non-empty list of roles")
        for role in label_roles:
            if role not in ROLES:
                raise fail(
                    f"label_roles: expected roles among {', '.join(ROLES)}, got {json.dumps(role)}"
                )
        present = {t.role for t in turns}
        if not present.intersection(label_roles):
            # The label would sit on no token at all: nothing to fit or score.
            raise fail(
                f"label_roles {label_roles} name no role present in turns ({sorted(present)})"
            )
        label_roles = tuple(dict.fromkeys(label_roles))
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        raise fail(f"meta: expected an object, got {type(meta).__name__}")

    return LabeledConversation(
        id=conv_id,
        task=task,
        label=label,
        turns=tuple(turns),
        split=split,
        category=category,
        group=group,
        label_roles=label_roles,
        source=source,
        meta=meta,
    )


def _read_lines(lines: Iterable[str], where: str) -> Iterator[tuple[int, LabeledConversation]]:
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DatasetError(
                f"invalid JSON: {e.msg} (column {e.colno})", where=where, line=number
            ) from None
        yield number, _parse(obj, where, number)


def validate(
    items: Iterable[tuple[int | None, LabeledConversation]], *, where: str | Path = "<data>"
) -> None:
    """Check what no single line can: ids are unique and no group spans two splits.

    ``items`` are ``(line, conversation)`` pairs; ``line`` may be ``None`` when unknown.
    Raises :class:`DatasetError` naming the offending lines.
    """
    seen_ids: dict[str, int | None] = {}
    group_split: dict[str, tuple[str | None, int | None]] = {}
    for line, conv in items:
        if conv.id in seen_ids:
            first = seen_ids[conv.id]
            at = f" (first at line {first})" if first is not None else ""
            raise DatasetError(f"duplicate id {conv.id!r}{at}", where=where, line=line)
        seen_ids[conv.id] = line
        if conv.group in group_split:
            split, first = group_split[conv.group]
            if split != conv.split:
                at = f" at line {first}" if first is not None else ""
                raise DatasetError(
                    f"group {conv.group!r} is in split {conv.split!r} here but in {split!r}{at}: "
                    "a group (paraphrases, contrast pairs) must stay in one split",
                    where=where,
                    line=line,
                )
        else:
            group_split[conv.group] = (conv.split, line)


def read_jsonl(
    path: str | Path, *, split: str | None = None, task: str | None = None
) -> list[LabeledConversation]:
    """Read and check a JSONL file of labeled conversations.

    Every problem raises :class:`DatasetError` with ``file:line``. ``split`` and ``task`` keep
    only matching conversations (after the whole file was checked). An empty file is an error.
    """
    path = Path(path)
    if split is not None and split not in SPLITS:
        raise DatasetError(f"split must be one of {', '.join(SPLITS)}, got {split!r}", where=path)
    try:
        with path.open(encoding="utf-8") as f:
            numbered = list(_read_lines(f, str(path)))
    except OSError as e:
        raise DatasetError(f"cannot read: {e.strerror or e}", where=path) from e
    except UnicodeDecodeError as e:
        raise DatasetError(f"not UTF-8 text: {e.reason}", where=path) from e
    if not numbered:
        raise DatasetError("no conversations in file", where=path)
    validate(numbered, where=path)
    return [
        conv
        for _, conv in numbered
        if (split is None or conv.split == split) and (task is None or conv.task == task)
    ]


def tasks() -> list[str]:
    """Names of the data sets shipped with the package (``load`` accepts these)."""
    return sorted(p.stem for p in _DATA_DIR.glob("*.jsonl"))


def dataset_path(task: str) -> Path:
    """Path of a shipped data set's JSONL file."""
    path = _DATA_DIR / f"{task}.jsonl"
    # Only a name the package ships: "../x" or an absolute path must not read other files.
    if task not in tasks() or not path.is_file():
        available = ", ".join(tasks()) or "none"
        raise DatasetError(f"no shipped data set {task!r} (available: {available})")
    return path


def load(task: str, split: str | None = None) -> list[LabeledConversation]:
    """Load a shipped data set (``misuse``, ``deception``, ``bias``), optionally one split.

    >>> test = load("misuse", split="test")  # doctest: +SKIP
    """
    path = dataset_path(task)
    items = read_jsonl(path, split=split)
    for conv in items:
        # A shipped file mixing tasks or lacking splits is a build bug, not user error.
        if conv.task != task or conv.split is None:
            raise DatasetError(
                f"conversation {conv.id!r} has task {conv.task!r} and split {conv.split!r}; "
                f"expected task {task!r} and a split",
                where=path,
            )
    return items


def write_jsonl(path: str | Path, conversations: Iterable[LabeledConversation]) -> int:
    """Write conversations as JSONL (one per line, stable key order); returns how many."""
    count = 0
    with Path(path).open("w", encoding="utf-8") as f:
        for conv in conversations:
            f.write(json.dumps(conv.to_dict(), ensure_ascii=False, sort_keys=False) + "\n")
            count += 1
    return count
