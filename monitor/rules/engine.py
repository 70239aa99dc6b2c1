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

import functools
import itertools
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import torch

from monitor.limits import MAX_CONVERSATIONS
from monitor.rules.expressions import FUNCTIONS, MAX_WINDOW, Instr
from monitor.rules.model import SCOPES, Rule, RuleSet

_INITIAL_CAPACITY = 64
_NEVER = -(1 << 62)  # "last fired at" before any firing: far enough back for any cooldown
TemporalKey = tuple[str, str]  # (scope, expression digest)


_NO_ATTRIBUTES: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class SequenceSlice:
    """Rows ``[start_row, start_row + rows)`` of a batch are tokens ``position, position+1, ...``
    of one conversation. ``attributes`` (tenant, ...) are what rule exceptions match on,
    together with ``role`` and the batch's ``model``."""

    conversation_id: str
    start_row: int
    rows: int
    position: int
    role: str = ""
    end: bool = False
    request_id: str = ""
    attributes: Mapping[str, str] = field(default_factory=lambda: _NO_ATTRIBUTES, hash=False)


@dataclass(frozen=True)
class Firing:
    """One rule firing at one token: which rule, for which conversation and request, at which
    position (and batch row), with the value of its condition's feature expression, its rendered
    `output` message, labels, annotations and actions (`alert`, `audit`). The sidecar's
    `firings.py` turns it into the stream's Alert, the audit record and the Alertmanager alert.
    """

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
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass
class EvaluationResult:
    """What `RuleEngine.evaluate` found in one batch: the firings, in order, plus how many slices
    did not continue their conversation's positions (`gaps`) and how many conversations were
    evicted to stay under `max_conversations`.
    """

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
    """State of one temporal sub-expression: the last values it needs, and (for the functions
    that divide by how many tokens they have seen) a count since the conversation started.

    Keyed by (scope, expression digest), so rules computing the same thing share it."""

    values: _Table
    seen: _Table | None

    def tables(self) -> list[_Table]:
        return [self.values] if self.seen is None else [self.values, self.seen]


@dataclass
class _Conversation:
    slot: int
    next_position: int
    request_id: str = ""


# --------------------------------------------------------------------------- wave layout


@dataclass
class _Wave:
    """Slices evaluated together, at most one per conversation, in a padded [S, L] layout."""

    slices: list[SequenceSlice]
    slots: torch.Tensor  # [S] int64
    at: torch.Tensor | slice  # indexes the slots' state rows: a slice (a view) when consecutive
    lengths: torch.Tensor  # [S] int64
    width: int  # L, the longest slice
    total: int  # R, rows in this wave
    offsets: list[int]  # first wave row of each slice
    rows: torch.Tensor | None  # batch row of each wave row; None when it is the identity
    flat: torch.Tensor | None  # padded position of each wave row; None when no padding

    @property
    def uniform(self) -> bool:
        """Every slice has the same length (decode steps, single prefills): no padding."""
        return self.flat is None

    def pad(self, x: torch.Tensor, fill: float | bool) -> torch.Tensor:
        """[..., R] -> [..., S, L]."""
        lead = x.shape[:-1]
        if self.flat is None:
            return x.reshape(*lead, len(self.slices), self.width)
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
    uniform = all(n == width for n in lengths)
    if not uniform or not identity:
        local = torch.arange(total) - torch.repeat_interleave(torch.tensor(offsets), lengths_t)
        segment = torch.repeat_interleave(torch.arange(len(slices)), lengths_t)
        flat = None if uniform else segment * width + local
        if not identity:
            starts = torch.tensor([s.start_row for s in slices], dtype=torch.int64)
            rows = torch.repeat_interleave(starts, lengths_t) + local
    slots_t = torch.tensor(slots, dtype=torch.int64)
    # Conversations allocated together and batched in the same order (the steady decode
    # state) have consecutive slots: slicing state is cheaper than gathering and scattering.
    consecutive = bool(slots) and slots == list(range(slots[0], slots[0] + len(slots)))
    at = slice(slots[0], slots[0] + len(slots)) if consecutive else slots_t
    return _Wave(slices, slots_t, at, lengths_t, width, total, offsets, rows, flat)


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
_COUNTED = frozenset({"rolling_mean", "ewma", "delta"})  # need tokens-seen counts


