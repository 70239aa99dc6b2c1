"""Labeled conversations for `pack fit`, `pack calibrate`, `rules calibrate` and `eval`.

Reads the shipped sets (``--dataset misuse``) and user files in the labeled-conversation
format of ``monitor.datasets`` (``{"id", "task", "label", "turns": [...], "split", ...}``),
and, for files written for the older `pack fit`, ``{"text"|"messages", "label"}`` lines (each
becomes a one-turn ``user`` conversation, or the messages' turns).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monitor.features.errors import FeatureError


@dataclass(frozen=True)
class SimpleTurn:
    """A turn of a conversation read from an older file."""

    role: str
    text: str


@dataclass(frozen=True)
class SimpleConversation:
    """A conversation read from an older ``{text|messages, label}`` file."""

    id: str
    label: int
    turns: tuple[SimpleTurn, ...]
    split: str | None = None
    group: str = ""
    label_roles: tuple[str, ...] | None = None

    @property
    def labeled_roles(self) -> tuple[str, ...]:
        """Roles whose tokens carry the label (all roles present when none were named)."""
        if self.label_roles is not None:
            return self.label_roles
        return tuple(dict.fromkeys(t.role for t in self.turns))


def load_dataset(name: str, split: str | None = None) -> list[Any]:
    """A shipped set (``misuse``, ``deception``, ``bias``), optionally one split."""
    from monitor import datasets

    try:
        return list(datasets.load(name, split=split))
    except (datasets.DatasetError, KeyError, FileNotFoundError) as exc:
        raise FeatureError(str(exc), field="dataset") from None


def read_conversations(path: str | Path) -> list[Any]:
    """A user file: the labeled-conversation format, or the older text/messages lines."""
    path = Path(path)
    try:
        first = next((ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()), "")
    except FileNotFoundError:
        raise FeatureError("file not found", where=path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FeatureError(f"cannot read: {exc}", where=path) from exc
    try:
        head = json.loads(first) if first else {}
    except json.JSONDecodeError:
        head = {}
    if isinstance(head, dict) and "turns" in head:
        from monitor import datasets

        try:
            return list(datasets.read_jsonl(path))
        except datasets.DatasetError as exc:
            raise FeatureError(exc.detail, where=f"{exc.where}:{exc.line}") from None
    return _legacy(path)


def _legacy(path: Path) -> list[SimpleConversation]:
    from monitor.features.build.probes import load_labeled_jsonl

    result = []
    for number, example in enumerate(load_labeled_jsonl(path), start=1):
        if example.messages is not None:
            turns = tuple(SimpleTurn(m["role"], m["content"]) for m in example.messages)
        else:
            turns = (SimpleTurn("user", example.text or ""),)
        result.append(SimpleConversation(f"{path.name}:{number}", example.label, turns))
    return result


def split_of(conversation: Any) -> str | None:
    """The conversation's split (fit / calibrate / test), or None."""
    return getattr(conversation, "split", None)


def select_split(
    conversations: Sequence[Any], split: str, where: str | Path
) -> tuple[list[Any], str | None]:
    """The conversations of ``split`` when the file names splits, with a note saying so; all
    of them (and no note) when it names none.

    A file in the shipped sets' format holds fit, calibrate and test together, and `pack fit`
    reads its fit and calibrate splits: `eval` on the same file must not score the fit split
    and `rules calibrate` must not set thresholds on the fit split's negatives."""
    named = sorted({s for s in (split_of(c) for c in conversations) if s is not None})
    if not named:
        return list(conversations), None
    chosen = [c for c in conversations if split_of(c) == split]
    if not chosen:
        raise FeatureError(
            f"the conversations name splits ({', '.join(named)}) but none is {split!r}",
            where=where,
            field="split",
        )
    return chosen, (
        f"{where}: using its {split!r} split ({len(chosen)} of {len(conversations)} "
        "conversations; the file names splits)"
    )


def fit_and_heldout(
    conversations: Sequence[Any], heldout_fraction: float = 0.2
) -> tuple[list[Any], list[Any]]:
    """The ``fit`` and ``calibrate`` splits when the data names them; otherwise a deterministic
    split by group (a hash of ``group``, or of ``id``), so paraphrases stay on one side."""
    if any(split_of(c) is not None for c in conversations):
        fit = [c for c in conversations if split_of(c) == "fit"]
        heldout = [c for c in conversations if split_of(c) == "calibrate"]
        if fit and heldout:
            return fit, heldout
        raise FeatureError(
            "the data names splits but lacks a 'fit' or a 'calibrate' split", field="split"
        )
    fit, heldout = [], []
    for conversation in conversations:
        key = getattr(conversation, "group", "") or conversation.id
        bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (heldout if bucket < heldout_fraction else fit).append(conversation)
    return fit, heldout
