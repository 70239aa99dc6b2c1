"""Replay conversations' feature values through the real rules engine, offline.

The sidecar evaluates what the capture client sends: one message per forward pass, each
conversation a slice with its role and continuing positions. This module builds exactly those
slices from a replay (one batch per turn index, all conversations side by side), encodes each
hook point once with the pack (the sidecar's own encode), and runs a fresh ``RuleEngine`` over
them, returning which rules fired in which conversation and where first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from monitor.features.build.conversations import ConversationTokens
from monitor.features.pack import FeaturePack
from monitor.rules import RuleEngine, RuleSet, SequenceSlice


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


def pack_features(packs: Sequence[FeaturePack]) -> dict[str, float | None]:
    """Every '<pack>/<feature>' with its calibrated alert threshold (what rules load with)."""
    return {f"{p.name}/{info.name}": info.alert_threshold for p in packs for info in p.features()}


def pooling_notes(ruleset: RuleSet, packs: Sequence[FeaturePack]) -> list[str]:
    """One line per rule that pools a probe differently from how the pack says it was fitted
    and calibrated: ``rolling_mean(<feature>, W)`` with ``for: K`` (and ``window_roles:`` for a
    ``,roles`` aggregation, none otherwise) against the pack's ``max_rolling_mean:W',for:K'``.
    Such a rule still works, but it does not serve the score the probe was trained through and
    `eval` measured per feature (after a `pack fit` that chose another pooling, the shipped
    rules need the pack's window, guard and window roles)."""
    from monitor.features.build.scoring import (
        aggregation_guard,
        aggregation_masked,
        parse_aggregation,
    )

    fitted: dict[str, str] = {}
    for pack in packs:
        for info in pack.features():
            if info.aggregation and info.aggregation.startswith("max_rolling_mean"):
                fitted[f"{pack.name}/{info.name}"] = info.aggregation
    notes = []
    for rule in ruleset.enabled_rules:
        program = rule.condition.program
        for ins in program:
            if ins.kind != "rolling_mean" or program[ins.args[0]].kind != "feature":
                continue
            feature = program[ins.args[0]].param
            aggregation = fitted.get(feature)
            if aggregation is None:
                continue
            window = int(ins.param[0])
            masked = aggregation_masked(aggregation)
            expected = (parse_aggregation(aggregation)[1], aggregation_guard(aggregation), masked)
            if (window, rule.for_tokens, bool(rule.window_roles)) != expected:
                served = "window_roles: [...]" if rule.window_roles else "no window_roles"
                wanted = "window_roles: the labeled roles" if masked else "no window_roles"
                notes.append(
                    f"rule {rule.name!r} pools {feature} as rolling_mean(., {window}) with "
                    f"for: {rule.for_tokens} and {served}, but the pack fitted and calibrated "
                    f"it as {aggregation} (rolling_mean(., {expected[0]}) with for: "
                    f"{expected[1]} tokens and {wanted}): it does not serve the score the "
                    "probe was trained for (fine if it is meant to pool differently, e.g. on "
                    "another role)"
                )
    return notes


def layers_of(packs: Sequence[FeaturePack], features: set[str] | None = None) -> list[int]:
    """Layer indices of the hook points (``layers.<i>``) holding ``features`` (all if None)."""
    layers = set()
    for pack in packs:
        for hook_point in pack.hook_points:
            names = set(pack.qualified_names(hook_point))
            if features is None or names & features:
                layers.add(int(hook_point.split(".")[1]))
    return sorted(layers)