def _apply_window(
    ins: Instr, ext: torch.Tensor, seen: torch.Tensor | None, width: int
) -> torch.Tensor:
    """ext: [S, H + L] = carried history then this slice; returns [S, L]."""
    kind, n = ins.kind, _window(ins)
    if kind == "rolling_max":
        return ext.unfold(1, n, 1).amax(-1)
    if kind == "rolling_min":
        return ext.unfold(1, n, 1).amin(-1)
    if kind == "delta":
        assert seen is not None
        change = ext[:, n - 1 :] - ext[:, :width]
        return torch.where(seen[:, None] + torch.arange(width) >= n, change, 0.0)
    # Sums in float64 are exact for float32 inputs of similar magnitude, so the result does
    # not depend on where the window starts in the batch. The unfolded windows are a view of
    # one float64 copy: each window is still summed on its own, in the same order.
    windows = ext.double().unfold(1, n, 1)  # [S, L, n], oldest first
    if kind in ("rolling_sum", "count_over"):
        return windows.sum(-1).float()
    assert seen is not None
    count = (seen[:, None] + torch.arange(width) + 1).clamp(max=n)  # tokens in each window
    if kind == "ewma":
        weights, totals = _ewma_weights(n, float(ins.param[0]))
        return ((windows * weights).sum(-1) / totals[count - 1]).float()
    return (windows.sum(-1) / count).float()


