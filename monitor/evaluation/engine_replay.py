"""Replay conversations' feature values through the real rules engine, offline.

The sidecar evaluates what the capture client sends: one message per forward pass, each
conversation a slice with its role and continuing positions. This module builds exactly those
slices from a replay (one batch per turn index, all conversations side by side, each turn's
slice marked ``turn_end`` as a capture client marks a finished prompt or answer), encodes each
hook point once with the pack (the sidecar's own encode), and runs a fresh ``RuleEngine`` over
them, returning which rules fired in which conversation and where first.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from monitor.escape import escape_text
from monitor.features.build.conversations import ConversationTokens
from monitor.features.pack import FeatureInfo, FeaturePack
from monitor.rules import PackFeatures, Rule, RuleEngine, RuleSet, SequenceSlice
from monitor.rules.pooling import AggregationError, Pooling, parse_pooling


@dataclass
class _Batch:
    features: dict[str, torch.Tensor]
    slices: list[SequenceSlice]


class EngineReplay:
    """Encoded, sliced batches of a set of conversations, ready to run through any rule set
    that reads the given features (encode once, evaluate many times)."""

    def __init__(
        self,
        tokens: Sequence[ConversationTokens],
        packs: Sequence[FeaturePack],
        features: set[str],
        ids: Sequence[str] | None = None,
    ) -> None:
        self.ids = list(ids) if ids is not None else [f"c{i}" for i in range(len(tokens))]
        per_conversation = [_encode(t, packs, features) for t in tokens]
        self.batches: list[_Batch] = []
        turns = max((len(t.turn_rows) for t in tokens), default=0)
        starts = [0] * len(tokens)
        for turn in range(turns):
            slices, parts = [], {name: [] for name in features}
            row = 0
            for i, conversation in enumerate(tokens):
                if turn >= len(conversation.turn_rows):
                    continue
                count = conversation.turn_rows[turn]
                begin = starts[i]
                slices.append(
                    SequenceSlice(
                        self.ids[i],
                        row,
                        count,
                        begin,
                        role=conversation.roles[begin] if count else "",
                        # Each turn is one forward pass here, so its last row ends it.
                        turn_end=True,
                    )
                )
                for name in features:
                    parts[name].append(per_conversation[i][name][begin : begin + count])
                starts[i] += count
                row += count
            self.batches.append(
                _Batch({n: torch.cat(p) if p else torch.empty(0) for n, p in parts.items()}, slices)
            )

    def run(self, ruleset: RuleSet) -> dict[str, dict[str, int]]:
        """``{rule: {conversation id: position of its first firing}}`` for every enabled rule."""
        engine = RuleEngine(ruleset, max_conversations=max(1, len(self.ids)))
        fired: dict[str, dict[str, int]] = {rule.name: {} for rule in ruleset.enabled_rules}
        for batch in self.batches:
            if not batch.slices:
                continue
            result = engine.evaluate(batch.features, batch.slices)
            for firing in result.firings:
                first = fired[firing.rule]
                if firing.conversation_id not in first:
                    first[firing.conversation_id] = firing.position
        return fired


def _encode(
    tokens: ConversationTokens, packs: Sequence[FeaturePack], features: set[str]
) -> dict[str, torch.Tensor]:
    values: dict[str, torch.Tensor] = {}
    for pack in packs:
        for hook_point in pack.hook_points:
            names = pack.qualified_names(hook_point)
            if not features.intersection(names):
                continue
            encoded = pack.encode(hook_point, tokens.activations[hook_point]).to("cpu")
            for column, name in enumerate(names):
                if name in features:
                    values[name] = encoded[:, column]
    missing = features - set(values)
    if missing:
        raise ValueError(f"no loaded pack provides feature(s) {', '.join(sorted(missing))}")
    return values


def pack_features(packs: Sequence[FeaturePack]) -> PackFeatures:
    """Every '<pack>/<feature>' with its calibrated alert threshold and its recorded
    aggregation (what rules load with: thresholds naming a feature, ``pooled()``)."""
    return PackFeatures.of(packs)


def pooling_notes(ruleset: RuleSet, packs: Sequence[FeaturePack]) -> list[str]:
    """One line per rule that pools a probe differently from how the pack says it was fitted
    and calibrated: ``rolling_mean(<feature>, W)`` with ``for: K``, ``window_roles:`` (for a
    ``,roles`` aggregation, none otherwise) and ``at:`` (``turn_end`` for ``,turn_end``)
    against the pack's ``max_rolling_mean:W',for:K'...``; where the pack records the roles its
    fit data labeled (``labeled_roles``, written by `pack fit`), the rule's ``roles:`` and
    ``window_roles:`` lists must name those roles too. Such a rule still works, but it does not
    serve the score the probe was trained through and `eval` measured per feature. A rule that
    pools with ``pooled(<alias>)`` follows the pack by construction (its window, ``for``,
    ``window_roles`` and ``at`` come from it at load): it is noted only when its ``roles:``
    name other roles than the labeled ones, or (the load's ``RuleSet.notes``) when a
    threshold it uses was calibrated for another pooling."""
    fitted: dict[str, tuple[FeatureInfo, Pooling]] = {}
    for pack in packs:
        for info in pack.features():
            try:
                pooling = parse_pooling(info.aggregation, info.labeled_roles)
            except AggregationError:  # none recorded, or `mean`: no rule reproduces it
                continue
            fitted[f"{pack.name}/{info.name}"] = (info, pooling)
    notes = list(ruleset.notes)  # thresholds calibrated for another pooling than now
    for rule in ruleset.enabled_rules:
        program = rule.condition.program
        pooled = ruleset.pooled.get(rule.name, {})
        for ins in program:
            if ins.kind != "rolling_mean" or program[ins.args[0]].kind != "feature":
                continue
            feature = program[ins.args[0]].param
            if feature not in fitted:
                continue
            info, pooling = fitted[feature]
            aggregation = info.aggregation
            labeled = frozenset(info.labeled_roles)  # empty: not recorded (an older pack)
            if feature in pooled:
                if labeled and frozenset(rule.roles) != labeled:
                    notes.append(
                        f"rule {rule.name!r} pools {feature} with pooled() as the pack fitted "
                        f"it ({aggregation}) but checks it at {_served_roles(rule)}, not at "
                        f"the roles its fit data labeled ([{_role_list(sorted(labeled))}]) "
                        "(fine if it is meant to, e.g. to flag the answer to a request)"
                    )
                continue
            window = int(ins.param[0])
            masked = pooling.masked
            expected = (pooling.window, pooling.guard, masked, pooling.at)
            roles_differ = bool(labeled) and (
                frozenset(rule.roles) != labeled
                or frozenset(rule.window_roles) != (labeled if masked else frozenset())
            )
            served = (window, rule.for_tokens, bool(rule.window_roles), rule.at)
            if served != expected or roles_differ:
                notes.append(
                    f"rule {rule.name!r} pools {feature} as rolling_mean(., {window}) with "
                    f"for: {rule.for_tokens}, {_served_roles(rule)}{_at(rule.at)}, but the "
                    f"pack fitted and calibrated it as {aggregation} (rolling_mean(., "
                    f"{expected[0]}) with for: {expected[1]} tokens, "
                    f"{_wanted_roles(sorted(labeled), masked)}{_at(pooling.at)}): it does "
                    "not serve the score the probe was trained for (fine if it is meant to "
                    "pool differently, e.g. on another role; pooled(<alias>) follows the pack)"
                )
    return notes


def _at(at: str) -> str:
    return ", at: turn_end" if at == "turn_end" else ""


def _role_list(roles: Iterable[str]) -> str:
    # Role names come from rule files and packs (files from elsewhere): escaped, so a name
    # cannot drive the terminal or forge a second note line.
    return ", ".join(escape_text(role) for role in roles)


def _served_roles(rule: Rule) -> str:
    roles = f"roles: [{_role_list(rule.roles)}]" if rule.roles else "every role"
    if not rule.window_roles:
        return f"{roles} and no window_roles"
    return f"{roles} and window_roles: [{_role_list(rule.window_roles)}]"


def _wanted_roles(labeled: list[str], masked: bool) -> str:
    if not labeled:  # a pack that does not record them
        return "window_roles: the labeled roles" if masked else "no window_roles"
    roles = f"roles: [{_role_list(labeled)}]"
    windows = f"window_roles: [{_role_list(labeled)}]" if masked else "no window_roles"
    return f"{roles} and {windows}, the roles its fit data labeled"


def layers_of(packs: Sequence[FeaturePack], features: set[str] | None = None) -> list[int]:
    """Layer indices of the hook points (``layers.<i>``) holding ``features`` (all if None)."""
    layers = set()
    for pack in packs:
        for hook_point in pack.hook_points:
            names = set(pack.qualified_names(hook_point))
            if features is None or names & features:
                layers.add(int(hook_point.split(".")[1]))
    return sorted(layers)
