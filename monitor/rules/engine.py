"""Stateful, vectorised rule evaluation over batches of tokens from many conversations.

A batch is split into *waves* so that each conversation appears at most once per wave (the
usual case is one wave). Within a wave every slice is laid out as one row of a padded
``[slices, longest slice]`` matrix; per-conversation state lives in arrays indexed by a slot
number: run lengths and last firings ``[slots, rules]``, and the state of every temporal
function in one history array ``[slots, columns]`` (``program.TemporalSlot`` says whose
columns are whose). The rule set is compiled into one program (``program.py``) over all rules;
run lengths for ``for: N`` are a handful of numpy ops over ``[rules, slices, tokens]``. Python
loops only run per slice, per merged instruction and per firing, never per token or per rule.
numpy rather than torch: a decode step's vectors are ~64 values, where the cost is per call.

Chunking invariance: every quantity is a function of the conversation's own token stream
(carried state + this slice), computed with order-independent arithmetic (max, exact small
integer counts, float64 window sums rounded once), so any split of a conversation into
batches gives the same firings at the same positions. The one limit: a float64 sum of float32
values is exact, hence order-independent, while the window's values lie within about 2**29 of
each other in magnitude (and ewma's weighted products are rounded); past that, a decode step
(summed by ``_StepKernel``) and a prefill (``_apply_window``) can differ in the last bit. A
decode step of a rolling sum, mean or count restricted to some roles (``window_roles``) moves
an exact running sum of its window instead (``_WaveTemporal._step_masked_sum``): the same
values where those sums are exact, and beyond them the exactly rounded ones while its values lie
within about 2**100 of each other.
"""

from __future__ import annotations

import functools
import itertools
import math
import operator
import threading
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NamedTuple

import numpy as np
import torch

from monitor.limits import MAX_CONVERSATIONS
from monitor.rules.conversations import Conversation, ConversationTable
from monitor.rules.model import Rule, RuleSet
from monitor.rules.program import SUMS, TemporalSlot, compile_rules

_INITIAL_CAPACITY = 64
# Waves of at most this many rows run a ``StepPlan`` of the program kept for their row count.
_PLAN_ROWS = 256
_NEVER = -(1 << 62)  # "last fired at" before any firing: far enough back for any cooldown


_NO_ATTRIBUTES: Mapping[str, str] = MappingProxyType({})
_FLOAT32 = np.dtype(np.float32)


class SequenceSlice(NamedTuple):
    """Rows ``[start_row, start_row + rows)`` of a batch are tokens ``position, position+1, ...``
    of one conversation. ``attributes`` (tenant, ...) are what rule exceptions match on,
    together with ``role`` and the batch's ``model``. ``scope`` (a client identity or a
    tenant; empty: one namespace) keeps conversations of the same id apart: state belongs to
    ``(scope, conversation_id)``. ``turn_end``: the slice's last row ends a turn of its role
    (rules with ``at: turn_end`` are checked only at such rows; ``end`` implies it). A slice
    without rows that carries ``turn_end`` or ``end`` marks the turn end at the conversation's
    last evaluated token instead (servers learn that an answer finished after its last token
    was sent); it takes no part in a request (its ``request_id`` and ``role`` are not read).

    A named tuple: a sidecar builds one per sequence per message, and a tuple is built
    several times faster than a frozen dataclass (the decode path builds 64 per step)."""

    conversation_id: str
    start_row: int
    rows: int
    position: int
    role: str = ""
    end: bool = False
    request_id: str = ""
    attributes: Mapping[str, str] = _NO_ATTRIBUTES
    scope: str = ""
    turn_end: bool = False


def state_key(sl: SequenceSlice) -> Hashable:
    """The key rule state is kept under: the id alone in the shared namespace."""
    return (sl.scope, sl.conversation_id) if sl.scope else sl.conversation_id


@dataclass(frozen=True)
class Firing:
    """One rule firing at one token: which rule, for which conversation and request, at which
    position (and batch row), with the value of its condition's feature expression, its rendered
    `output` message, labels, annotations and actions (`alert`, `audit`). The sidecar's
    `firings.py` turns it into the stream's Alert, the audit record and the Alertmanager alert.

    `row` is the batch row of the token at `position`, except for a firing with `in_batch`
    False: an `at: turn_end` rule fired by a slice without rows (`SequenceSlice`), at the
    conversation's last evaluated token, which came in an earlier batch. `row` is then that
    slice's `start_row`, which holds none of the token's values (it may even be past the
    batch's last row). `scope` is the slice's (`SequenceSlice.scope`).
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
    scope: str = ""
    in_batch: bool = True


@dataclass
class EvaluationResult:
    """What `RuleEngine.evaluate` found in one batch: the firings, in order, plus how many slices
    did not continue their conversation's positions (`gaps`) and how many conversations were
    evicted to stay under `max_conversations`.
    """

    firings: list[Firing] = field(default_factory=list)
    gaps: int = 0  # slices whose position did not continue their conversation
    evicted: int = 0  # conversations dropped to stay under max_conversations


# --------------------------------------------------------------------------- state arrays


# The largest rule history a full-table wave double-buffers (``_WaveTemporal``): 64
# conversations of a 512-token window are 132 KiB; 4 MiB bounds the extra memory the spare
# array holds beyond ``max_rule_state_bytes``.
_SPARE_HISTORY_MAX_BYTES = 4 << 20


class _Table:
    """One row of state per conversation slot, ``width`` columns each with its own initial
    value; grows by doubling up to the conversation cap."""

    def __init__(self, width: int, fill: object, dtype: type, capacity: int) -> None:
        self.fill = np.broadcast_to(np.asarray(fill, dtype=dtype), (width,)).copy()
        self.data = np.tile(self.fill, (capacity, 1))
        # An array of data's shape whose contents do not matter (``_WaveTemporal``), or None.
        self.spare: np.ndarray | None = None

    def grow(self, capacity: int) -> None:
        bigger = np.tile(self.fill, (capacity, 1))
        bigger[: len(self.data)] = self.data
        self.data = bigger
        self.spare = None  # the old shape's: never used again

    def reset(self, slots: np.ndarray) -> None:
        self.data[slots] = self.fill

    def reset_columns(self, slots: np.ndarray, columns: np.ndarray) -> None:
        self.data[np.ix_(slots, columns)] = self.fill[columns]


# --------------------------------------------------------------------------- wave layout


@dataclass
class _Wave:
    """Slices evaluated together, at most one per conversation, in a padded [S, L] layout."""

    slices: list[SequenceSlice]
    slots: np.ndarray  # [S] int64
    at: np.ndarray | slice  # indexes the slots' state rows: a slice (a view) when consecutive
    lengths: np.ndarray  # [S] int64
    width: int  # L, the longest slice
    total: int  # R, rows in this wave
    offsets: np.ndarray  # [S] first wave row of each slice
    rows: np.ndarray | None  # batch row of each wave row; None when it is the identity
    flat: np.ndarray | None  # padded position of each wave row; None when no padding

    @property
    def uniform(self) -> bool:
        """Every slice has the same length (decode steps, single prefills): no padding."""
        return self.flat is None

    def pad(self, x: np.ndarray, fill: float | bool) -> np.ndarray:
        """[..., R] -> [..., S, L]."""
        lead = x.shape[:-1]
        if self.flat is None:
            return x.reshape(*lead, len(self.slices), self.width)
        out = np.full((*lead, len(self.slices) * self.width), fill, dtype=x.dtype)
        out[..., self.flat] = x
        return out.reshape(*lead, len(self.slices), self.width)

    def unpad(self, x: np.ndarray) -> np.ndarray:
        """[..., S, L] -> [..., R]."""
        flat = x.reshape(*x.shape[:-2], -1)
        return flat if self.flat is None else flat[..., self.flat]

    def gather(
        self,
        features: Mapping[str, torch.Tensor | np.ndarray],
        names: list[str],
        out: np.ndarray,
        columns: np.ndarray | None = None,
    ) -> None:
        """Row ``i`` of ``out`` = this wave's rows of feature ``names[i]``; ``columns`` are
        the block's columns of ``names`` when ``features`` is a ``FeatureBlock`` (computed
        here when not given)."""
        total, rows = self.total, self.rows
        if isinstance(features, FeatureBlock) and names:
            # One gather for all features instead of one call per feature.
            if columns is None:
                columns = features.columns(names)
            if rows is None:
                # The method, not np.take (a Python wrapper), along the block's rows (taking
                # along the first axis of the transpose is 5x slower), into the registers'
                # transpose: one call. "clip" skips the bounds checks' buffering: the columns
                # are the block's own (``FeatureBlock.columns``).
                block = features.block
                if len(block) != total:
                    block = block[:total]
                block.take(columns, 1, out[: len(names)].T, "clip")
            else:
                # Pick rows and the rules' columns in one step: `block[rows]` first would copy
                # every column of a wide pack (65,536 SAE features x 4,096 rows is 1 GiB).
                out[: len(names)] = features.block[np.asarray(rows)[:, None], columns].T
            return
        for i, name in enumerate(names):
            values = _as_array(features[name])
            if rows is None:
                out[i] = values[:total]
            else:
                np.take(values, rows, out=out[i])


class FeatureBlock(Mapping[str, np.ndarray]):
    """Feature values that are columns of one ``[rows, k]`` float32 array (one pack's encode
    of one hook point): a mapping of name to column view, as ``RuleEngine.evaluate`` takes,
    from which the engine gathers all the features it reads with one call.

    ``index`` (name -> column) must not change once given: blocks of successive batches
    usually share one, and the engine keeps the columns it looked up in the last one it saw
    (compared by identity)."""

    def __init__(self, block: np.ndarray, index: Mapping[str, int]) -> None:
        if block.ndim != 2:
            raise ValueError("a feature block is a [rows, features] array")
        # An encode's block is float32 already: no call to say so (``astype`` is one).
        self.block = block if block.dtype is _FLOAT32 else block.astype(np.float32)
        self.index = index  # name -> column

    def __getitem__(self, name: str) -> np.ndarray:
        return self.block[:, self.index[name]]

    def __iter__(self) -> Iterator[str]:
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, name: object) -> bool:
        return name in self.index

    def get(self, name: str, default: object = None) -> np.ndarray | None:  # type: ignore[override]
        column = self.index.get(name)
        return default if column is None else self.block[:, column]  # type: ignore[return-value]

    def columns(self, names: Sequence[str]) -> np.ndarray:
        """The columns of ``names``, in order."""
        return np.fromiter(map(self.index.__getitem__, names), np.intp, len(names))


def _as_array(values: torch.Tensor | np.ndarray) -> np.ndarray:
    """A float32 numpy view of a feature column (a copy only when it is not one already)."""
    if isinstance(values, np.ndarray):
        return values.astype(np.float32, copy=False)
    if values.dtype is torch.float32:
        try:
            return values.numpy()  # a view: the usual case, a CPU tensor
        except (RuntimeError, TypeError):  # on a GPU, or needs grad
            pass
    return values.detach().to("cpu", torch.float32).numpy()


def _slot_arrays(slots: list[int]) -> tuple[np.ndarray, np.ndarray | slice]:
    """A wave's slots as an array (read-only), and what indexes their state rows."""
    count = len(slots)
    first = slots[0] if slots else 0
    # Conversations allocated together and batched in the same order (the steady decode
    # state) have consecutive slots: slicing state is cheaper than gathering and scattering.
    consecutive = bool(slots) and slots == list(range(first, first + count))
    slots_a = np.array(slots, dtype=np.int64)
    slots_a.flags.writeable = False  # kept for the next wave of the same slots
    return slots_a, slice(first, first + count) if consecutive else slots_a


