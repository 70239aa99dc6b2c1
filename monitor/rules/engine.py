"""Stateful, vectorised rule evaluation over batches of tokens from many conversations.

A batch is split into *waves* so that each conversation appears at most once per wave (the
usual case is one wave). Within a wave every slice is laid out as one row of a padded
``[slices, longest slice]`` matrix; per-conversation state lives in tables indexed by a slot
number. Run lengths for ``for: N`` and all temporal functions are then a handful of torch ops
over that matrix for all rules at once: Python loops only run per slice, per rule and per
firing, never per token.

Chunking invariance: every quantity is a function of the conversation's own token stream
(carried state + this slice), computed with order-independent arithmetic (max, exact small
integer counts, float64 window sums rounded once), so any split of a conversation into
batches gives the same firings at the same positions.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from monitor.rules.expressions import MAX_WINDOW, Instr
from monitor.rules.loader import Rule, RuleSet

_INITIAL_CAPACITY = 64


@dataclass(frozen=True)
class SequenceSlice:
    """Rows ``[start_row, start_row + rows)`` of a batch are tokens ``position, position+1, ...``
    of one conversation."""

    conversation_id: str
    start_row: int
    rows: int
    position: int
    role: str = ""
    end: bool = False
    request_id: str = ""


@dataclass(frozen=True)
class Firing:
    rule: str
    category: str
    severity: str
    conversation_id: str
    request_id: str
    position: int
    row: int
    value: float
    labels: dict[str, str]
    message: str
    actions: tuple[str, ...]


@dataclass
class EvaluationResult:
    firings: list[Firing] = field(default_factory=list)
    gaps: int = 0  # slices whose position did not continue their conversation
    evicted: int = 0  # conversations dropped to stay under max_conversations


# --------------------------------------------------------------------------- state tables


class _Table:
    """One row of state per conversation slot; grows by doubling up to the conversation cap."""

    def __init__(self, shape: tuple[int, ...], fill: float, dtype: torch.dtype, capacity: int):
        self.fill = fill
        self.data = torch.full((capacity, *shape), fill, dtype=dtype)

    def grow(self, capacity: int) -> None:
        bigger = torch.full((capacity, *self.data.shape[1:]), self.fill, dtype=self.data.dtype)
        bigger[: len(self.data)] = self.data
        self.data = bigger

    def reset(self, slots: torch.Tensor) -> None:
        self.data[slots] = self.fill


@dataclass
class _History:
    """State of one temporal function of one rule: the last values it needs, and a count of
    tokens seen since the conversation (re)started."""

    values: _Table
    seen: _Table

    def tables(self) -> tuple[_Table, _Table]:
        return self.values, self.seen


@dataclass
class _Conversation:
    slot: int
    next_position: int


# --------------------------------------------------------------------------- wave layout


@dataclass
class _Wave:
    """Slices evaluated together, at most one per conversation, in a padded [S, L] layout."""

    slices: list[SequenceSlice]
    slots: torch.Tensor  # [S] int64
    lengths: torch.Tensor  # [S] int64
    width: int  # L, the longest slice
    total: int  # R, rows in this wave
    offsets: list[int]  # first wave row of each slice
    rows: torch.Tensor | None  # batch row of each wave row; None when it is the identity
    flat: torch.Tensor | None  # padded position of each wave row; None when S == 1

    def pad(self, x: torch.Tensor, fill: float | bool) -> torch.Tensor:
        """[..., R] -> [..., S, L]."""
        lead = x.shape[:-1]
        if self.flat is None:
            return x.reshape(*lead, 1, self.width)
        out = x.new_full((*lead, len(self.slices) * self.width), fill)
        out[..., self.flat] = x
        return out.reshape(*lead, len(self.slices), self.width)

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """[..., S, L] -> [..., R]."""
        flat = x.reshape(*x.shape[:-2], -1)
        return flat if self.flat is None else flat[..., self.flat]

    def gather(
        self, features: Mapping[str, torch.Tensor], names: set[str]
    ) -> dict[str, torch.Tensor]:
        out = {}
        for name in names:
            values = features[name].to(torch.float32)
            out[name] = values[: self.total] if self.rows is None else values[self.rows]
        return out


def _layout(slices: list[SequenceSlice], slots: list[int], batch_rows: int) -> _Wave:
    lengths = [s.rows for s in slices]
    offsets = [0]
    for n in lengths[:-1]:
        offsets.append(offsets[-1] + n)
    total = sum(lengths)
    width = max(lengths, default=0)
    identity = total == batch_rows and all(
        s.start_row == o for s, o in zip(slices, offsets, strict=True)
    )
    lengths_t = torch.tensor(lengths, dtype=torch.int64)
    flat = rows = None
    if len(slices) > 1 or not identity:
        local = torch.arange(total) - torch.repeat_interleave(torch.tensor(offsets), lengths_t)
        segment = torch.repeat_interleave(torch.arange(len(slices)), lengths_t)
        flat = segment * width + local if len(slices) > 1 else None
        if not identity:
            starts = torch.tensor([s.start_row for s in slices], dtype=torch.int64)
            rows = torch.repeat_interleave(starts, lengths_t) + local
    slots_t = torch.tensor(slots, dtype=torch.int64)
    return _Wave(slices, slots_t, lengths_t, width, total, offsets, rows, flat)


def _waves(sequences: Sequence[SequenceSlice]) -> list[list[SequenceSlice]]:
    """The k-th slice of each conversation goes to wave k, so state flows wave to wave."""
    waves: list[list[SequenceSlice]] = []
    count: dict[str, int] = {}
    for sl in sequences:
        k = count.get(sl.conversation_id, 0)
        count[sl.conversation_id] = k + 1
        if k == len(waves):
            waves.append([])
        waves[k].append(sl)
    return waves


# --------------------------------------------------------------------------- temporal kernels


def _window(ins: Instr) -> int:
    """Tokens of history a temporal function looks at (including the current one)."""
    if ins.kind == "cummax":
        return 1
    if ins.kind == "ewma":
        # Weights below 1e-4 of the newest are dropped: a finite window keeps ewma exactly
        # chunk-invariant, which a recursive update carried in float32 would not be.
        return min(MAX_WINDOW, int(ins.param[0] * 13.3) + 1)
    return int(ins.param[0]) + (1 if ins.kind == "delta" else 0)


_FILL = {"rolling_max": float("-inf"), "rolling_min": float("inf"), "cummax": float("-inf")}


def _apply_window(ins: Instr, ext: torch.Tensor, seen: torch.Tensor, width: int) -> torch.Tensor:
    """ext: [S, H + L] = carried history then this slice; returns [S, L]."""
    kind, n = ins.kind, _window(ins)
    count = (seen[:, None] + torch.arange(width) + 1).clamp(max=n)  # tokens in each window
    if kind == "delta":
        change = ext[:, n - 1 :] - ext[:, :width]
        return torch.where(count > n - 1, change, torch.zeros_like(change))
    windows = ext.unfold(1, n, 1)  # [S, L, n], oldest first
    if kind == "rolling_max":
        return windows.amax(-1)
    if kind == "rolling_min":
        return windows.amin(-1)
    if kind == "ewma":
        weights = 0.5 ** (torch.arange(n, dtype=torch.float64) / ins.param[0])
        total = (windows.double() * weights.flip(0)).sum(-1)
        return (total / weights.cumsum(0)[count - 1]).float()
    # Sums in float64 are exact for float32 inputs of similar magnitude, so the result does
    # not depend on where the window starts in the batch.
    total = windows.double().sum(-1)
    if kind == "rolling_mean":
        total = total / count
    return total.float()


# --------------------------------------------------------------------------- engine


class RuleEngine:
    """Evaluates a RuleSet batch after batch, keeping per-conversation state between batches."""

    def __init__(self, ruleset: RuleSet, max_conversations: int = 10000) -> None:
        if max_conversations < 1:
            raise ValueError("max_conversations must be at least 1")
        self._max = max_conversations
        self._capacity = min(_INITIAL_CAPACITY, max_conversations)
        self._conversations: OrderedDict[str, _Conversation] = OrderedDict()  # LRU order
        self._free: list[int] = []
        self._next_slot = 0
        self._lock = threading.Lock()
        self._temporal: dict[tuple[tuple[str, str, int], str], _History] = {}
        self._install(ruleset, previous=None)

    @property
    def tracked_conversations(self) -> int:
        return len(self._conversations)

    @property
    def ruleset(self) -> RuleSet:
        return self._ruleset

    def replace_rules(self, ruleset: RuleSet) -> None:
        """Swap rule sets atomically; rules with the same name, condition and ``for`` keep
        their run lengths and temporal state, so a reload neither re-fires nor forgets."""
        with self._lock:
            self._install(ruleset, previous=self._rules)

    def _install(self, ruleset: RuleSet, previous: list[Rule] | None) -> None:
        rules = ruleset.enabled_rules
        runs = _Table((len(rules),), 0, torch.int64, self._capacity)
        old = {rule.state_key: i for i, rule in enumerate(previous or [])}
        for j, rule in enumerate(rules):
            if rule.state_key in old:
                runs.data[:, j] = self._runs.data[:, old[rule.state_key]]
        keys = {rule.state_key for rule in rules}
        self._temporal = {k: v for k, v in self._temporal.items() if k[0] in keys}
        self._ruleset, self._rules, self._runs = ruleset, rules, runs
        self._for = torch.tensor([rule.for_tokens for rule in rules], dtype=torch.int64)
        self._required = ruleset.required_features
        self._rule_order = {rule.name: i for i, rule in enumerate(rules)}

    def evaluate(
        self, features: Mapping[str, torch.Tensor], sequences: Sequence[SequenceSlice]
    ) -> EvaluationResult:
        """Evaluate all enabled rules on one batch.

        ``features`` maps qualified feature names to float tensors ``[rows]`` covering the
        batch. Raises ValueError for a malformed batch before touching any state.
        """
        with self._lock:
            batch_rows = self._check(features, sequences)
            result = EvaluationResult()
            for wave in _waves(sequences):
                self._run_wave(features, wave, batch_rows, result)
            result.firings.sort(key=lambda f: (f.row, self._rule_order[f.rule]))
            return result

    # ----------------------------------------------------------------- validation

    def _check(
        self, features: Mapping[str, torch.Tensor], sequences: Sequence[SequenceSlice]
    ) -> int:
        spans = sorted((s.start_row, s.start_row + s.rows) for s in sequences)
        for s in sequences:
            if s.rows < 0 or s.start_row < 0 or s.position < 0:
                raise ValueError(
                    f"slice {s.conversation_id!r}: negative start_row, rows or position"
                )
        for (_, end), (start, _) in itertools.pairwise(spans):
            if start < end:
                raise ValueError("sequence slices overlap")
        batch_rows = spans[-1][1] if spans else 0
        for name in self._required:
            tensor = features.get(name)
            if tensor is None:
                raise ValueError(f"missing feature {name!r}")
            if tensor.dim() != 1 or tensor.shape[0] < batch_rows:
                raise ValueError(f"feature {name!r} must be a vector of at least {batch_rows} rows")
        for wave in _waves(sequences):
            if len(wave) > self._max:
                raise ValueError(f"batch has more than {self._max} conversations")
        return batch_rows

    # ----------------------------------------------------------------- conversations

    def _bind(self, slices: list[SequenceSlice], result: EvaluationResult) -> list[int]:
        """Slots for a wave's conversations, resetting state on gaps and new conversations."""
        for s in slices:  # touch first so that eviction never picks one of this wave's
            if s.conversation_id in self._conversations:
                self._conversations.move_to_end(s.conversation_id)
        slots, fresh = [], []
        for s in slices:
            conv = self._conversations.get(s.conversation_id)
            if conv is None:
                conv = self._allocate(s.conversation_id, result)
                fresh.append(conv.slot)
            elif conv.next_position != s.position:
                result.gaps += 1
                fresh.append(conv.slot)
            conv.next_position = s.position + s.rows
            slots.append(conv.slot)
        if fresh:
            index = torch.tensor(fresh, dtype=torch.int64)
            for table in self._tables():
                table.reset(index)
        return slots

    def _allocate(self, conversation_id: str, result: EvaluationResult) -> _Conversation:
        if len(self._conversations) >= self._max:
            _, evicted = self._conversations.popitem(last=False)
            self._free.append(evicted.slot)
            result.evicted += 1
        if self._free:
            slot = self._free.pop()
        else:
            slot = self._next_slot
            self._next_slot += 1
            if slot >= self._capacity:
                self._grow()
        conv = _Conversation(slot, 0)
        self._conversations[conversation_id] = conv
        return conv

    def _grow(self) -> None:
        self._capacity = min(self._capacity * 2, self._max)
        for table in self._tables():
            table.grow(self._capacity)

    def _tables(self) -> list[_Table]:
        return [self._runs, *(t for h in self._temporal.values() for t in h.tables())]

    # ----------------------------------------------------------------- evaluation

    def _run_wave(
        self,
        features: Mapping[str, torch.Tensor],
        slices: list[SequenceSlice],
        batch_rows: int,
        result: EvaluationResult,
    ) -> None:
        wave = _layout(slices, self._bind(slices, result), batch_rows)
        if wave.total and self._rules:
            inputs = wave.gather(features, self._required)
            conditions, values = [], []
            for rule in self._rules:

                def temporal(ins: Instr, x: torch.Tensor, key=rule.state_key) -> torch.Tensor:
                    return self._temporal_fn(key, wave, ins, x)

                condition, value = rule.condition.evaluate(inputs, wave.total, temporal)
                conditions.append(condition)
                values.append(value)
            fires = self._advance_runs(wave, torch.stack(conditions))
            self._collect(wave, fires, torch.stack(values), result)
        for s in slices:
            if s.end and s.conversation_id in self._conversations:
                self._free.append(self._conversations.pop(s.conversation_id).slot)

    def _role_mask(self, wave: _Wave) -> torch.Tensor:
        """[K, S]: whether each rule evaluates each slice's role."""
        roles = [s.role for s in wave.slices]
        masks: dict[tuple[str, ...], torch.Tensor] = {}
        for rule in self._rules:
            if rule.roles not in masks:
                allowed = set(rule.roles)
                masks[rule.roles] = torch.tensor([not allowed or r in allowed for r in roles])
        return torch.stack([masks[rule.roles] for rule in self._rules])

    def _advance_runs(self, wave: _Wave, conditions: torch.Tensor) -> torch.Tensor:
        """Run lengths with carry for all rules at once; returns where runs reach ``for``.

        The run length at token t is t minus the index of the last false token; that index
        is a cummax over "t where false", seeded with the carried run as a virtual false
        token before the slice.
        """
        held = wave.pad(conditions, False) & self._role_mask(wave)[:, :, None]  # [K, S, L]
        need = self._for[:, None, None]
        carry = self._runs.data[wave.slots].T  # [K, S]
        local = torch.arange(wave.width)
        last_false = torch.where(held, -(need + 2), local)
        seeded = torch.cat([(-1 - carry)[:, :, None], last_false], dim=2)
        runs = local - seeded.cummax(dim=2).values[:, :, 1:]
        last = (wave.lengths - 1).clamp(min=0).expand_as(carry)[:, :, None]
        # Clamped at N: a run already past N must not reach N again, and must not overflow.
        ended = torch.minimum(runs.gather(2, last)[:, :, 0], need[:, :, 0])
        self._runs.data[wave.slots] = torch.where(wave.lengths > 0, ended, carry).T
        return runs == need

    def _collect(
        self, wave: _Wave, fires: torch.Tensor, values: torch.Tensor, result: EvaluationResult
    ) -> None:
        hits = fires.nonzero()
        if not len(hits):
            return
        k, s, t = hits.unbind(1)
        offsets = torch.tensor(wave.offsets, dtype=torch.int64)
        fired_values = values[k, offsets[s] + t].tolist()
        for (ki, si, ti), value in zip(hits.tolist(), fired_values, strict=True):
            result.firings.append(_firing(self._rules[ki], wave.slices[si], ti, value))

    def _temporal_fn(
        self, key: tuple[str, str, int], wave: _Wave, ins: Instr, x: torch.Tensor
    ) -> torch.Tensor:
        history = self._history(key, ins)
        n = _window(ins)
        kept = n if ins.kind == "cummax" else n - 1
        fill = _FILL.get(ins.kind, 0.0)
        carried = history.values.data[wave.slots]  # [S, kept]
        seen = history.seen.data[wave.slots]
        padded = wave.pad(x.to(torch.float32).expand(wave.total), fill)
        ext = torch.cat([carried, padded], dim=1)
        if ins.kind == "cummax":
            ext = ext.cummax(dim=1).values
            out = ext[:, 1:]
        else:
            out = _apply_window(ins, ext, seen, wave.width)
        take = wave.lengths[:, None] + torch.arange(kept)  # the last `kept` values of ext
        history.values.data[wave.slots] = ext.gather(1, take)
        history.seen.data[wave.slots] = seen + wave.lengths
        return wave.unpad(out)

    def _history(self, key: tuple[str, str, int], ins: Instr) -> _History:
        state = self._temporal.get((key, ins.key))
        if state is None:
            kept = _window(ins) if ins.kind == "cummax" else _window(ins) - 1
            fill = _FILL.get(ins.kind, 0.0)
            state = _History(
                _Table((kept,), fill, torch.float32, self._capacity),
                _Table((), 0, torch.int64, self._capacity),
            )
            self._temporal[(key, ins.key)] = state
        return state


def _firing(rule: Rule, sl: SequenceSlice, offset: int, value: float) -> Firing:
    position = sl.position + offset
    fields = {
        "value": value,
        "position": position,
        "rule": rule.name,
        "conversation_id": sl.conversation_id,
        "request_id": sl.request_id,
        "category": rule.category,
        "severity": rule.severity,
        "start": position - rule.for_tokens + 1,
        "end": position,
    }
    return Firing(
        rule=rule.name,
        category=rule.category,
        severity=rule.severity,
        conversation_id=sl.conversation_id,
        request_id=sl.request_id,
        position=position,
        row=sl.start_row + offset,
        value=value,
        labels=dict(rule.labels),
        message=_render(rule.output, fields),
        actions=rule.actions,
    )


def _render(template: str, fields: dict[str, object]) -> str:
    try:
        return template.format_map(fields)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        # Templates are checked at load time; this only guards odd values (e.g. NaN widths).
        return (
            f"{fields['rule']} fired at token {fields['position']} of {fields['conversation_id']}"
            f" (value {fields['value']})"
        )