@functools.lru_cache(maxsize=256)
def _ewma_weights(n: int, halflife: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights oldest-first for a window of n, and their sums over the newest k tokens."""
    weights = 0.5 ** (torch.arange(n, dtype=torch.float64) / halflife)
    return weights.flip(0), weights.cumsum(0)


# --------------------------------------------------------------------------- who is evaluated


class _MaskCache:
    """[K, S] masks of which rules evaluate which slices (roles and exceptions).

    Only the attributes some rule looks at form a slice's signature, and masks are cached per
    signature, so a decode step costs a dict lookup or two per slice, not a rule loop.
    """

    _LIMIT = 4096  # distinct signatures kept; cleared when exceeded (tenants are unbounded)

    def __init__(self, rules: list[Rule]) -> None:
        self.rules = rules
        keys = {"role"} if any(rule.roles for rule in rules) else set()
        for rule in rules:
            keys.update(key for exc in rule.exceptions for key, _ in exc.attributes)
        self.enabled = bool(keys)
        self.uses_model = "model" in keys
        self.plain = tuple(sorted(keys - {"role", "model"}))
        self.cache: dict[_Signature, torch.Tensor] = {}

    def active(self, slices: list[SequenceSlice], model: str) -> torch.Tensor | None:
        if not self.enabled:
            return None
        # Slices often share one attributes object (or the empty default): look those up once.
        seen: dict[tuple[str, int], torch.Tensor] = {}
        columns = []
        for sl in slices:
            ident = (sl.role, id(sl.attributes))
            column = seen.get(ident)
            if column is None:
                column = seen[ident] = self.column(self.signature(sl, model))
            columns.append(column)
        if all(c is columns[0] for c in columns):
            return columns[0][:, None].expand(len(self.rules), len(slices))
        return torch.stack(columns, dim=1)

    def signature(self, sl: SequenceSlice, model: str) -> _Signature:
        attributes = sl.attributes
        plain = tuple(map(attributes.get, self.plain))
        # The batch's model unless the slice names its own.
        own_model = (attributes.get("model") or model or None) if self.uses_model else None
        return (sl.role, own_model, plain)

    def column(self, signature: _Signature) -> torch.Tensor:
        column = self.cache.get(signature)
        if column is None:
            if len(self.cache) >= self._LIMIT:
                self.cache.clear()
            role, model, plain = signature
            attributes = {k: v for k, v in zip(self.plain, plain, strict=True) if v is not None}
            attributes["role"] = role
            if model is not None:
                attributes["model"] = model
            column = torch.tensor([rule.applies_to(attributes) for rule in self.rules])
            self.cache[signature] = column
        return column


_Signature = tuple[str, str | None, tuple[str | None, ...]]


# --------------------------------------------------------------------------- engine


class RuleEngine:
    """Evaluates a RuleSet batch after batch, keeping per-conversation state between batches
    (rolling windows, sustained counts, cooldowns) for at most `max_conversations`
    conversations, the least recently seen evicted first.

        from monitor.rules import RuleEngine, SequenceSlice, load_rules

        engine = RuleEngine(load_rules(["rules/deception.yaml"]))
        result = engine.evaluate(
            {"deception/lying": torch.tensor([0.1, 2.5, 3.0])},   # one value per token row
            [SequenceSlice("conv-42", start_row=0, rows=3, position=0)],
            model="llama-3-8b",
        )
        for firing in result.firings:
            print(firing.rule, firing.conversation_id, firing.position, firing.value)
    """

    def __init__(self, ruleset: RuleSet, max_conversations: int = MAX_CONVERSATIONS) -> None:
        if max_conversations < 1:
            raise ValueError("max_conversations must be at least 1")
        self._max = max_conversations
        self._capacity = min(_INITIAL_CAPACITY, max_conversations)
        self._conversations: OrderedDict[str, _Conversation] = OrderedDict()  # LRU order
        self._free: list[int] = []
        self._next_slot = 0
        self._lock = threading.Lock()
        self._temporal: dict[TemporalKey, _History] = {}
        self._install(ruleset, previous=None)

    @property
    def tracked_conversations(self) -> int:
        """Conversations whose state is kept now (at most `max_conversations`)."""
        return len(self._conversations)

    @property
    def ruleset(self) -> RuleSet:
        """The rule set being evaluated (the last one given to `replace_rules`)."""
        return self._ruleset

    def replace_rules(self, ruleset: RuleSet) -> None:
        """Swap rule sets atomically; rules with the same name, condition and ``for`` keep
        their run lengths and temporal state, so a reload neither re-fires nor forgets."""
        with self._lock:
            self._install(ruleset, previous=self._rules)

    def _install(self, ruleset: RuleSet, previous: list[Rule] | None) -> None:
        rules = ruleset.enabled_rules
        runs = _Table((len(rules),), 0, torch.int64, self._capacity)
        fired = _Table((len(rules),), _NEVER, torch.int64, self._capacity)
        old = {rule.state_key: i for i, rule in enumerate(previous or [])}
        for j, rule in enumerate(rules):
            if rule.state_key in old:
                runs.data[:, j] = self._runs.data[:, old[rule.state_key]]
                fired.data[:, j] = self._fired.data[:, old[rule.state_key]]
        used = {
            (rule.scope, ins.key)
            for rule in rules
            for ins in rule.condition.program
            if ins.kind in FUNCTIONS and FUNCTIONS[ins.kind].temporal
        }
        self._temporal = {k: v for k, v in self._temporal.items() if k in used}
        self._ruleset, self._rules, self._runs, self._fired = ruleset, rules, runs, fired
        self._for = torch.tensor([rule.for_tokens for rule in rules], dtype=torch.int64)
        self._required = ruleset.required_features
        self._rule_order = {rule.name: i for i, rule in enumerate(rules)}
        self._request_rules = torch.tensor(
            [j for j, rule in enumerate(rules) if rule.scope == "request"], dtype=torch.int64
        )
        self._masks = _MaskCache(rules)

    def evaluate(
        self,
        features: Mapping[str, torch.Tensor],
        sequences: Sequence[SequenceSlice],
        *,
        model: str = "",
    ) -> EvaluationResult:
        """Evaluate all enabled rules on one batch.

        ``features`` maps qualified feature names to float tensors ``[rows]`` covering the
        batch; ``model`` names the model that produced it (an attribute exceptions can match).
        Raises ValueError for a malformed batch before touching any state.
        """
        with self._lock:
            waves = _waves(sequences)
            batch_rows = self._check(features, sequences, waves)
            result = EvaluationResult()
            for wave in waves:
                self._run_wave(features, wave, batch_rows, result, model)
            result.firings.sort(key=lambda f: (f.row, self._rule_order[f.rule]))
            return result

    # ----------------------------------------------------------------- validation

    def _check(
        self,
        features: Mapping[str, torch.Tensor],
        sequences: Sequence[SequenceSlice],
        waves: list[list[SequenceSlice]],
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
        for wave in waves:
            if len(wave) > self._max:
                raise ValueError(f"batch has more than {self._max} conversations")
        return batch_rows

    # ----------------------------------------------------------------- conversations

    def _bind(self, slices: list[SequenceSlice], result: EvaluationResult) -> list[int]:
        """Slots for a wave's conversations, resetting state on gaps and new conversations."""
        for s in slices:  # touch first so that eviction never picks one of this wave's
            if s.conversation_id in self._conversations:
                self._conversations.move_to_end(s.conversation_id)
        slots, fresh, new_request = [], [], []
        for s in slices:
            conv = self._conversations.get(s.conversation_id)
            if conv is None:
                conv = self._allocate(s.conversation_id, result)
                fresh.append(conv.slot)
            elif conv.next_position != s.position:
                result.gaps += 1
                fresh.append(conv.slot)
            elif conv.request_id != s.request_id:
                new_request.append(conv.slot)
            conv.next_position = s.position + s.rows
            conv.request_id = s.request_id
            slots.append(conv.slot)
        if fresh:
            index = torch.tensor(fresh, dtype=torch.int64)
            for table in self._tables():
                table.reset(index)
        if new_request and len(self._request_rules):
            self._reset_request_state(torch.tensor(new_request, dtype=torch.int64))
        return slots

    def _reset_request_state(self, slots: torch.Tensor) -> None:
        """A new request in a conversation: rules with ``scope: request`` start afresh."""
        columns = self._request_rules
        for table in (self._runs, self._fired):
            table.data[slots[:, None], columns] = table.fill
        for (scope, _), history in self._temporal.items():
            if scope == "request":
                for table in history.tables():
                    table.reset(slots)

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
        conv = _Conversation(slot, 0, "")
        self._conversations[conversation_id] = conv
        return conv

    def _grow(self) -> None:
        self._capacity = min(self._capacity * 2, self._max)
        for table in self._tables():
            table.grow(self._capacity)

    def _tables(self) -> list[_Table]:
        tables = [self._runs, self._fired]
        return tables + [t for h in self._temporal.values() for t in h.tables()]

    # ----------------------------------------------------------------- evaluation

    def _run_wave(
        self,
        features: Mapping[str, torch.Tensor],
        slices: list[SequenceSlice],
        batch_rows: int,
        result: EvaluationResult,
        model: str,
    ) -> None:
        wave = _layout(slices, self._bind(slices, result), batch_rows)
        if wave.total and self._rules:
            inputs = wave.gather(features, self._required)
            conditions, values = [], []
            temporal = _WaveTemporal(self, wave)
            for rule in self._rules:
                condition, value = rule.condition.evaluate(
                    inputs, wave.total, temporal.for_scope(rule.scope)
                )
                conditions.append(condition)
                values.append(value)
            active = self._masks.active(wave.slices, model)
            fires = self._advance_runs(wave, torch.stack(conditions), active)
            self._collect(wave, fires, torch.stack(values), result)
        for s in slices:
            if s.end and s.conversation_id in self._conversations:
                self._free.append(self._conversations.pop(s.conversation_id).slot)

    def _advance_runs(
        self, wave: _Wave, conditions: torch.Tensor, active: torch.Tensor | None
    ) -> torch.Tensor:
        """Run lengths with carry for all rules at once; returns where runs reach ``for``.

        The run length at token t is t minus the index of the last false token; that index
        is a cummax over "t where false", seeded with the carried run as a virtual false
        token before the slice.
        """
        held = wave.pad(conditions, False)  # [K, S, L]
        if active is not None:  # a rule skipped for a slice (role, exception) breaks its run
            held = held & active[:, :, None]
        need = self._for[:, None, None]
        carry = self._runs.data[wave.at].T  # [K, S]
        local = torch.arange(wave.width)
        last_false = torch.where(held, -(need + 2), local)
        seeded = torch.cat([(-1 - carry)[:, :, None], last_false], dim=2)
        runs = local - seeded.cummax(dim=2).values[:, :, 1:]
        last = (wave.lengths - 1).clamp(min=0).expand_as(carry)[:, :, None]
        # Clamped at N: a run already past N must not reach N again, and must not overflow.
        ended = torch.minimum(runs.gather(2, last)[:, :, 0], need[:, :, 0])
        self._runs.data[wave.at] = torch.where(wave.lengths > 0, ended, carry).T
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
        slots = wave.slots.tolist()
        # Hits come sorted by (rule, slice, token), so a cooldown sees its own firings in order.
        for (ki, si, ti), value in zip(hits.tolist(), fired_values, strict=True):
            rule, sl = self._rules[ki], wave.slices[si]
            position = sl.position + ti
            if rule.cooldown_tokens:
                last = int(self._fired.data[slots[si], ki])
                if position - last < rule.cooldown_tokens:
                    continue
            self._fired.data[slots[si], ki] = position
            result.firings.append(_firing(rule, sl, ti, value))

    def _temporal_fn(
        self, key: TemporalKey, wave: _Wave, ins: Instr, x: torch.Tensor
    ) -> torch.Tensor:
        history = self._history(key, ins)
        kept = history.values.data.shape[1]
        carried = history.values.data[wave.at]  # [S, kept]
        padded = wave.pad(x.to(torch.float32).expand(wave.total), _FILL.get(ins.kind, 0.0))
        ext = torch.cat([carried, padded], dim=1)
        seen = None if history.seen is None else history.seen.data[wave.at]
        if ins.kind == "cummax":
            ext = ext.cummax(dim=1).values
            out = ext[:, 1:]
        else:
            out = _apply_window(ins, ext, seen, wave.width)
        if wave.uniform:  # every slice ends at the last column
            history.values.data[wave.at] = ext[:, ext.shape[1] - kept :]
        else:
            take = wave.lengths[:, None] + torch.arange(kept)  # the last `kept` values of ext
            history.values.data[wave.at] = ext.gather(1, take)
        if history.seen is not None and seen is not None:
            history.seen.data[wave.at] = seen + wave.lengths
        return wave.unpad(out)

    def _history(self, key: TemporalKey, ins: Instr) -> _History:
        state = self._temporal.get(key)
        if state is None:
            kept = _window(ins) if ins.kind == "cummax" else _window(ins) - 1
            fill = _FILL.get(ins.kind, 0.0)
            seen = _Table((), 0, torch.int64, self._capacity) if ins.kind in _COUNTED else None
            state = _History(_Table((kept,), fill, torch.float32, self._capacity), seen)
            self._temporal[key] = state
        return state


class _WaveTemporal:
    """Temporal functions for one wave: each (scope, expression) is computed, and its state
    advanced, once per wave however many rules use it."""

    def __init__(self, engine: RuleEngine, wave: _Wave) -> None:
        self.engine = engine
        self.wave = wave
        self.results: dict[TemporalKey, torch.Tensor] = {}
        self.fns = {scope: functools.partial(self.compute, scope) for scope in SCOPES}

    def for_scope(self, scope: str) -> Callable[[Instr, torch.Tensor], torch.Tensor]:
        return self.fns[scope]

    def compute(self, scope: str, ins: Instr, x: torch.Tensor) -> torch.Tensor:
        key = (scope, ins.key)
        out = self.results.get(key)
        if out is None:
            out = self.results[key] = self.engine._temporal_fn(key, self.wave, ins, x)
        return out


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
        annotations={name: _render(text, fields) for name, text in rule.annotations.items()},
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