def _layout(
    slices: list[SequenceSlice],
    slots: tuple[np.ndarray, np.ndarray | slice],
    batch_rows: int,
    lengths_l: list[int] | None = None,
    starts_l: list[int] | None = None,
) -> _Wave:
    """The wave's layout; ``slots`` from ``_slot_arrays``; ``lengths_l``/``starts_l`` the
    slices' ``rows`` and ``start_row`` when the caller has them already."""
    count = len(slices)
    slots_a, at = slots
    if lengths_l is None or starts_l is None:
        lengths_l = list(map(_ROWS, slices))
        starts_l = list(map(_START_ROW, slices))
    if batch_rows == count and lengths_l.count(1) == count and starts_l == _range_list(count):
        # A decode step: one row per slice, in batch order.
        ones, offsets = _decode_layout(count)
        return _Wave(slices, slots_a, at, ones, 1, count, offsets, None, None)
    lengths = np.array(lengths_l, dtype=np.int64)
    starts = np.array(starts_l, dtype=np.int64)
    ends = np.cumsum(lengths)
    offsets = ends - lengths
    total = int(ends[-1]) if count else 0
    width = int(lengths.max()) if count else 0
    identity = total == batch_rows and starts_l == offsets.tolist()
    uniform = lengths_l.count(width) == count
    flat = rows = None
    if not uniform or not identity:
        segment = np.repeat(np.arange(count), lengths)
        local = np.arange(total) - offsets[segment]
        flat = None if uniform else segment * width + local
        if not identity:
            rows = starts[segment] + local
    return _Wave(slices, slots_a, at, lengths, width, total, offsets, rows, flat)


@functools.lru_cache(maxsize=64)
def _range_list(count: int) -> list[int]:
    """``list(range(count))``, shared: only compared with, never changed."""
    return list(range(count))


@functools.lru_cache(maxsize=64)
def _decode_layout(count: int) -> tuple[np.ndarray, np.ndarray]:
    """Lengths (all 1) and offsets (0, 1, ...) of a decode step's slices; read-only."""
    ones, offsets = np.ones(count, dtype=np.int64), np.arange(count, dtype=np.int64)
    ones.flags.writeable = offsets.flags.writeable = False
    return ones, offsets


def _keys(slices: Sequence[SequenceSlice]) -> list[Hashable]:
    """``state_key`` of each slice (without a call per slice when nothing is scoped)."""
    if any(map(_SCOPE, slices)):
        return list(map(state_key, slices))
    return list(map(_CONVERSATION_ID, slices))


_START_ROW = operator.attrgetter("start_row")
_ROWS = operator.attrgetter("rows")
_POSITION = operator.attrgetter("position")
_SCOPE = operator.attrgetter("scope")
_CONVERSATION_ID = operator.attrgetter("conversation_id")
_REQUEST_ID = operator.attrgetter("request_id")
_END = operator.attrgetter("end")
_TURN_END = operator.attrgetter("turn_end")
# The reductions themselves: ``ndarray.any()`` and its kind go through a Python wrapper,
# which costs as much as the reduction on a decode step's small arrays.
_ANY = np.logical_or.reduce
_ALL = np.logical_and.reduce
_MIN = np.minimum.reduce
_MAX = np.maximum.reduce
_SUM = np.add.reduce
_ROLE = operator.attrgetter("role")
_ATTRIBUTES = operator.attrgetter("attributes")


def _waves(
    sequences: Sequence[SequenceSlice], keys: list[Hashable] | None = None
) -> list[tuple[list[SequenceSlice], list[Hashable]]]:
    """The k-th slice of each conversation goes to wave k, so state flows wave to wave; each
    wave with the ``state_key`` of its slices (``keys``, when the caller has them)."""
    if keys is None:
        keys = _keys(sequences)
    if len(set(keys)) == len(sequences):
        return [(list(sequences), keys)] if sequences else []  # the usual case: one wave
    waves: list[tuple[list[SequenceSlice], list[Hashable]]] = []
    count: dict[Hashable, int] = {}
    for sl, key in zip(sequences, keys, strict=True):
        k = count.get(key, 0)
        count[key] = k + 1
        if k == len(waves):
            waves.append(([], []))
        waves[k][0].append(sl)
        waves[k][1].append(key)
    return waves


# --------------------------------------------------------------------------- temporal kernels


def _window_reduce(ext: np.ndarray, n: int, width: int, op: np.ufunc) -> np.ndarray:
    """[S, n - 1 + L] -> [S, L]: ``op`` (np.maximum or np.minimum) over each window of n.

    By doubling: blocks of 1, 2, 4, ... values, each one elementwise call over the whole
    array from the previous size, then a window is two overlapping blocks. log2(n) contiguous
    calls instead of a reduction over a strided [S, L, n] view (several times slower on a
    long prefill). Both propagate NaN, and max/min are exact, so the result is identical."""
    block, size = ext, 1
    while size * 2 <= n:
        block = op(block[:, :-size], block[:, size:])
        size *= 2
    if size == n:
        return block[:, :width]
    return op(block[:, :width], block[:, n - size : n - size + width])


def _window_sum(ext: np.ndarray, n: int, width: int) -> np.ndarray:
    """[S, n - 1 + L] float64 -> [S, L]: the sum of each window of n, by doubling.

    Blocks of 2**j values are sums of two blocks of 2**(j-1); a window of n is the sum of
    the blocks of n's binary digits, laid end to end (smallest first). Each block is a sum of
    the window's float32 values in float64, exact while they lie within about 2**29 of each
    other in magnitude, so the result equals any other order of summation (the decode step's
    matrix product, the previous reduction); beyond that it is still the same for every
    batching, since every window is summed the same way whatever its position."""
    out: np.ndarray | None = None
    block, size, position = ext, 1, 0
    while True:
        if n & size:
            part = block[:, position : position + width]
            out = part.copy() if out is None else np.add(out, part, out=out)
            position += size
        if size * 2 > n:
            break
        block = block[:, :-size] + block[:, size:]
        size *= 2
    assert out is not None
    return out


def _apply_window(slot: TemporalSlot, ext: np.ndarray, seen: np.ndarray | None, width: int):
    """ext: [S, H + L] float32 = carried history then this slice; returns [S, L] float32."""
    kind, n = slot.kind, slot.window
    if kind == "rolling_max":
        return _window_reduce(ext, n, width, np.maximum)
    if kind == "rolling_min":
        return _window_reduce(ext, n, width, np.minimum)
    if kind == "delta":
        assert seen is not None
        change = ext[:, n - 1 :] - ext[:, :width]
        # n = k + 1 columns: x[t - k] exists once k = n - 1 tokens came before this one.
        return np.where(seen[:, None] + np.arange(width) >= n - 1, change, np.float32(0.0))
    # Sums in float64 of float32 inputs are exact (so independent of the order of addition,
    # hence of how the tokens were batched) while a window's values are within about 2**29 of
    # each other in magnitude; ewma's weighted products are rounded, so its sums can differ
    # in the last bit between batchings (``_StepKernel`` sums a decode step differently).
    divisors = None
    if kind == "ewma":
        weights, divisors = _ewma_weights(n, float(slot.param[0]))
        sums = _weighted_sums(ext.astype(np.float64), n, width, weights)
    else:
        sums = _window_sum(ext.astype(np.float64), n, width)  # [S, L]
    if kind in ("rolling_sum", "count_over"):
        return sums.astype(np.float32)
    assert seen is not None
    count = np.minimum(seen[:, None] + np.arange(width) + 1, n)  # tokens in each window
    if divisors is not None:
        return (sums / divisors[count - 1]).astype(np.float32)
    return (sums / count).astype(np.float32)


# Window sums of few, long rows are one BLAS correlation per row; of many short rows, the
# weighted products are made in blocks of at most this many values (32 MiB of float64).
_SUM_BLOCK = 1 << 22
_CORRELATE_ROWS = 4


