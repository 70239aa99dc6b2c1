"""What a loaded rule file becomes: plain dataclasses shared by the loader, engine and tools."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from monitor.rules.errors import SourceLocation
from monitor.rules.expressions import Condition

SEVERITIES = ("info", "warning", "critical")
# `block` (guard mode): an engine integration that supports it stops the conversation's request
# (see monitor/capture/vllm); clients that cannot block just see the alert.
ACTIONS = ("alert", "audit", "log", "block")
SCOPES = ("conversation", "request")
# Where a rule's condition is checked: every token of its roles (`token`, the default), or only a
# turn's last token (`turn_end`: a row whose sequence carries `turn_end` or `end` on the wire).
AT_CHOICES = ("token", "turn_end")
DEFAULT_OUTPUT = "{rule} fired at token {position} of {conversation_id} (value {value:.3g})"
DEFAULT_CATEGORY = "uncategorized"


@dataclass(frozen=True)
class RuleException:
    """Falco-style exception: the rule is silenced on a sequence whose attributes match.

    Every listed attribute must match (and); an attribute matches when its value is one of the
    listed values (or). A sequence without the attribute does not match.
    """

    name: str
    attributes: tuple[tuple[str, frozenset[str]], ...]
    desc: str = ""

    def matches(self, attributes: Mapping[str, str]) -> bool:
        """Whether a sequence with `attributes` is exempt from the rule."""
        return all(attributes.get(key) in values for key, values in self.attributes)


@dataclass
class Rule:
    """One compiled rule: its condition, how long it must hold (`for_tokens`), which roles and
    scope it applies to, which roles' tokens its temporal functions take in (`window_roles`,
    empty: every role), where it is checked (`at`: every token, or a turn's last), cooldown,
    exceptions, and what a firing carries (severity, category, labels, annotations, the
    rendered `output`, actions). `source` points at its YAML.
    """

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
    scope: str = "conversation"
    cooldown_tokens: int = 0
    exceptions: tuple[RuleException, ...] = ()
    annotations: dict[str, str] = field(default_factory=dict)
    window_roles: tuple[str, ...] = ()
    at: str = "token"  # AT_CHOICES

    @property
    def window_key(self) -> tuple[str, ...]:
        """``window_roles`` as a set (sorted): what temporal state is kept per (empty: all)."""
        return tuple(sorted(set(self.window_roles)))

    @property
    def state_key(self) -> tuple[str, str, int, str, tuple[str, ...], str]:
        """What must stay equal across a reload for the engine to keep this rule's state."""
        return (
            self.name,
            self.condition.digest,
            self.for_tokens,
            self.scope,
            self.window_key,
            self.at,
        )

    def applies_to(self, attributes: Mapping[str, str]) -> bool:
        """Whether this rule evaluates a sequence: its role is listed and no exception matches."""
        if self.roles and attributes.get("role", "") not in self.roles:
            return False
        return not any(exception.matches(attributes) for exception in self.exceptions)


@dataclass(frozen=True)
class Threshold:
    """A named constant of the ``thresholds:`` section: a number in the file (which
    ``rules calibrate`` rewrites), or a pack feature's calibrated alert threshold."""

    name: str
    value: float
    feature: str = ""  # '<pack>/<feature>' when the value comes from a pack
    source: SourceLocation = field(default_factory=lambda: SourceLocation("<memory>", 1, 1))
    # '<pack>/<feature>' -> aggregation: how the pooled() features of the rules using it were
    # pooled when `rules calibrate` set the number (`{value: N, pooled: {...}}` in the file).
    pooled: dict[str, str] = field(default_factory=dict)


@dataclass
class RuleSet:
    """Every rule of the loaded files, with the feature aliases, macros and lists they declared and
    each file's content hash (GetStatus and the audit trail report them).
    """

    rules: list[Rule] = field(default_factory=list)
    feature_aliases: dict[str, str] = field(default_factory=dict)
    files: list[tuple[str, str]] = field(default_factory=list)  # (path, sha256 of content)
    macros: dict[str, str] = field(default_factory=dict)  # name -> expression text
    lists: dict[str, tuple[str, ...]] = field(default_factory=dict)
    thresholds: dict[str, Threshold] = field(default_factory=dict)
    # rule name -> {'<pack>/<feature>': aggregation} for each feature a rule pools with
    # `pooled()`: the rule's window, `for`, `window_roles` and `at` are the pack's.
    pooled: dict[str, dict[str, str]] = field(default_factory=dict)
    # Located warnings of a load that succeeded: a threshold calibrated for another pooling
    # than its rules' pooled() now expands to (a refitted pack). eval, rules calibrate and
    # rules check print them, the sidecar logs them.
    notes: list[str] = field(default_factory=list)

    @property
    def required_features(self) -> set[str]:
        """The qualified feature names the enabled rules read."""
        return {name for rule in self.rules if rule.enabled for name in rule.condition.features}

    @property
    def enabled_rules(self) -> list[Rule]:
        """The rules with `enabled: true`, in file order."""
        return [rule for rule in self.rules if rule.enabled]
