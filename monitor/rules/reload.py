"""Hot reload of rule files: notice changed content, load it, and report without raising.

The sidecar polls ``RuleReloader.check()`` (and calls ``check(force=True)`` on SIGHUP), then
swaps a good result in with ``RuleEngine.replace_rules`` between batches. A broken edit yields
one error result and the previous rule set keeps running; the same broken content is not
re-reported on every poll, only when it changes again.

A file that had rules and now loads with none (empty, comment-only, ``rules:`` with nothing
under it: what an editor or a copy leaves mid-write) is refused too, unless it says so with an
explicit empty list, ``rules: []``. Alerting must never stop silently because a poll caught a
file half written; deploy rule files atomically (write a temporary file, then rename it).
"""

from __future__ import annotations

import hashlib
import threading
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from yaml.nodes import MappingNode, ScalarNode, SequenceNode

from monitor.rules.errors import RuleLoadError
from monitor.rules.loader import load_rules
from monitor.rules.model import RuleSet
from monitor.rules.pooling import PackFeatures
from monitor.rules.yamlsource import Issues, compose, rule_files

Fingerprint = tuple[tuple[str, str], ...]  # (path, sha256 or a read error), in load order


@dataclass(frozen=True)
class ReloadResult:
    """The outcome of a reload: the new rule set, or every problem found (the old set stays)."""

    ok: bool
    ruleset: RuleSet | None  # the new set when ok
    error: str = ""  # every located issue, one per line, when not ok


class RuleReloader:
    """Re-loads rule files when their content (not their mtime) changes."""

    def __init__(
        self,
        paths: Sequence[str | Path],
        known_features: Collection[str] | Mapping[str, float | None] | None = None,
        ruleset: RuleSet | None = None,
    ) -> None:
        """``ruleset``: the set already running (its file hashes are the baseline); without
        one, the first ``check()`` loads."""
        self.paths = list(paths)
        # A mapping also carries the packs' calibrated thresholds: keep it one (and a
        # PackFeatures keeps the aggregations that pooled() expands from, on every reload).
        self.known_features: Collection[str] | Mapping[str, float | None] | None = (
            None
            if known_features is None
            else known_features.copy()
            if isinstance(known_features, PackFeatures)
            else dict(known_features)
            if isinstance(known_features, Mapping)
            else frozenset(known_features)
        )
        self._ruleset = ruleset
        self._seen: Fingerprint | None = tuple(ruleset.files) if ruleset is not None else None
        self._lock = threading.Lock()

    @property
    def ruleset(self) -> RuleSet | None:
        """The last rule set that loaded."""
        return self._ruleset

    def check(self, force: bool = False) -> ReloadResult | None:
        """None when nothing changed (and not forced); else the outcome of loading."""
        with self._lock:
            fingerprint = self.fingerprint()
            if not force and fingerprint == self._seen:
                return None
            self._seen = fingerprint
            try:
                ruleset = load_rules(self.paths, known_features=self.known_features)
            except RuleLoadError as exc:
                return ReloadResult(False, None, str(exc))
            except Exception as exc:  # a reload must never take the sidecar down
                return ReloadResult(False, None, f"unexpected error loading rules: {exc!r}")
            emptied = _emptied_files(self._ruleset, ruleset)
            if emptied:
                return ReloadResult(False, None, "\n".join(emptied))
            self._ruleset = ruleset
            # What was loaded may differ from what was hashed (a write in between): keep the
            # loader's own hashes so the next poll sees the difference.
            self._seen = tuple(ruleset.files)
            return ReloadResult(True, ruleset)

    def fingerprint(self) -> Fingerprint:
        """Path and content hash of every rule file the paths name right now."""
        entries = []
        for path in rule_files(self.paths, Issues()):
            try:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            except OSError as exc:
                digest = f"unreadable: {exc.strerror or exc}"
            entries.append((str(path), digest))
        return tuple(entries)


def _emptied_files(before: RuleSet | None, after: RuleSet) -> list[str]:
    """One located message per file that defined rules before and defines none now without
    saying so (``rules: []``)."""
    if before is None:
        return []
    had = Counter(rule.source.path for rule in before.rules)
    has = Counter(rule.source.path for rule in after.rules)
    problems = []
    for path, digest in after.files:
        if had[path] and not has[path] and not _declares_no_rules(path, digest):
            problems.append(
                f"{path}:1:1: the file defined {had[path]} rule(s) and now defines none "
                "(empty, comment-only or half-written?); reload refused, the running rules "
                "stay. Write 'rules: []' to remove every rule of a file on purpose."
            )
    return problems


def _declares_no_rules(path: str, digest: str) -> bool:
    """Whether the file, with the content that was loaded, has a top-level ``rules: []``."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return False
    if hashlib.sha256(data).hexdigest() != digest:  # changed again since it was loaded
        return False
    root = compose(path, data.decode("utf-8", "replace"), Issues())
    if not isinstance(root, MappingNode):
        return False
    for key, value in root.value:
        if isinstance(key, ScalarNode) and key.value == "rules":
            return isinstance(value, SequenceNode) and value.flow_style and not value.value
    return False