def _weighted_sums(ext: np.ndarray, n: int, width: int, weights: np.ndarray) -> np.ndarray:
    """[S, n - 1 + L] float64 -> [S, L]: each window's weighted sum (weights oldest first).

    A prefill's few long rows: ``np.correlate`` per row (a dot product per window, several
    times faster than weighting a strided [S, L, n] view). Many short rows (a batch of small
    slices): the weighted view, in blocks so a long ewma stays within ~32 MiB. The products
    are the same; their sums may round differently (ewma is not exact, module docstring)."""
    rows = ext.shape[0]
    out = np.empty((rows, width), dtype=np.float64)
    if rows <= _CORRELATE_ROWS or width >= 64:
        for s in range(rows):
            out[s] = np.correlate(ext[s], weights, "valid")
        return out
    views = np.lib.stride_tricks.sliding_window_view(ext, n, axis=1)  # [S, L, n]
    block = max(1, _SUM_BLOCK // max(1, rows * n))
    for lo in range(0, width, block):
        out[:, lo : lo + block] = (views[:, lo : lo + block] * weights).sum(-1)
    return out


@functools.lru_cache(maxsize=256)
def _ewma_weights(n: int, halflife: float) -> tuple[np.ndarray, np.ndarray]:
    """Weights oldest-first for a window of n, and their sums over the newest k tokens."""
    weights = 0.5 ** (np.arange(n, dtype=np.float64) / halflife)
    flipped, totals = weights[::-1].copy(), weights.cumsum()
    flipped.flags.writeable = totals.flags.writeable = False  # shared by the cache
    return flipped, totals


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
        self.index: dict[_Signature, int] = {}  # signature -> its column of matrix
        self.matrix = np.zeros((len(rules), 0), dtype=bool)  # [rules, signatures]
        # The usual case's last roles, attribute values and masks: decode steps of the same
        # conversations repeat them.
        self._last: tuple[list[str], list[str | None] | None, np.ndarray] | None = None

    def active(self, slices: list[SequenceSlice], model: str) -> np.ndarray | None:
        if not self.enabled:
            return None
        if self.uses_model or len(self.plain) > 1:
            return self._masks(slices, model)
        # Roles and at most one attribute (strings, so a copy of what was read): equal ones
        # give equal signatures, hence equal masks.
        roles = list(map(_ROLE, slices))
        key = self.plain[0] if self.plain else None
        values = None
        if key is not None:
            values = _attribute_values(slices, key)
        last = self._last
        if last is not None and last[0] == roles and last[1] == values:
            return last[2]
        masks = self._masks(slices, model)
        masks.flags.writeable = False  # handed out again
        self._last = (roles, values, masks)
        return masks

    def _masks(self, slices: list[SequenceSlice], model: str) -> np.ndarray:
        if not self.uses_model and len(self.plain) <= 1:
            # The usual case (roles, at most one attribute such as a tenant): a signature is
            # two dictionary reads, and the masks are columns of one matrix.
            key = self.plain[0] if self.plain else ""
            signatures = [(s.role, None, (s.attributes.get(key),)) for s in slices]
            if not self.plain:
                signatures = [(role, None, ()) for role, _, _ in signatures]
        else:
            signatures = [self.signature(s, model) for s in slices]
        index = self.index
        columns = [index.get(signature) for signature in signatures]
        if None in columns:
            missing = {
                sig for sig, column in zip(signatures, columns, strict=True) if column is None
            }
            if len(index) + len(missing) > self._LIMIT:
                index.clear()
                self.matrix = self.matrix[:, :0]
                # Every signature of this batch is now missing, not only the new ones.
                missing = set(signatures)
            for signature in missing:
                self.add(signature)
            columns = [index[signature] for signature in signatures]
        return self.matrix[:, columns]

    def signature(self, sl: SequenceSlice, model: str) -> _Signature:
        attributes = sl.attributes
        plain = tuple(map(attributes.get, self.plain))
        # The batch's model unless the slice names its own.
        own_model = (attributes.get("model") or model or None) if self.uses_model else None
        return (sl.role, own_model, plain)

    def add(self, signature: _Signature) -> None:
        """Compute a signature's mask as a new column of ``matrix``."""
        role, model, plain = signature
        attributes = {k: v for k, v in zip(self.plain, plain, strict=True) if v is not None}
        attributes["role"] = role
        if model is not None:
            attributes["model"] = model
        column = np.array([rule.applies_to(attributes) for rule in self.rules], dtype=bool)
        self.matrix = np.concatenate((self.matrix, column[:, None]), axis=1)
        self.index[signature] = self.matrix.shape[1] - 1


_Signature = tuple[str, str | None, tuple[str | None, ...]]


def _attribute_values(slices: list[SequenceSlice], key: str) -> list[str | None]:
    """Each slice's attribute ``key`` (None where it has none), in C: a list comprehension
    over a step's 64 slices costs several times more."""
    attributes = list(map(_ATTRIBUTES, slices))
    if attributes.count(_NO_ATTRIBUTES) == len(attributes):  # no slice has any (or all empty)
        return [None] * len(attributes)
    try:
        # The dicts a sidecar builds: ``dict.get`` itself, without a method lookup per slice.
        return list(map(dict.get, attributes, itertools.repeat(key)))
    except TypeError:  # some other mapping (the shared empty default is a mappingproxy)
        return list(map(operator.methodcaller("get", key), attributes))


class SliceColumns(NamedTuple):
    """A batch's slices as column lists, read once (``RuleEngine._check``), or given with
    them (``SliceList``). Never changed once made: the engine keeps and compares them."""

    starts: list[int]
    rows: list[int]
    positions: list[int]
    keys: list[Hashable]  # ``state_key`` of each slice
    request_ids: list[str]
    ends: Sequence[bool]
    # True when the keys are known to be distinct (one wave); False: not checked.
    distinct: bool = False
    # Each slice's ``turn_end``, or empty: no slice ends a turn (besides those that ``end``).
    turn_ends: Sequence[bool] = ()


_Columns = SliceColumns


# The fields ``SliceList`` fills, in order: every field of ``SequenceSlice`` (a test checks).
SLICE_FIELDS = (
    "conversation_id",
    "start_row",
    "rows",
    "position",
    "role",
    "end",
    "request_id",
    "attributes",
    "scope",
    "turn_end",
)
_new_slice = tuple.__new__


class SliceList(Sequence[SequenceSlice]):
    """A batch's ``SequenceSlice`` sequence given as columns (``columns``, plus each slice's
    id, role, attributes and scope), for a caller that has them already: the sidecar's
    columnar format reads them from the message's packed arrays and its conversation table.
    The engine reads the columns; the slices themselves are only made when something reads
    them (a firing, roles, a grouped step, an audit), so a decode step where nothing fires
    makes none of its 64 named tuples (and none of their garbage). Nothing here changes once
    made; ``columns`` must describe exactly the slices (a test checks the sidecar's against
    the columns read from them)."""

    __slots__ = ("_items", "_parts", "columns")

    def __init__(
        self,
        columns: SliceColumns,
        ids: Sequence[str],
        roles: Sequence[str],
        attributes: Sequence[Mapping[str, str]],
        scopes: Sequence[str],
    ) -> None:
        self.columns = columns
        self._parts = (ids, roles, attributes, scopes)
        self._items: list[SequenceSlice] | None = None

    def _list(self) -> list[SequenceSlice]:
        items = self._items
        if items is None:
            c = self.columns
            ids, roles, attributes, scopes = self._parts
            turn_ends = c.turn_ends or itertools.repeat(False, len(c.rows))
            # All in C: tuple.__new__ instead of the named tuple's Python-level __new__ (a
            # third of the cost), every field given, in order (SLICE_FIELDS).
            fields = zip(
                ids,
                c.starts,
                c.rows,
                c.positions,
                roles,
                c.ends,
                c.request_ids,
                attributes,
                scopes,
                turn_ends,
                strict=True,
            )
            items = self._items = list(map(_new_slice, itertools.repeat(SequenceSlice), fields))
        return items

    def __len__(self) -> int:
        return len(self.columns.rows)

    def __getitem__(self, index):  # type: ignore[no-untyped-def,override]
        return self._list()[index]

    def __iter__(self) -> Iterator[SequenceSlice]:
        return iter(self._list())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SliceList):
            other = other._list()
        return self._list() == other

    __hash__ = None  # type: ignore[assignment]  # as a list's

    def __repr__(self) -> str:
        return f"SliceList({self._list()!r})"


def _read_columns(sequences: Sequence[SequenceSlice]) -> _Columns:
    """The slices' fields as columns: one transposing ``zip`` (a pass in C over the named
    tuples) instead of a ``map`` per field, each as costly on a decode step's 64 slices;
    none at all for a ``SliceList``, which carries them."""
    if sequences.__class__ is SliceList:
        return sequences.columns  # type: ignore[attr-defined]
    if not sequences:
        return _Columns([], [], [], [], [], ())
    ids, starts, rows, positions, _, ends, request_ids, _, scopes, turn_ends = zip(
        *sequences, strict=True
    )
    keys = list(map(state_key, sequences)) if any(scopes) else list(ids)
    # Lists: they are compared with the lists the previous step kept (``_Bind``).
    return _Columns(
        list(starts), list(rows), list(positions), keys, list(request_ids), ends, False, turn_ends
    )


# --------------------------------------------------------------------------- engine


@dataclass
class _Bind:
    """What the last wave bound (``RuleEngine._bind``), to recognise the next decode step."""

    keys: list[Hashable]
    client: str
    version: int  # of the conversation table, after binding
    slots: list[int]
    conversations: list[Conversation]
    next_positions: list[int]
    request_ids: list[str]
    # The steady path moved ``next_positions`` on without writing them to the conversations
    # (a Python step per conversation); ``RuleEngine._flush_bind`` does, before they are read.
    pending: bool = False


