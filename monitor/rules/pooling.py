"""What ``pooled(<alias>)`` in a condition expands to: a pack feature's recorded aggregation.

``pack fit`` records per feature how its per-token values pool into the conversation score it
was fitted and calibrated through (``aggregation``, grammar
``max_rolling_mean:W[,for:K][,roles][,turn_end]``, or ``max``; see
``monitor/features/build/scoring.py``) and which roles' tokens carried the label
(``labeled_roles``). A rule serves exactly that score with::

    condition: rolling_mean(f, W) > t
    for: K tokens                   # ,for:K (1 without)
    roles: [<labeled roles>]
    window_roles: [<labeled roles>] # ,roles (none without)
    at: turn_end                    # ,turn_end (token without)

``pooled(f)`` writes that for the rule at load time, from the pack the rules are loaded with,
so a refitted pack that chose another window, guard or pooling is served as fitted without
editing the rule. This module parses the grammar itself: the rules package must not import
the pack-building code (tests/unit/test_architecture.py), and a unit test checks that both
parsers agree.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from monitor.escape import escape_text

_DIGITS = re.compile(r"[0-9]{1,5}")
MAX_POOLED_WINDOW = 4096  # the rules' own MAX_WINDOW
MAX_POOLED_GUARD = 64  # scoring.MAX_FOR


@dataclass(frozen=True)
class FeatureAggregation:
    """What a pack records about how one feature pools: its ``aggregation`` text (empty when
    not recorded, e.g. an SAE feature or an older pack) and the roles its fit data labeled
    (empty when not recorded)."""

    aggregation: str
    labeled_roles: tuple[str, ...] = ()


@dataclass(frozen=True)
class Pooling:
    """A parsed ``max_rolling_mean`` aggregation: what ``pooled()`` gives the rule."""

    text: str  # the aggregation as the pack records it
    window: int  # W of rolling_mean(f, W)
    guard: int  # the rule's `for` (1: none)
    masked: bool  # `,roles`: window_roles are the labeled roles
    turn_end: bool  # `,turn_end`: the rule is checked at turn ends (`at: turn_end`)
    labeled_roles: tuple[str, ...]  # sorted; empty: the pack does not record them

    @property
    def at(self) -> str:
        """The rule's ``at`` this pooling needs."""
        return "turn_end" if self.turn_end else "token"

    @property
    def window_roles(self) -> tuple[str, ...] | None:
        """The rule's ``window_roles`` this pooling needs: the labeled roles for ``,roles``,
        none otherwise; None when ``,roles`` but the pack does not record the labeled roles."""
        if not self.masked:
            return ()
        return self.labeled_roles or None

    def served(self) -> str:
        """The rule keys this pooling stands for, for messages: ``rolling_mean(., 8) with for:
        1, no window_roles, at: token``."""
        if not self.masked:
            roles = "no window_roles"
        elif self.labeled_roles:
            roles = f"window_roles: [{role_list(self.labeled_roles)}]"
        else:
            roles = "window_roles: the labeled roles"
        return f"rolling_mean(., {self.window}) with for: {self.guard}, {roles}, at: {self.at}"


def role_list(roles: Iterable[str]) -> str:
    """Role names for a message, escaped: they come from rule files and packs (files from
    elsewhere), and a message must not drive a terminal or forge a second line."""
    return ", ".join(escape_text(role) for role in roles)


class AggregationError(ValueError):
    """An aggregation text no rule can serve; str() says why."""


