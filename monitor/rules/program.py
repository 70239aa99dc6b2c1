"""A rule set compiled into one program over all its rules, evaluated with numpy.

Each rule's condition is already a flat list of instructions (``expressions.compile_condition``).
Here the lists of all enabled rules are merged into one, with identical sub-expressions shared
across rules, and every instruction becomes a small closure over a numpy kernel. A decode step
is a vector of one value per conversation (64 or so), so what costs is the number of calls, not
the arithmetic: numpy's per-call cost is a fraction of torch's, and a merged program makes each
shared feature, constant, comparison or temporal function one call for all rules.

Temporal functions need per-conversation state; ``TemporalSlot`` says where a function's state
lives in the engine's single history array, and the engine computes them (``temporal`` callback).

A sub-expression that depends on a temporal function is only shared between rules of the same
scope: a ``request``-scoped rolling mean restarts with each request, a conversation-scoped one
does not, so the same text has different values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from monitor.rules.expressions import FUNCTIONS, MAX_WINDOW, Instr
from monitor.rules.model import Rule

TemporalKey = tuple[str, str]  # (scope, expression digest)
Value = Any  # a numpy array of one value per row, or a numpy scalar (constants)

# "Empty" values a window starts from: neutral for the function, so history before the first
# token never wins a max or adds to a sum.
_FILL = {"rolling_max": float("-inf"), "rolling_min": float("inf"), "cummax": float("-inf")}
COUNTED = frozenset({"rolling_mean", "ewma", "delta"})  # need a tokens-seen count
SUMS = frozenset({"rolling_sum", "count_over", "rolling_mean", "ewma"})  # empty value 0


def window(kind: str, param: tuple[float, ...]) -> int:
    """Tokens of history a temporal function looks at (including the current one)."""
    if kind == "cummax":
        return 1
    if kind == "ewma":
        # Weights below 1e-4 of the newest are dropped: a finite window keeps ewma exactly
        # chunk-invariant, which a recursive update carried in float32 would not be.
        return min(MAX_WINDOW, int(param[0] * 13.3) + 1)
    return int(param[0]) + (1 if kind == "delta" else 0)


@dataclass(frozen=True)
class TemporalSlot:
    """One temporal (scope, expression): its function and where its state lives.

    ``offset``/``kept`` are its columns in the engine's history array (the last ``kept``
    inputs; for ``cummax`` the running maximum); ``counted`` is its column in the tokens-seen
    array, or -1 when the function does not need one.
    """

    key: TemporalKey
    kind: str
    param: tuple[float, ...]
    window: int
    offset: int
    kept: int
    fill: float
    counted: int


TemporalFn = Callable[[list[TemporalSlot], list[Value]], list[np.ndarray]]


def _binary(fn: Callable[[Value, Value], Value], a: int, b: int) -> Callable[[list], Value]:
    return lambda r: fn(r[a], r[b])


def _unary(fn: Callable[[Value], Value], a: int) -> Callable[[list], Value]:
    return lambda r: fn(r[a])


def _sigmoid(x: Value) -> Value:
    # In float64 then rounded, as the torch kernel does: a condition must not depend on how
    # many tokens shared the batch, and a float64 result rounded to float32 is stable.
    return (1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))).astype(np.float32)


def _clip(a: int, lo: int, hi: int) -> Callable[[list], Value]:
    return lambda r: np.minimum(np.maximum(r[a], r[lo]), r[hi])


_BINARY = {
    "max": np.maximum,
    "min": np.minimum,
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "div": np.divide,
    "and": np.logical_and,
    "or": np.logical_or,
    "gt": np.greater,
    "ge": np.greater_equal,
    "lt": np.less,
    "le": np.less_equal,
    "eq": np.equal,
    "ne": np.not_equal,
}
_UNARY = {"neg": np.negative, "not": np.logical_not, "abs": np.abs, "sigmoid": _sigmoid}


class Program:
    """All enabled rules of a rule set as one straight-line program.

    ``run`` fills one register per merged instruction and returns every rule's condition and
    value over the wave's rows: ``[rules, rows]`` arrays.
    """

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.kinds: list[str] = []
        self.temporal: list[TemporalSlot] = []
        self.features: dict[str, int] = {}  # feature name -> register
        self.constants: dict[int, np.float32] = {}
        self.conditions: list[int] = []
        self.values: list[int] = []
        # (register, kernel) in dependency order; kernel None for a temporal function.
        self._code: list[tuple[int, Callable[[list], Value] | None]] = []
        self._temporal_at: dict[int, tuple[int, int]] = {}  # register -> (slot, argument)
        self._reads: dict[int, list[int]] = {}  # register -> registers it reads
        index: dict[tuple[str, str], int] = {}
        width = counted = 0
        self.sum_width = 0  # history columns of the sum-type functions (placed first)
        for rule in rules:
            local: list[int] = []
            stateful: list[bool] = []
            for ins in rule.condition.program:
                spec = FUNCTIONS.get(ins.kind)
                is_temporal = spec is not None and spec.temporal
                depends = is_temporal or any(stateful[a] for a in ins.args)
                key = (rule.scope if depends else "", ins.key)
                reg = index.get(key)
                if reg is None:
                    reg = index[key] = len(self.kinds)
                    self.kinds.append(ins.kind)
                    args = [local[a] for a in ins.args]
                    if is_temporal:
                        slot = self._slot((rule.scope, ins.key), ins, width, counted)
                        width += slot.kept
                        counted += slot.counted >= 0
                        self._code.append((reg, None))
                        self._temporal_at[reg] = (len(self.temporal), args[0])
                        self.temporal.append(slot)
                    else:
                        self._compile(reg, ins, args)
                local.append(reg)
                stateful.append(depends)
            self.conditions.append(local[rule.condition.result])
            self.values.append(local[rule.condition.value])
        self._place()
        self.counted_width = counted
        self._plan()

    def _place(self) -> None:
        """History columns: those of the sum-type functions (whose empty value is 0) first,
        so that a decode step can sum them all with one matrix product over a block that
        holds no infinities of the max/min functions' empty values."""
        order = sorted(range(len(self.temporal)), key=lambda i: self.temporal[i].kind not in SUMS)
        offset = 0
        for i in order:
            self.temporal[i] = dataclasses.replace(self.temporal[i], offset=offset)
            offset += self.temporal[i].kept
            if self.temporal[i].kind in SUMS:
                self.sum_width = offset
        self.history_width = offset

    def _plan(self) -> None:
        """Order the program in stages so that the temporal functions of a stage are computed
        together (one call for all of them: a decode step does them as one array operation).

        A register's stage is the number of temporal functions on its longest path of
        inputs; stage s runs its plain instructions, then the temporal functions of s + 1,
        whose inputs all have stage s or less."""
        stage: dict[int, int] = {}
        for reg in self.constants:
            stage[reg] = 0
        for reg in self.features.values():
            stage[reg] = 0
        plain: dict[int, list[tuple[int, Callable[[list], Value]]]] = {}
        temporal: dict[int, list[int]] = {}
        for reg, fn in self._code:
            if fn is None:
                _, arg = self._temporal_at[reg]
                stage[reg] = stage[arg] + 1
                temporal.setdefault(stage[reg], []).append(reg)
            else:
                stage[reg] = max((stage[a] for a in self._reads[reg]), default=0)
                plain.setdefault(stage[reg], []).append((reg, fn))
        last = max(stage.values(), default=0)
        self.stages: list[tuple[list[tuple[int, Callable[[list], Value]]], list[int]]] = [
            (plain.get(s, []), temporal.get(s + 1, [])) for s in range(last + 1)
        ]

    @staticmethod
    def _slot(key: TemporalKey, ins: Instr, offset: int, counted: int) -> TemporalSlot:
        n = window(ins.kind, ins.param)
        kept = n if ins.kind == "cummax" else n - 1
        return TemporalSlot(
            key=key,
            kind=ins.kind,
            param=tuple(ins.param),
            window=n,
            offset=offset,
            kept=kept,
            fill=_FILL.get(ins.kind, 0.0),
            counted=counted if ins.kind in COUNTED else -1,
        )

    def _compile(self, reg: int, ins: Instr, args: list[int]) -> None:
        kind = ins.kind
        self._reads[reg] = list(args)
        if kind == "const":
            self.constants[reg] = np.float32(ins.param)
        elif kind == "feature":
            self.features[ins.param] = reg
        elif kind in _UNARY:
            self._code.append((reg, _unary(_UNARY[kind], args[0])))
        elif kind == "clip":
            self._code.append((reg, _clip(*args)))
        elif kind in _BINARY:
            fn = _BINARY[kind]
            first, *rest = args
            # Variadic max/min fold left to right, as the torch kernels do.
            for i, arg in enumerate(rest):
                step = _binary(fn, first, arg)
                if i < len(rest) - 1:
                    # Intermediate folds of a variadic call get private registers.
                    tmp = len(self.kinds)
                    self.kinds.append(kind)
                    self._reads[tmp] = [first, arg]
                    self._code.append((tmp, step))
                    first = tmp
                else:
                    self._code.append((reg, step))
        else:  # pragma: no cover - the resolver only produces the kinds above
            raise ValueError(f"no kernel for {kind!r}")

    def run(
        self, inputs: Mapping[str, np.ndarray], rows: int, temporal: TemporalFn
    ) -> tuple[np.ndarray, np.ndarray]:
        """(conditions [rules, rows] bool, values [rules, rows] float32).

        ``temporal(slots, inputs)`` computes a stage's temporal functions (and advances their
        state) from their input values: one array per slot.
        """
        regs: list[Value] = [None] * len(self.kinds)
        for reg, constant in self.constants.items():
            regs[reg] = constant
        for name, reg in self.features.items():
            regs[reg] = inputs[name]
        temporal_at, slots = self._temporal_at, self.temporal
        with np.errstate(all="ignore"):  # x / 0 is inf and inf - inf is NaN, as in torch
            for plain, stateful in self.stages:
                for reg, fn in plain:
                    regs[reg] = fn(regs)
                if stateful:
                    at = [temporal_at[reg] for reg in stateful]
                    outs = temporal([slots[i] for i, _ in at], [regs[a] for _, a in at])
                    for reg, out in zip(stateful, outs, strict=True):
                        regs[reg] = out
        conditions = np.empty((len(self.conditions), rows), dtype=bool)
        values = np.empty((len(self.values), rows), dtype=np.float32)
        for k, (c, v) in enumerate(zip(self.conditions, self.values, strict=True)):
            conditions[k] = regs[c]  # a constant broadcasts over the rows
            values[k] = regs[v]
        return conditions, values


def compile_rules(rules: Sequence[Rule]) -> Program:
    """Merge the conditions of ``rules`` into one ``Program``."""
    return Program(rules)