class RuleEngine:
    """Evaluates a RuleSet batch after batch, keeping per-conversation state between batches
    (rolling windows, sustained counts, cooldowns) for at most `max_conversations`
    conversations; at the cap, eviction is fair between the clients that sent them
    (`monitor.rules.conversations`).

        from monitor.features import load_pack
        from monitor.rules import PackFeatures, RuleEngine, SequenceSlice, load_rules

        # The shipped rules write pooled(): load them with their pack (what it records).
        known = PackFeatures.of([load_pack("monitor/packs/minilm-probes.safetensors")])
        engine = RuleEngine(load_rules(["rules/deception.yaml"], known))
        result = engine.evaluate(
            {"probes/deception": torch.tensor([0.1, 2.5, 3.5])},   # one value per token row
            [SequenceSlice("conv-42", start_row=0, rows=3, position=0, role="assistant")],
            model="llama-3-8b",
        )
        for firing in result.firings:
            print(firing.rule, firing.conversation_id, firing.position, firing.value)
    """

    def __init__(
        self,
        ruleset: RuleSet,
        max_conversations: int = MAX_CONVERSATIONS,
        max_state_bytes: int | None = None,
    ) -> None:
        """``max_state_bytes`` bounds the rule state of all conversations together: the
        engine then tracks at most ``max_state_bytes // state_bytes_per_conversation(rules)``
        conversations (and at most ``max_conversations``), re-computed on each reload."""
        if max_conversations < 1:
            raise ValueError("max_conversations must be at least 1")
        self._limit = max_conversations
        self._max_state_bytes = max_state_bytes
        self._max = max_conversations
        self._capacity = min(_INITIAL_CAPACITY, max_conversations)
        self._conversations = ConversationTable(max_conversations)  # fair LRU per owner
        self._free: list[int] = []
        self._next_slot = 0
        self._lock = threading.Lock()
        self._install(ruleset, previous=None)

    @property
    def tracked_conversations(self) -> int:
        """Conversations whose state is kept now (at most `max_conversations`)."""
        return len(self._conversations)

    @property
    def max_conversations(self) -> int:
        """Conversations tracked at most with the rules loaded now (see ``max_state_bytes``)."""
        return self._max

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
        if previous is not None:
            self._flush_bind()  # the conversations outlive the rules
        rules = ruleset.enabled_rules
        self._set_max(rules)
        runs = _Table(len(rules), 0, np.int64, self._capacity)
        fired = _Table(len(rules), _NEVER, np.int64, self._capacity)
        old = {rule.state_key: i for i, rule in enumerate(previous or [])}
        for j, rule in enumerate(rules):
            if rule.state_key in old:
                runs.data[:, j] = self._runs.data[:, old[rule.state_key]]
                fired.data[:, j] = self._fired.data[:, old[rule.state_key]]
        program = compile_rules(rules)
        fills = np.zeros(program.history_width, dtype=np.float32)
        for slot in program.temporal:
            fills[_columns(slot)] = slot.fill
        history = _Table(program.history_width, fills, np.float32, self._capacity)
        seen = _Table(program.counted_width, 0, np.int64, self._capacity)
        if previous is not None:  # temporal state of expressions still in use carries over
            kept = {slot.key: slot for slot in self._program.temporal}
            for slot in program.temporal:
                was = kept.get(slot.key)
                if was is not None:
                    history.data[:, _columns(slot)] = self._history.data[:, _columns(was)]
                    if slot.counted >= 0:
                        seen.data[:, slot.counted] = self._seen.data[:, was.counted]
        request = [slot for slot in program.temporal if slot.key[0] == "request"]
        self._request_history = np.array(
            [c for slot in request for c in range(slot.offset, slot.offset + slot.kept)],
            dtype=np.int64,
        )
        self._request_seen = np.array(
            [slot.counted for slot in request if slot.counted >= 0], dtype=np.int64
        )
        # Tokens-seen columns of functions restricted to some roles (``window_roles``): they
        # count only those roles' tokens. Empty for rule sets that restrict none.
        self._masked_counted = [
            (slot.counted, slot.roles)
            for slot in program.temporal
            if slot.roles and slot.counted >= 0
        ]
        # Running sums of restricted rolling sums, means and counts (``_step_masked_sum``):
        # three float64 columns each, ``hi``, ``lo`` and ``exact``, filled with a fresh
        # window's (0, 0, exact). A reload keeps windows but not these: the first step after
        # it re-sums every carried window.
        compensated = [s for s in program.temporal if s.roles and s.kind in _PLAIN_SUMS]
        self._sum_columns = {slot.offset: 3 * i for i, slot in enumerate(compensated)}
        sums = _Table(
            3 * len(compensated), [0.0, 0.0, 1.0] * len(compensated), np.float64, self._capacity
        )
        sums.data[:, 2::3] = 0.0
        self._request_sums = np.array(
            [
                3 * i + c
                for i, s in enumerate(compensated)
                if s.key[0] == "request"
                for c in range(3)
            ],
            dtype=np.int64,
        )
        self._ruleset, self._rules, self._runs, self._fired = ruleset, rules, runs, fired
        self._program, self._history, self._seen = program, history, seen
        self._sums = sums
        self._for = np.array([rule.for_tokens for rule in rules], dtype=np.int64)
        self._need = self._for[:, None]  # [K, 1]: broadcast over a wave's slices
        self._required = ruleset.required_features
        self._rule_order = {rule.name: i for i, rule in enumerate(rules)}
        self._request_rules = np.array(
            [j for j, rule in enumerate(rules) if rule.scope == "request"], dtype=np.int64
        )
        # Rules checked only at turn ends (``at: turn_end``); None when there are none, so a
        # rule set without them costs a decode step nothing more.
        at_turn_end = [j for j, rule in enumerate(rules) if rule.at == "turn_end"]
        self._turn_end_rules = np.array(at_turn_end, dtype=np.int64) if at_turn_end else None
        # The same rows of [rules, ...] arrays: a slice (views, no gather) when consecutive.
        self._turn_end_at = _index(at_turn_end) if at_turn_end else slice(0, 0)
        # Per slot and turn-end rule, what its condition was at the conversation's last
        # evaluated row, for a turn end a slice without rows marks there later (a server
        # learns that an answer ended after its last token): whether it held there, the rule
        # applied to that row (role, exceptions) and the row was not itself a turn end
        # (checked already), and the rule's value there. Kept across reloads as run lengths.
        pending = _Table(len(at_turn_end), False, np.bool_, self._capacity)
        pending_values = _Table(len(at_turn_end), 0.0, np.float64, self._capacity)
        if previous is not None:
            was = {key: i for i, key in enumerate(self._turn_end_keys)}
            for i, j in enumerate(at_turn_end):
                k = was.get(rules[j].state_key)
                if k is not None:
                    pending.data[:, i] = self._pending.data[:, k]
                    pending_values.data[:, i] = self._pending_values.data[:, k]
        self._pending, self._pending_values = pending, pending_values
        self._turn_end_keys = [rules[j].state_key for j in at_turn_end]
        self._request_turn_end = np.array(
            [i for i, j in enumerate(at_turn_end) if rules[j].scope == "request"], dtype=np.int64
        )
        self._masks = _MaskCache(rules)
        # The last FeatureBlock index found to hold every required feature (by identity).
        self._checked_index: Mapping[str, int] | None = None
        # No rule holds ``for: N`` tokens: a decode step's run lengths are its conditions.
        self._for_one = bool(rules) and all(rule.for_tokens == 1 for rule in rules)
        self._last_bind: _Bind | None = None
        # What the last wave's slots and the last feature block's columns were.
        self._slot_cache: tuple[list[int], tuple[np.ndarray, np.ndarray | slice]] | None = None
        self._columns_cache: tuple[Mapping[str, int], np.ndarray] | None = None
        # Per stage of the program: its slot list lives as long as the program (and this
        # dict), so its id is a key that cannot be reused meanwhile.
        self._step_kernels: dict[int, _StepKernel] = {}

    def _block_columns(self, features: Mapping[str, object]) -> np.ndarray | None:
        """The columns of the program's features in a ``FeatureBlock``, kept while blocks
        come with the same index (the sidecar's do)."""
        if not isinstance(features, FeatureBlock):
            return None
        cached = self._columns_cache
        if cached is None or cached[0] is not features.index:
            if not all(map(features.index.__contains__, self._program.feature_names)):
                return None  # gather reports what is missing
            columns = features.columns(self._program.feature_names)
            columns.flags.writeable = False
            cached = self._columns_cache = (features.index, columns)
        return cached[1]

    def _step_kernel(self, slots: list[TemporalSlot]) -> _StepKernel:
        kernel = self._step_kernels.get(id(slots))
        if kernel is None:
            kernel = _StepKernel(slots, self._program.history_width, self._program.sum_width)
            self._step_kernels[id(slots)] = kernel
        return kernel

    def evaluate(
        self,
        features: Mapping[str, torch.Tensor],
        sequences: Sequence[SequenceSlice],
        *,
        model: str = "",
        client: str = "",
    ) -> EvaluationResult:
        """Evaluate all enabled rules on one batch.

        ``features`` maps qualified feature names to float vectors ``[rows]`` (tensors, or
        numpy arrays) covering the batch; ``model`` names the model that produced it (an
        attribute exceptions can match); ``client`` is who sent it, the owner its new
        conversations are charged to for fair eviction. Raises ValueError for a malformed
        batch before touching any state.
        """
        with self._lock:
            batch_rows, columns = self._check(features, sequences)
            # A slice without rows of a conversation not tracked has nothing to evaluate and
            # nothing to end: it must not take a slot (millions of them cost nothing else).
            if not all(columns.rows):
                sequences = self._drop_untracked(sequences, columns)
                columns = None
            if columns is not None and columns.distinct:
                waves = [(sequences, columns.keys)]  # type: ignore[list-item]  # one wave
            else:
                waves = _waves(sequences, None if columns is None else columns.keys)
            for wave, _ in waves:
                if len(wave) > self._max:
                    raise ValueError(f"batch has more than {self._max} conversations")
            result = EvaluationResult()
            # One wave of all the batch's slices (the usual case): the column lists read in
            # ``_check`` are the wave's, and are not read again.
            single = columns if len(waves) == 1 else None
            for wave, keys in waves:
                self._run_wave(features, wave, keys, batch_rows, result, model, client, single)
            if len(result.firings) > 1:
                result.firings.sort(key=lambda f: (f.row, self._rule_order[f.rule]))
            return result

    def _drop_untracked(
        self, sequences: Sequence[SequenceSlice], columns: _Columns
    ) -> list[SequenceSlice]:
        """The slices to evaluate: those with rows, and those without of a conversation that is
        tracked or has rows earlier in this batch (its end or turn end is then one)."""
        tracked = self._conversations
        with_rows: set[Hashable] = set()
        kept = []
        for s, key, rows in zip(sequences, columns.keys, columns.rows, strict=True):
            if rows:
                with_rows.add(key)
            elif key not in tracked and key not in with_rows:
                continue
            kept.append(s)
        return kept

    # ----------------------------------------------------------------- validation

    def _check(
        self,
        features: Mapping[str, torch.Tensor],
        sequences: Sequence[SequenceSlice],
    ) -> tuple[int, _Columns]:
        # Column lists and C-level maps: a decode step has 64 slices, and a Python loop over
        # them is a good part of the step's cost.
        columns = _read_columns(sequences)
        starts, rows, positions = columns.starts, columns.rows, columns.positions
        count = len(starts)
        if count and rows.count(1) == count and starts == _range_list(count):
            # A decode step (one row per slice, in batch order): nothing negative but maybe
            # a position, nothing overlaps, and the rows are the slices'.
            if min(positions) < 0:
                self._check_slices(sequences)
            batch_rows = count
        else:
            batch_rows = self._check_layout(sequences, starts, rows, positions)
        if isinstance(features, FeatureBlock) and len(features.block) >= batch_rows:
            if features.index is self._checked_index:
                return batch_rows, columns
            if all(map(features.index.__contains__, self._required)):
                # Blocks of successive batches share their index (see FeatureBlock).
                self._checked_index = features.index
                return batch_rows, columns  # every column of a block is a vector of its rows
        for name in self._required:
            tensor = features.get(name)
            if tensor is None:
                raise ValueError(f"missing feature {name!r}")
            if tensor.ndim != 1 or tensor.shape[0] < batch_rows:
                raise ValueError(f"feature {name!r} must be a vector of at least {batch_rows} rows")
        return batch_rows, columns

    @staticmethod
    def _check_slices(sequences: Sequence[SequenceSlice]) -> None:
        for s in sequences:
            if s.rows < 0 or s.start_row < 0 or s.position < 0:
                raise ValueError(
                    f"slice {s.conversation_id!r}: negative start_row, rows or position"
                )

    @staticmethod
    def _check_layout(
        sequences: Sequence[SequenceSlice],
        starts: list[int],
        rows: list[int],
        positions: list[int],
    ) -> int:
        """The batch's rows the slices cover; raises ValueError for negative or overlapping
        slices."""
        if sequences and min(min(starts), min(rows), min(positions)) < 0:
            RuleEngine._check_slices(sequences)
        ends = list(map(operator.add, starts, rows))
        if all(map(operator.le, ends[:-1], starts[1:])):  # in row order, none overlapping
            batch_rows = ends[-1] if ends else 0
        else:
            spans = sorted(zip(starts, ends, strict=True))
            for i in range(1, len(spans)):
                if spans[i][0] < spans[i - 1][1]:
                    raise ValueError("sequence slices overlap")
            batch_rows = spans[-1][1]
        return batch_rows

    # ----------------------------------------------------------------- conversations

    def _bind(
        self,
        slices: list[SequenceSlice],
        keys: list[Hashable],
        result: EvaluationResult,
        client: str,
        columns: _Columns | None = None,
    ) -> list[int]:
        """Slots for a wave's conversations, resetting state on gaps and new conversations;
        ``columns`` the slices' column lists when the caller has them.

        Known conversations are touched before any new one is allocated, so that eviction
        never picks one of this wave's."""
        conversations = self._conversations
        positions = list(map(_POSITION, slices)) if columns is None else columns.positions
        request_ids = list(map(_REQUEST_ID, slices)) if columns is None else columns.request_ids
        last = self._last_bind
        if (
            last is not None
            and last.version == conversations.version
            and last.client == client
            and last.keys == keys
            and last.next_positions == positions
            and last.request_ids == request_ids
        ):
            # The steady decode state: the same conversations as the previous wave, in the
            # same order, each continuing where it left off, and nothing else has touched
            # the table since. Touching them again would leave the LRU order as it is, no
            # state is reset: only the positions move on.
            rows = map(_ROWS, slices) if columns is None else columns.rows
            last.next_positions = list(map(operator.add, positions, rows))
            last.pending = True
            return last.slots
        self._flush_bind()
        slots: list[int] = []
        fresh: list[int] = []
        new_request: list[int] = []
        new: list[int] = []
        for i, s in enumerate(slices):
            conv = conversations.get(keys[i])
            if conv is None:
                new.append(i)
                slots.append(-1)
                continue
            conversations.touch(keys[i], client)
            if conv.next_position != s.position:
                result.gaps += 1
                fresh.append(conv.slot)
            elif not s.rows:
                # A slice without rows (an end, a turn end after the last token) takes no
                # part in a request: servers send it with no request id.
                slots.append(conv.slot)
                continue
            elif conv.request_id != s.request_id:
                new_request.append(conv.slot)
            conv.next_position = s.position + s.rows
            conv.request_id = s.request_id
            slots.append(conv.slot)
        keep = set(keys) if new else set()
        for i in new:
            s = slices[i]
            conv = self._allocate(keys[i], client, keep, result)
            conv.next_position = s.position + s.rows
            conv.request_id = s.request_id
            fresh.append(conv.slot)
            slots[i] = conv.slot
        if fresh:
            index = np.array(fresh, dtype=np.int64)
            for table in self._tables():
                table.reset(index)
        if new_request:
            self._reset_request_state(np.array(new_request, dtype=np.int64))
        bound = [conversations.get(key) for key in keys]
        self._last_bind = _Bind(
            keys,
            client,
            conversations.version,
            slots,
            bound,  # type: ignore[arg-type]  # all tracked: just touched or added
            [conv.next_position for conv in bound],  # type: ignore[union-attr]
            request_ids,
        )
        return slots

    def _flush_bind(self) -> None:
        """Write the positions the steady decode path kept in ``_last_bind`` to their
        conversations (some may have ended or been evicted since: no harm done)."""
        last = self._last_bind
        if last is not None and last.pending:
            for conv, position in zip(last.conversations, last.next_positions, strict=True):
                conv.next_position = position
            last.pending = False

    def _reset_request_state(self, slots: np.ndarray) -> None:
        """A new request in a conversation: rules with ``scope: request`` start afresh."""
        if len(self._request_rules):
            self._runs.reset_columns(slots, self._request_rules)
            self._fired.reset_columns(slots, self._request_rules)
        if len(self._request_history):
            self._history.reset_columns(slots, self._request_history)
        if len(self._request_seen):
            self._seen.reset_columns(slots, self._request_seen)
        if len(self._request_sums):
            self._sums.reset_columns(slots, self._request_sums)
        if len(self._request_turn_end):
            self._pending.reset_columns(slots, self._request_turn_end)

    def _allocate(
        self, key: Hashable, client: str, keep: set[Hashable], result: EvaluationResult
    ) -> Conversation:
        victim = self._conversations.victim(client, keep)
        if victim is not None:
            evicted = self._conversations.pop(victim)
            assert evicted is not None
            self._free.append(evicted.slot)
            result.evicted += 1
        if self._free:
            slot = self._free.pop()
        else:
            slot = self._next_slot
            self._next_slot += 1
            if slot >= self._capacity:
                self._grow()
        conv = Conversation(slot, 0, "", client)
        self._conversations.add(key, conv)
        return conv

    def _set_max(self, rules: list[Rule]) -> None:
        """The conversation cap for these rules under the state budget; conversations over a
        lowered cap are evicted (fairly, least recently used first)."""
        cap = self._limit
        if self._max_state_bytes is not None:
            per_conversation = state_bytes_per_conversation(rules)
            cap = max(1, min(cap, self._max_state_bytes // per_conversation))
        self._max = self._conversations.max = cap
        while len(self._conversations) > cap:
            victim = self._conversations.victim("", ())
            evicted = self._conversations.pop(victim) if victim is not None else None
            if evicted is None:
                break
            self._free.append(evicted.slot)

    def _grow(self) -> None:
        self._capacity = min(self._capacity * 2, self._max)
        for table in self._tables():
            table.grow(self._capacity)

    def _tables(self) -> tuple[_Table, ...]:
        """Every table of per-slot state."""
        return (
            self._runs,
            self._fired,
            self._history,
            self._seen,
            self._sums,
            self._pending,
            self._pending_values,
        )

    # ----------------------------------------------------------------- evaluation

    def _run_wave(
        self,
        features: Mapping[str, torch.Tensor],
        slices: list[SequenceSlice],
        keys: list[Hashable],
        batch_rows: int,
        result: EvaluationResult,
        model: str,
        client: str = "",
        columns: _Columns | None = None,
    ) -> None:
        slots = self._bind(slices, keys, result, client, columns)
        # The steady decode state binds the same slot list again: its arrays are kept.
        cached = self._slot_cache
        if cached is None or cached[0] is not slots:
            cached = self._slot_cache = (slots, _slot_arrays(slots))
        if columns is None:
            wave = _layout(slices, cached[1], batch_rows)
        else:
            wave = _layout(slices, cached[1], batch_rows, columns.rows, columns.starts)
        if wave.total and self._rules:
            program = self._program
            # Small waves (decode steps) run a plan kept for their row count.
            plan = program.plan(wave.total) if wave.total <= _PLAN_ROWS else None
            registers = plan.registers if plan is not None else program.allocate(wave.total)
            wave.gather(features, program.feature_names, registers, self._block_columns(features))
            temporal = _WaveTemporal(self, wave)
            values: np.ndarray | Callable[[], np.ndarray]
            if plan is not None:
                # The values are only read when a rule fires (``_collect``), before the
                # plan's registers are written again.
                conditions = plan.run_conditions(temporal.compute, into=True)
                values = plan.values
            else:
                conditions, values = program.run(registers, temporal.compute)
            temporal.store()
            active = self._masks.active(wave.slices, model)
            at_turn_end = self._turn_end_rules
            if at_turn_end is not None:
                # Their conditions hold only at turn-end rows (their temporal functions took
                # in every row above); ``for`` is 1 for them (the loader checks).
                te = self._turn_end_at
                marked = _turn_end_rows(wave, columns)
                values = self._keep_pending(wave, conditions[te], marked, active, values)
                conditions[te] &= marked
            fires = self._advance_runs(wave, conditions, active)
            if at_turn_end is not None:
                # Each turn end is checked afresh: a turn end right after another (a one-token
                # turn) must not count as the same run and stay silent.
                te = self._turn_end_at
                if te.__class__ is slice:  # a view: no index arrays built
                    self._runs.data[wave.at, te] = 0
                else:
                    self._runs.reset_columns(wave.slots, at_turn_end)
            self._collect(wave, fires, values, result)
        if self._turn_end_rules is not None and not (wave.uniform and wave.width == 1):
            self._turn_ends_without_rows(wave, keys, columns, result)
        # In C: most steps end no conversation.
        if any(map(_END, slices) if columns is None else columns.ends):
            for s in slices:
                if s.end:
                    ended = self._conversations.pop(state_key(s))
                    if ended is not None:
                        self._free.append(ended.slot)

    def _keep_pending(
        self,
        wave: _Wave,
        held: np.ndarray,
        marked: np.ndarray,
        active: np.ndarray | None,
        values: np.ndarray | Callable[[], np.ndarray],
    ) -> np.ndarray | Callable[[], np.ndarray]:
        """Keep, for each slice with rows, what its turn-end rules' conditions (``held``
        [turn-end rules, R], maybe a view: not written, read before the caller masks it)
        were at its last row, for a turn end marked there later by a slice without rows
        (``_turn_ends_without_rows``); ``marked`` [R]: the turn-end rows. Returns ``values``,
        read (an array) when some condition is kept as holding."""
        te = self._turn_end_at
        if wave.uniform and wave.width == 1:  # a decode step: each row is its slice's last
            last: np.ndarray | slice = slice(None)
            at: np.ndarray | slice = wave.at
            pending = held & ~marked
            if active is not None:
                pending &= active[te]
        else:
            has_rows = wave.lengths > 0
            last = (wave.offsets + wave.lengths - 1)[has_rows]
            at = wave.slots[has_rows]
            pending = held[:, last] & ~marked[last]
            if active is not None:
                pending &= active[te][:, has_rows]
        self._pending.data[at] = pending.T
        if _ANY(pending, axis=None):  # values are only read where a condition held
            if callable(values):
                values = values()
            self._pending_values.data[at] = values[te][:, last].T
        return values

    def _turn_ends_without_rows(
        self,
        wave: _Wave,
        keys: list[Hashable],
        columns: _Columns | None,
        result: EvaluationResult,
    ) -> None:
        """Fire the turn-end rules whose condition held at the last evaluated row of a
        conversation whose slice here has no rows and carries ``turn_end`` or ``end``: the
        turn end is that row (a server learns that an answer ended after its last token).
        Each such turn end is checked once: whatever was kept is cleared here."""
        zero = wave.lengths == 0
        if not _ANY(zero, axis=None):
            return
        marked = _turn_end_slices(wave, columns) & zero
        if not _ANY(marked, axis=None):
            return
        at_turn_end = self._turn_end_rules
        assert at_turn_end is not None
        for si in np.flatnonzero(marked).tolist():
            slot = int(wave.slots[si])
            pending = self._pending.data[slot]
            if not _ANY(pending, axis=None):
                continue
            sl = wave.slices[si]
            conv = self._conversations.get(keys[si])
            # The request of the rows evaluated last: a slice without rows names none.
            request_id = conv.request_id if conv is not None else sl.request_id
            position = sl.position - 1
            for i in np.flatnonzero(pending).tolist():
                k = int(at_turn_end[i])
                rule = self._rules[k]
                last = int(self._fired.data[slot, k])
                if rule.cooldown_tokens and position - last < rule.cooldown_tokens:
                    continue
                self._fired.data[slot, k] = position
                value = float(self._pending_values.data[slot, i])
                firing = _firing(rule, sl, position, sl.start_row, value, request_id, False)
                result.firings.append(firing)
            pending[:] = False

    def _advance_runs(
        self, wave: _Wave, conditions: np.ndarray, active: np.ndarray | None
    ) -> np.ndarray | None:
        """Run lengths with carry for all rules at once; returns where runs reach ``for``
        (None: nowhere).

        The run length at token t is t minus the index of the last false token; that index
        is a cummax over "t where false", seeded with the carried run as a virtual false
        token before the slice.
        """
        if wave.uniform and wave.width == 1:
            # One token per slice (a decode step): the general formula below reduces to this,
            # on [K, S] arrays without the token axis. A rule skipped for a slice (role,
            # exception) breaks its run.
            now = conditions if active is None else conditions & active
            if not _ANY(now, axis=None):
                # No condition holds (the usual step): every run breaks, none fires.
                self._runs.data[wave.at] = 0
                return None
            carry = self._runs.data[wave.at].T  # [K, S]
            if self._for_one:
                # Runs clamped at 1 are the condition itself, and a run fires where it
                # starts (``carry`` is a view of the state: read before it is written).
                # Runs are never negative: ``now > carry`` is ``now & (carry == 0)``, in one
                # call (a run carried over a reload from a longer ``for`` can exceed 1).
                fires = np.greater(now, carry)
                self._runs.data[wave.at] = now.T
                return fires[:, :, None]
            runs = np.where(now, carry + 1, 0)
            fires = runs == self._need
            self._runs.data[wave.at] = np.minimum(runs, self._need, out=runs).T
            return fires[:, :, None]
        carry = self._runs.data[wave.at].T  # [K, S]
        held = wave.pad(conditions, False)  # [K, S, L]
        if active is not None:
            held = held & active[:, :, None]
        need = self._for[:, None]  # [K, 1]
        local = np.arange(wave.width)
        last_false = np.where(held, -(need[:, :, None] + 2), local)
        seeded = np.concatenate([(-1 - carry)[:, :, None], last_false], axis=2)
        runs = local - _running_max(seeded)[:, :, 1:]
        last = np.maximum(wave.lengths - 1, 0)
        at_end = np.take_along_axis(
            runs, np.broadcast_to(last[None, :, None], (*carry.shape, 1)), 2
        )
        # Clamped at N: a run already past N must not reach N again, and must not overflow.
        ended = np.minimum(at_end[:, :, 0], need)
        self._runs.data[wave.at] = np.where(wave.lengths > 0, ended, carry).T
        return runs == need[:, :, None]

    def _collect(
        self,
        wave: _Wave,
        fires: np.ndarray | None,
        values: np.ndarray | Callable[[], np.ndarray],
        result: EvaluationResult,
    ) -> None:
        """Firings where runs reached ``for`` (past cooldowns); ``values`` [rules, rows], or
        what reads them."""
        if fires is None or not _ANY(fires, axis=None):
            return
        if callable(values):
            values = values()
        # Flat indices, then unravelled: ``np.argwhere`` of a [rules, 1, 4096] prefill is
        # ~15x slower. Both give C order, i.e. sorted by (rule, slice, token), so a cooldown
        # sees its own firings in order.
        k, s, t = np.unravel_index(np.flatnonzero(fires), fires.shape)
        fired_values = values[k, wave.offsets[s] + t].tolist()
        slots = wave.slots.tolist()
        for ki, si, ti, value in zip(k.tolist(), s.tolist(), t.tolist(), fired_values, strict=True):
            rule, sl = self._rules[ki], wave.slices[si]
            position = sl.position + ti
            if rule.cooldown_tokens:
                last = int(self._fired.data[slots[si], ki])
                if position - last < rule.cooldown_tokens:
                    continue
            self._fired.data[slots[si], ki] = position
            result.firings.append(_firing(rule, sl, position, sl.start_row + ti, value))


def _turn_end_slices(wave: _Wave, columns: _Columns | None) -> np.ndarray:
    """[S] bool: the wave's slices that carry ``turn_end`` or ``end``; ``columns`` are the
    wave's slices' when the caller has them."""
    if columns is None:
        ends, turn_ends = list(map(_END, wave.slices)), list(map(_TURN_END, wave.slices))
    else:
        ends, turn_ends = columns.ends, columns.turn_ends
    marked = np.array(ends, dtype=bool) if len(ends) else np.zeros(len(wave.slices), bool)
    if len(turn_ends):
        marked |= np.array(turn_ends, dtype=bool)
    return marked


def _turn_end_rows(wave: _Wave, columns: _Columns | None) -> np.ndarray:
    """[R] bool: the wave's turn-end rows, each the last row of a slice that carries
    ``turn_end`` or ``end``; ``columns`` are the wave's slices' when the caller has them."""
    marked = _turn_end_slices(wave, columns)
    rows = np.zeros(wave.total, dtype=bool)
    if _ANY(marked, axis=None):
        lengths = wave.lengths[marked]
        last = (wave.offsets[marked] + lengths - 1)[lengths > 0]
        rows[last] = True
    return rows


def _running_max(x: np.ndarray) -> np.ndarray:
    """Running maximum along the last axis. torch's cummax on a view of the same memory:
    numpy's ``maximum.accumulate`` along a last axis steps through it one element at a time
    over all the others (milliseconds for a 4,096-token prefill). Both propagate NaN."""
    return torch.from_numpy(np.ascontiguousarray(x)).cummax(dim=-1).values.numpy()


def state_bytes_per_conversation(rules: Sequence[Rule]) -> int:
    """Bytes of rule state one conversation takes: a run length and a last-fired position per
    rule, the history columns and counts of the rules' temporal functions, the running
    sums of their restricted (``window_roles``) rolling sums, means and counts, and what each
    ``at: turn_end`` rule's condition was at the last row (a flag and a value)."""
    program = compile_rules(list(rules))
    compensated = sum(1 for s in program.temporal if s.roles and s.kind in _PLAIN_SUMS)
    at_turn_end = sum(1 for rule in rules if rule.at == "turn_end")
    return (
        16 * len(rules)
        + 9 * at_turn_end
        + 4 * program.history_width
        + 8 * program.counted_width
        + 24 * compensated
        + 8
    )


# Unweighted window sums: a restricted one's decode step moves a running sum of its window.
_PLAIN_SUMS = frozenset({"rolling_sum", "rolling_mean", "count_over"})
# Restricted functions whose decode step reads slices of the carried window (ewma, whose
# weighted sums round, takes the general path).
_STEP_KINDS = frozenset({"rolling_max", "rolling_min", "delta", "cummax"})


def _exact_sum(window: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's sum of ``window`` [R, n] float32 as an unevaluated float64 pair
    ``(hi, lo)``, and 1.0 where ``hi + lo`` is the exact sum (0.0 where some rounding error
    could not be kept: values more than about 2**100 apart). Pairwise, log2(n) levels of
    TwoSum over all rows at once; non-finite values give non-finite sums."""
    hi = window.astype(np.float64)
    lo: np.ndarray | None = None
    bad = np.zeros(len(hi), dtype=bool)
    while hi.shape[1] > 1:
        if hi.shape[1] % 2:  # an odd column out: pair it with 0
            hi = np.concatenate([hi, np.zeros((len(hi), 1))], axis=1)
            if lo is not None:
                lo = np.concatenate([lo, np.zeros((len(lo), 1))], axis=1)
        a, b = hi[:, 0::2], hi[:, 1::2]
        hi = a + b
        back = hi - a
        error = (a - (hi - back)) + (b - back)  # a + b == hi + error exactly
        if lo is None:
            lo = error
            continue
        a, b = lo[:, 0::2], lo[:, 1::2]
        t = a + b
        back = t - a
        e1 = (a - (t - back)) + (b - back)
        lo = t + error
        back = lo - t
        e2 = (t - (lo - back)) + (error - back)
        bad |= _ANY((e1 != 0.0) | (e2 != 0.0), axis=1)
    if lo is None:
        lo = np.zeros_like(hi)
    return hi[:, 0], lo[:, 0], (~bad).astype(np.float64)


def _columns(slot: TemporalSlot) -> slice:
    return slice(slot.offset, slot.offset + slot.kept)


class _WaveTemporal:
    """Temporal functions for one wave. The program computes each (scope, expression) once
    however many rules use it; its new state goes to one block for the wave's slots, stored
    back into the history array in one assignment (``store``)."""

    def __init__(self, engine: RuleEngine, wave: _Wave) -> None:
        self.engine = engine
        self.wave = wave
        self.history = engine._history.data[wave.at]  # [S, columns]
        self.seen = engine._seen.data[wave.at]  # [S, counted]
        # Running sums of restricted windows [S, 3 per function]: a view of the state when
        # the wave's slots are consecutive (written in place), else a copy (``store``).
        self.sums = engine._sums.data[wave.at]
        self.step = wave.uniform and wave.width == 1  # one token per slice: a decode step
        # A wave of every slot (the steady decode state when the conversations fill the
        # table): the new history goes to the table's spare array, which then becomes its
        # state (``store``), instead of being copied back into the old one.
        table = engine._history
        at = wave.at
        # Only for small tables: the spare is a second copy of the whole history, kept between
        # steps and not counted in ``max_rule_state_bytes``; a large table allocates per wave.
        self.swap = (
            at.__class__ is slice
            and at == slice(0, len(table.data))
            and 0 < self.history.nbytes <= _SPARE_HISTORY_MAX_BYTES
        )
        if self.swap and table.spare is not None and table.spare.shape == table.data.shape:
            self.updated = table.spare
        else:
            self.updated = np.empty_like(self.history)
        self._in_roles: dict[frozenset[str], np.ndarray] = {}  # window roles -> [S] bool
        if self.step and self.history.shape[1]:
            # Every window moves on by one token: one shift for all functions' columns; the
            # step kernels then write each function's newest value into its last column.
            self.updated[:, :-1] = self.history[:, 1:]

    def compute(
        self, slots: list[TemporalSlot], xs: np.ndarray, into: np.ndarray | None = None
    ) -> np.ndarray:
        """One stage of the program's temporal functions (``Program.run``'s callback):
        ``xs`` [slots, rows] in, the functions' values [slots, rows] out; written into
        ``into`` (and it returned) where the step kernel computes them."""
        if self.step:
            kernel = self.engine._step_kernel(slots)
            out = kernel(self.history, self.seen, self.updated, xs, into)
            if out is not None:
                for t in kernel.masked:  # restricted to some roles: not in the kernel
                    out[t] = self._compute_masked(slots[t], xs[t])
                return out
        return np.stack([self.compute_one(slot, x) for slot, x in zip(slots, xs, strict=True)])

    def in_roles(self, roles: frozenset[str]) -> np.ndarray:
        """[S] bool: which of the wave's slices are of one of ``roles`` (a slice's rows share
        its role, so the mask is per slice)."""
        mask = self._in_roles.get(roles)
        if mask is None:
            slices = self.wave.slices
            mask = np.fromiter(map(roles.__contains__, map(_ROLE, slices)), bool, len(slices))
            self._in_roles[roles] = mask
        return mask

    def _compute_masked(self, slot: TemporalSlot, values: np.ndarray) -> np.ndarray:
        """A function restricted to ``slot.roles``: a slice of those roles extends its window
        as usual; a slice of another role takes nothing in, and every one of its tokens gets
        the function's value at the roles' last token, recomputed from the carried window
        (``kept`` is the whole window here). Before any token of the roles that value is the
        function's empty one: 0 for sums, means, ewma and delta, -inf/+inf for max/min."""
        wave, kept = self.wave, slot.kept
        inside = self.in_roles(slot.roles)
        carried = self.history[:, slot.offset : slot.offset + kept]  # [S, kept]
        if slot.kind in _PLAIN_SUMS:
            column = self.engine._sum_columns[slot.offset]
            if self.step:
                out = self._step_masked_sum(slot, column, values, inside, carried)
                if out is not None:
                    return out
            # The window changes here without its running sum: the next step re-sums it.
            self.sums[:, column + 2] = 0.0
        elif self.step and slot.kind in _STEP_KINDS and kept == slot.window:
            return self._step_masked_exact(slot, values, inside, carried)
        elif self.step and slot.kind == "ewma" and kept == slot.window:
            out = self._step_masked_ewma(slot, values, inside, carried)
            if out is not None:
                return out
        ext = np.concatenate([carried, wave.pad(values, slot.fill)], axis=1)
        seen = self.seen[:, slot.counted] if slot.counted >= 0 else None
        if slot.kind == "cummax":
            ext = _running_max(ext)
            out, held = ext[:, 1:], carried
        else:
            out = _apply_window(slot, ext[:, 1:], seen, wave.width)
            # The window that ended at the roles' last token: its seen count was one less.
            before = None if seen is None else np.maximum(seen - 1, 0)
            held = _apply_window(slot, carried, before, 1)
        out = np.where(inside[:, None], out, held)
        lengths = np.where(inside, wave.lengths, 0)
        take = lengths[:, None] + np.arange(kept)
        self.updated[:, slot.offset : slot.offset + kept] = np.take_along_axis(ext, take, 1)
        return wave.unpad(out)

    def _step_masked_sum(
        self,
        slot: TemporalSlot,
        column: int,
        x: np.ndarray,
        inside: np.ndarray,
        carried: np.ndarray,
    ) -> np.ndarray | None:
        """A decode step of a restricted rolling sum, mean or count in O(1) per conversation.

        Each conversation carries its window's sum exactly, as an unevaluated float64 pair
        (``hi + lo``: ``self.sums``' columns ``column`` and ``column + 1``), while its flag
        (``column + 2``) says the pair is exact. A token of the roles adds its value and takes
        off the window's oldest with error-free transformations (TwoSum), whose rounding
        errors go to ``lo``; where ``lo`` cannot hold them exactly either (values more than
        about 2**100 apart), the moved window is summed afresh (``_exact_sum``) and its flag
        says whether that sum is exact. A pair not known to be exact (after a reset of the
        state, after the general path moved the window, after such a sum) is re-summed from
        the carried window before the step, every step until it is exact again. A value is
        thus the float64 rounding of its window's exact sum, which is what
        ``_apply_window`` and the step kernel compute wherever their float64 sums are exact
        (module docstring): the same to the bit there, and the more accurate one beyond; or,
        for a window whose sum is not exact even as a pair, its own pairwise sum, never one
        that carries an error from values that have left the window.
        None (nothing written) when a value is not finite: the general path handles it."""
        n = slot.kept
        sums = self.sums
        hi, lo, exact = sums[:, column], sums[:, column + 1], sums[:, column + 2]
        due = exact == 0.0
        # Only a re-sum can meet a non-finite value: a stored pair is finite, and a
        # non-finite new value fails the exactness checks (NaN) and is summed afresh below.
        resummed = np.count_nonzero(due)  # a C count: cheaper than a reduction
        if resummed:
            rows = np.flatnonzero(due)
            hi, lo, exact = hi.copy(), lo.copy(), exact.copy()
            hi[rows], lo[rows], exact[rows] = _exact_sum(carried[rows])
            if not math.isfinite(_SUM(hi[rows] + lo[rows], axis=None)):
                return None  # a non-finite value: the general path, nothing written
        count = np.count_nonzero(inside)
        columns = self.updated[:, slot.offset : slot.offset + n]  # already shifted by one
        mean = slot.kind == "rolling_mean"
        if count:
            new = x.astype(np.float64)
            old = carried[:, 0].astype(np.float64)
            # hi + lo + new - old, exactly: TwoSum (exact barring overflow, which float64 sums
            # of float32 values cannot reach) gives d + e1 == new - old and s + e2 == hi + d;
            # then t = e1 + e2 and moved_lo = lo + t, each checked exact: a float sum
            # z = a + b is exact iff z - a == b and z - b == a (the one with the larger
            # operand is computed exactly). All in float64 (mixed-type operations cost
            # several times more).
            d = new - old
            back = d - new
            e1 = (new - (d - back)) - (old + back)
            s = hi + d
            back = s - hi
            e2 = (hi - (s - back)) + (d - back)
            rounded = np.count_nonzero(e1) or np.count_nonzero(e2)
            if rounded:
                t = e1 + e2
                moved_lo = lo + t
                still = ((t - e1) == e2) & ((t - e2) == e1)
                still &= ((moved_lo - lo) == t) & ((moved_lo - t) == lo)
            else:  # no rounding (float64 sums of the usual values are exact): lo stays
                moved_lo = lo.copy()
                still = np.ones(len(lo), dtype=bool)
            if resummed:
                still &= exact != 0.0
            # Where the pair is not exact (now, or since before), the dropped error can be
            # large next to a sum that cancelled: the moved window is summed afresh.
            redo = ~still
            if count < len(inside):
                redo &= inside
            if (rounded or resummed) and np.count_nonzero(redo):
                rows = np.flatnonzero(redo)
                window = np.concatenate([carried[rows, 1:], x[rows, None]], axis=1)
                s[rows], moved_lo[rows], fresh = _exact_sum(window)
                if not math.isfinite(_SUM(s[rows] + moved_lo[rows], axis=None)):
                    return None
                still[rows] = fresh != 0.0
            moved = s + moved_lo
            if mean:
                counts = self.seen[:, slot.counted]
                if _MIN(counts, axis=None) >= n:  # every window full: one divisor
                    moved /= n
                else:
                    moved /= np.minimum(counts + 1, n)
            if count == len(inside):  # every slice is of the roles: every window moves on
                sums[:, column], sums[:, column + 1], sums[:, column + 2] = s, moved_lo, still
                columns[:, -1] = x
                return moved.astype(np.float32)
        held = hi + lo  # the carried window's sum: the value at another role's token
        if mean:  # 0 / 1 before any of the roles
            held /= np.maximum(np.minimum(self.seen[:, slot.counted], n), 1)
        if not count:  # no slice of the roles: every window stays
            if resummed:
                sums[:, column], sums[:, column + 1], sums[:, column + 2] = hi, lo, exact
            columns[...] = carried
            return held.astype(np.float32)
        out = np.where(inside, moved, held)
        sums[:, column] = np.where(inside, s, hi)
        sums[:, column + 1] = np.where(inside, moved_lo, lo)
        sums[:, column + 2] = np.where(inside, still, exact)
        outside = ~inside
        columns[outside] = carried[outside]
        columns[inside, -1] = x[inside]
        return out.astype(np.float32)

    def _step_masked_exact(
        self, slot: TemporalSlot, x: np.ndarray, inside: np.ndarray, carried: np.ndarray
    ) -> np.ndarray:
        """A decode step of a restricted ``rolling_max``, ``rolling_min``, ``delta`` or
        ``cummax``: the general path's values (max, min and a float32 difference are exact,
        so the same whatever the order; NaN propagates in both), from slices of the carried
        window instead of a new ``[S, kept + 1]`` array and ``_apply_window`` twice."""
        n, kind = slot.window, slot.kind
        columns = self.updated[:, slot.offset : slot.offset + slot.kept]  # shifted by one
        if kind == "cummax":  # the running maximum, kept = 1
            last = carried[:, 0]
            out = np.where(inside, np.maximum(last, x), last)
            columns[:, 0] = out
            return out
        if kind == "delta":  # n = k + 1: the change over k tokens of the roles
            seen = self.seen[:, slot.counted]
            moved = np.where(seen >= n - 1, x - carried[:, 1], np.float32(0.0))
            # The window that ended at the roles' last token: its seen count was one less.
            held = np.where(seen - 1 >= n - 1, carried[:, -1] - carried[:, 0], np.float32(0.0))
        else:
            op, reduce = (np.maximum, _MAX) if kind == "rolling_max" else (np.minimum, _MIN)
            if n == 1:
                moved, held = x, carried[:, 0]
            else:
                rest = reduce(carried[:, 1:], axis=1)
                moved, held = op(rest, x), op(carried[:, 0], rest)
        count = np.count_nonzero(inside)
        if count == len(inside):  # every window moves on
            columns[:, -1] = x
            return moved
        if not count:  # every window stays
            columns[...] = carried
            return held
        outside = ~inside
        columns[outside] = carried[outside]
        columns[inside, -1] = x[inside]
        return np.where(inside, moved, held)

    def _step_masked_ewma(
        self, slot: TemporalSlot, x: np.ndarray, inside: np.ndarray, carried: np.ndarray
    ) -> np.ndarray | None:
        """A decode step of a restricted ``ewma``: the moved window's and the carried
        window's weighted sums, each one matrix-vector product in float64 (as the step
        kernel makes an unrestricted one's; ewma's weighted sums round, so like the kernel's
        they can differ from ``_apply_window``'s in the last bit: module docstring). None
        (nothing written) when a sum is not finite: the general path handles it."""
        n = slot.window
        weights, totals = _ewma_weights(n, float(slot.param[0]))
        block = np.empty((len(x), n + 1), dtype=np.float64)
        block[:, :n] = carried
        block[:, n] = x
        moved = block[:, 1:] @ weights
        held = block[:, :n] @ weights
        if not math.isfinite(_SUM(moved, axis=None) + _SUM(held, axis=None)):
            return None
        seen = self.seen[:, slot.counted]
        moved /= totals[np.minimum(seen, n - 1)]  # min(seen + 1, n) tokens in the window
        # The window that ended at the roles' last token: min(seen, n) tokens (0 before any,
        # whose sum is 0: any divisor).
        held /= totals[np.clip(seen - 1, 0, n - 1)]
        columns = self.updated[:, slot.offset : slot.offset + n]  # shifted by one
        count = np.count_nonzero(inside)
        if count == len(inside):
            columns[:, -1] = x
            return moved.astype(np.float32)
        if not count:
            columns[...] = carried
            return held.astype(np.float32)
        outside = ~inside
        columns[outside] = carried[outside]
        columns[inside, -1] = x[inside]
        return np.where(inside, moved, held).astype(np.float32)

    def compute_one(self, slot: TemporalSlot, values: np.ndarray) -> np.ndarray:
        if slot.roles:
            return self._compute_masked(slot, values)
        wave = self.wave
        kept = slot.kept
        carried = self.history[:, slot.offset : slot.offset + kept]  # [S, kept]
        ext = np.concatenate([carried, wave.pad(values, slot.fill)], axis=1)
        seen = self.seen[:, slot.counted] if slot.counted >= 0 else None
        if slot.kind == "cummax":
            ext = _running_max(ext)
            out = ext[:, 1:]
        else:
            out = _apply_window(slot, ext, seen, wave.width)
        if kept:
            if wave.uniform:  # every slice ends at the last column
                new = ext[:, ext.shape[1] - kept :]
            else:  # the last `kept` values of each slice's ext
                take = wave.lengths[:, None] + np.arange(kept)
                new = np.take_along_axis(ext, take, 1)
            self.updated[:, slot.offset : slot.offset + kept] = new
        return wave.unpad(out)

    def store(self) -> None:
        engine, at = self.engine, self.wave.at
        if self.swap:
            table = engine._history
            table.spare, table.data = table.data, self.updated
        else:
            engine._history.data[at] = self.updated
        if self.sums.shape[1] and not isinstance(at, slice):  # a copy: written back
            engine._sums.data[at] = self.sums
        if self.seen.shape[1]:
            lengths = self.wave.lengths
            added: int | np.ndarray = 1 if self.step else lengths[:, None]
            if engine._masked_counted:
                # Functions restricted to some roles count only those roles' tokens.
                added = np.empty(self.seen.shape, dtype=np.int64)
                added[...] = 1 if self.step else lengths[:, None]
                for column, roles in engine._masked_counted:
                    inside = self.in_roles(roles)
                    # A decode step's slices have one token each: the mask is the count.
                    added[:, column] = inside if self.step else np.where(inside, lengths, 0)
            if isinstance(at, slice):  # ``seen`` is a view of the state: counted in place
                self.seen += added
            else:
                engine._seen.data[at] = self.seen + added


class _StepKernel:
    """Several temporal functions on a wave of one token per slice, as one array program.

    A function's window on a decode step is its carried history (its columns of the history
    array) then the new value. Every sum-type function (rolling sum/mean, count_over, ewma)
    is then one column of a single matrix product of ``[history | new values]`` with a fixed
    weight matrix (1 on a function's columns; ewma's weights for ewma), in float64 like
    ``_apply_window``, whose results it equals whenever the float64 sums are exact (see the
    module docstring); maxima, minima and deltas are a slice each. The new history is the
    old one shifted by one column, with each function's newest value put in its last column.
    A step with a non-finite value is left to ``_apply_window`` (0 * inf in the product would
    spill NaN into other functions' sums).
    """

    def __init__(self, slots: list[TemporalSlot], history_width: int, sum_width: int) -> None:
        width = len(slots)
        self.width = width
        self.history_width = history_width
        self.sum_width = sum_width
        sums = [t for t, slot in enumerate(slots) if slot.kind in SUMS and not slot.roles]
        # Functions restricted to some roles are left to ``_WaveTemporal._compute_masked``
        # (the caller fills their rows of the output); their columns get weight 0 here.
        self.masked = [t for t, slot in enumerate(slots) if slot.roles]
        # Rows: the sum-type history columns, then this stage's new values of sum functions.
        weights = np.zeros((sum_width + len(sums), len(sums)), dtype=np.float64)
        divisors: list[np.ndarray] = []
        bases: list[int] = []
        base = 0
        self.extrema: list[tuple[int, int, int, bool]] = []  # (t, first, last col, maximum)
        self.deltas: list[tuple[int, int, int, int]] = []  # (t, oldest col, counted, window)
        newest_to: list[int] = []
        newest_from: list[int] = []
        cummax_to: list[int] = []
        cummax_from: list[int] = []
        for t, slot in enumerate(slots):
            if slot.roles:
                continue
            n = slot.kept + 1  # carried values, then the new one
            if slot.kind in SUMS:
                j = sums.index(t)
                rows = [*range(slot.offset, slot.offset + slot.kept), sum_width + j]
                if slot.kind == "ewma":
                    ewma, totals = _ewma_weights(n, float(slot.param[0]))
                    weights[rows, j] = ewma
                    divisors.append(totals)
                else:
                    weights[rows, j] = 1.0
                    mean = slot.kind == "rolling_mean"
                    divisors.append(np.arange(1, n + 1, dtype=np.float64) if mean else np.ones(n))
                bases.append(base - 1)  # divisor of a window holding c tokens: [base + c - 1]
                base += n
            elif slot.kind == "delta":
                self.deltas.append((t, slot.offset, slot.counted, n))
            else:
                maximum = slot.kind != "rolling_min"
                self.extrema.append((t, slot.offset, slot.offset + slot.kept, maximum))
            if slot.kind == "cummax":
                cummax_to.append(slot.offset)
                cummax_from.append(t)
            elif slot.kept:
                newest_to.append(slot.offset + slot.kept - 1)
                newest_from.append(t)
        self.sums = sums
        self.weights = weights
        self.divided = any(slots[t].kind in ("rolling_mean", "ewma") for t in sums)
        self.divisors = np.concatenate(divisors) if divisors else np.ones(1)
        self.bases = np.array(bases, dtype=np.int64)
        self.windows = np.array([slots[t].kept + 1 for t in sums], dtype=np.int64)
        self.counted = _index([max(slots[t].counted, 0) for t in sums])
        # Tokens seen (in every counted column) after which every window here is full: then
        # ``_counts`` is ``windows`` for every row.
        self.full_after = int(self.windows.max()) - 1 if len(sums) else 0
        self.full_divisors = self.divisors[self.bases + self.windows] if len(sums) else None
        # A column: the sums transposed (functions by rows) are divided in one call.
        self.full_divisors_t = None if self.full_divisors is None else self.full_divisors[:, None]
        self.sum_rows = _index(sums)
        self.newest_to = _index(newest_to, strided=True)
        self.newest_from = _index(newest_from, strided=True)
        self.has_newest = bool(newest_to)
        self.cummax_to = np.array(cummax_to, dtype=np.int64)
        self.cummax_from = np.array(cummax_from, dtype=np.int64)
        # The float64 block and its sums (``__call__``), kept from step to step: one pair,
        # grown to the most rows seen, whose leading rows each step uses. Not one per row
        # count: decode waves change size every few steps, and buffers kept for each size
        # would hold many times the rule state of a wave outside `max_rule_state_bytes`.
        self._block = np.empty((0, sum_width + len(sums)), dtype=np.float64)
        self._sums = np.empty((0, len(sums)), dtype=np.float64)

    @property
    def kept_bytes(self) -> int:
        """Bytes of the buffers kept between steps (the largest wave's float64 block)."""
        return self._block.nbytes + self._sums.nbytes

    def __call__(
        self,
        history: np.ndarray,
        seen: np.ndarray,
        updated: np.ndarray,
        x: np.ndarray,
        out: np.ndarray | None = None,
    ) -> np.ndarray | None:
        """The stage's outputs [functions, rows] from its inputs ``x`` [functions, rows]
        (writing new history into ``updated``), in ``out`` when given, or None, having
        written nothing, when the step has non-finite values (then the caller computes them
        one function at a time)."""
        rows = x.shape[1]
        if out is None:
            out = np.empty((self.width, rows), dtype=np.float32)
        if self.sums:
            # Kept from the step before, grown when a wave has more rows: its first `rows`
            # rows (contiguous views) are written whole each step.
            if self._block.shape[0] < rows:
                self._block = np.empty((rows, self._block.shape[1]), dtype=np.float64)
                self._sums = np.empty((rows, self._sums.shape[1]), dtype=np.float64)
            block, sums = self._block[:rows], self._sums[:rows]
            block[:, : self.sum_width] = history[:, : self.sum_width]
            block[:, self.sum_width :] = x[self.sum_rows].T
            np.matmul(block, self.weights, out=sums)  # [S, sum functions]
            # 0 * inf is NaN: an infinite value would spill into other functions' sums in
            # the product. Such a step is computed one function at a time. Every product is
            # made, so a non-finite input makes its row's sums non-finite (NaN where its
            # weight is 0), and float64 sums of float32 values cannot overflow: the sums are
            # finite exactly when the inputs are, and checking them is the cheaper check.
            # Their total is finite exactly when they all are (a few thousand sums of at
            # most ~1e42 each cannot overflow float64 either): one reduction, no temporary.
            if not math.isfinite(_SUM(sums, axis=None)):
                return None
            if not self.divided:
                out[self.sum_rows] = sums.T
            elif seen.shape[1] and _MIN(seen, axis=None) >= self.full_after:
                # Every conversation has filled every window (the steady decode state): the
                # divisors are those of full windows, one vector for all rows; divided in
                # float64 and rounded to float32 once, as the assignment below does.
                if self.sum_rows.__class__ is slice:
                    np.divide(sums.T, self.full_divisors_t, out=out[self.sum_rows])
                else:
                    out[self.sum_rows] = (sums / self.full_divisors).T
            else:
                counts = self._counts(seen, rows)
                out[self.sum_rows] = (sums / self.divisors[self.bases + counts]).T
        for t, first, last, maximum in self.extrema:
            carried = history[:, first:last]
            if maximum:
                out[t] = np.maximum(_MAX(carried, axis=1), x[t]) if last > first else x[t]
            else:
                out[t] = np.minimum(_MIN(carried, axis=1), x[t]) if last > first else x[t]
        for t, oldest, counted, n in self.deltas:
            change = x[t] - history[:, oldest]
            out[t] = np.where(seen[:, counted] >= n - 1, change, np.float32(0.0))
        # ``updated`` holds the history shifted by one column (``_WaveTemporal``): put each
        # function's newest value last (cummax keeps its running maximum instead).
        if self.has_newest:
            updated[:, self.newest_to] = x[self.newest_from].T
        if len(self.cummax_to):
            updated[:, self.cummax_to] = out[self.cummax_from].T
        return out

    def _counts(self, seen: np.ndarray, rows: int) -> np.ndarray:
        """Tokens in each window, this one included: [S, sum functions]."""
        if not seen.shape[1]:
            return np.ones((rows, len(self.sums)), dtype=np.int64)
        return np.minimum(seen[:, self.counted] + 1, self.windows)


def _index(positions: list[int], strided: bool = False) -> slice | np.ndarray:
    """Rows to pick: a slice (a view) when they are consecutive (or, with ``strided``,
    evenly spaced, such as the last column of each of several windows of one length), else
    an index array."""
    first = positions[0] if positions else 0
    if positions == list(range(first, first + len(positions))):
        return slice(first, first + len(positions))
    step = positions[1] - first if len(positions) > 1 else 0
    if strided and step > 0 and positions == list(range(first, positions[-1] + 1, step)):
        return slice(first, positions[-1] + 1, step)
    return np.array(positions, dtype=np.int64)


def _firing(
    rule: Rule,
    sl: SequenceSlice,
    position: int,
    row: int,
    value: float,
    request_id: str | None = None,
    in_batch: bool = True,
) -> Firing:
    """``rule``'s firing at ``position`` (batch ``row``) of ``sl``'s conversation, under
    ``request_id`` (default: the slice's)."""
    if request_id is None:
        request_id = sl.request_id
    fields = {
        "value": value,
        "position": position,
        "rule": rule.name,
        "conversation_id": sl.conversation_id,
        "request_id": request_id,
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
        request_id=request_id,
        position=position,
        row=row,
        value=value,
        labels=dict(rule.labels),
        message=_render(rule.output, fields),
        actions=rule.actions,
        annotations={name: _render(text, fields) for name, text in rule.annotations.items()},
        scope=sl.scope,
        in_batch=in_batch,
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