def parse_pooling(aggregation: str, labeled_roles: Sequence[str] = ()) -> Pooling:
    """Parse a recorded aggregation; AggregationError for one a rule cannot serve (``mean``,
    which scores a finished text and has no causal counterpart, or a malformed text)."""
    base, *options = aggregation.split(",")
    kind, _, window_text = base.partition(":")
    if kind == "max" and not window_text and not options:
        window = 1
    elif kind == "mean" and not window_text:
        raise AggregationError(
            "'mean' pools a whole text, which a rule checking token by token cannot know is "
            "complete; for one labeled turn of at most 512 tokens its served form is "
            "max_rolling_mean:512,roles,turn_end (the labeled role's mean read at the turn's "
            "end), which pack fit records"
        )
    elif kind == "max_rolling_mean" and _count(window_text, MAX_POOLED_WINDOW):
        window = int(window_text)
    else:
        raise AggregationError(f"{aggregation!r} is not max_rolling_mean:W[,for:K][,roles]...")
    guard, masked, turn_end = 1, False, False
    for option in options:
        name, _, value = option.partition(":")
        if name == "for" and _count(value, MAX_POOLED_GUARD) and guard == 1:
            guard = int(value)
        elif option == "roles" and not masked:
            masked = True
        elif option == "turn_end" and not turn_end:
            turn_end = True
        else:
            raise AggregationError(
                f"{aggregation!r}: unknown or repeated option {option!r} (expected "
                f"max_rolling_mean:W[,for:K][,roles][,turn_end], K in 1..{MAX_POOLED_GUARD})"
            )
    if turn_end and guard > 1:
        raise AggregationError(f"{aggregation!r}: for:K cannot go with turn_end")
    return Pooling(aggregation, window, guard, masked, turn_end, tuple(sorted(labeled_roles)))


def _count(text: str, most: int) -> bool:
    """Whether `text` is a count in 1..`most` in ASCII digits: a pack's text comes from
    elsewhere, and ``str.isdigit`` also takes '²' (which int() refuses) and '٣'."""
    return _DIGITS.fullmatch(text) is not None and 1 <= int(text) <= most


def pack_aggregations(packs: Iterable[Any]) -> dict[str, FeatureAggregation]:
    """Every ``'<pack>/<feature>'`` of loaded feature packs with what it records about its
    pooling: what ``load_rules(..., aggregations=)`` expands ``pooled()`` from. Packs are
    taken duck-typed (``name``, ``features()`` with ``aggregation`` and ``labeled_roles``) so
    the rules package needs no import of the features package."""
    return {
        f"{pack.name}/{info.name}": FeatureAggregation(
            getattr(info, "aggregation", "") or "", tuple(getattr(info, "labeled_roles", ()))
        )
        for pack in packs
        for info in pack.features()
    }


class PackFeatures(dict[str, float | None]):
    """What rules load against when they are loaded with their packs: every
    ``'<pack>/<feature>'`` with its calibrated alert threshold (a plain mapping, what
    ``known_features`` takes) and, in ``aggregations``, what each records about its pooling,
    which ``load_rules`` expands ``pooled()`` from when it is given no ``aggregations``. So
    every caller that loads rules with its packs' features expands ``pooled()`` the same way
    (the sidecar, its reloads, eval, rules calibrate's trial loads)."""

    def __init__(
        self,
        thresholds: Mapping[str, float | None],
        aggregations: Mapping[str, FeatureAggregation],
    ) -> None:
        super().__init__(thresholds)
        self.aggregations = dict(aggregations)

    @classmethod
    def of(cls, packs: Iterable[Any]) -> PackFeatures:
        """From loaded feature packs (duck-typed, as ``pack_aggregations``)."""
        packs = list(packs)
        thresholds = {
            f"{pack.name}/{info.name}": info.alert_threshold
            for pack in packs
            for info in pack.features()
        }
        return cls(thresholds, pack_aggregations(packs))

    def copy(self) -> PackFeatures:  # type: ignore[override]  # keeps the aggregations
        """A copy that keeps the aggregations."""
        return PackFeatures(self, self.aggregations)


def as_aggregations(
    raw: Mapping[str, FeatureAggregation | str] | None,
) -> dict[str, FeatureAggregation] | None:
    """Normalise ``aggregations=``: a plain string stands for an aggregation without recorded
    labeled roles."""
    if raw is None:
        return None
    return {
        name: value if isinstance(value, FeatureAggregation) else FeatureAggregation(str(value))
        for name, value in raw.items()
    }
