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
scope and the same ``window_roles``: a ``request``-scoped rolling mean restarts with each
request, a conversation-scoped one does not, and a window over the user's tokens alone is not
one over every token, so the same text has different values.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from monitor.rules.expressions import FUNCTIONS, MAX_WINDOW, Instr
from monitor.rules.model import Rule

TemporalKey = tuple[str, tuple[str, ...], str]  # (scope, window roles, expression digest)
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
    """One temporal (scope, window roles, expression): its function and where its state lives.

    ``offset``/``kept`` are its columns in the engine's history array (the last ``kept``
    inputs; for ``cummax`` the running maximum); ``counted`` is its column in the tokens-seen
    array, or -1 when the function does not need one. ``roles`` (empty: every role) are the
    roles whose tokens it takes in; such a function keeps one more input (``kept`` is its whole
    window) so that at a token of another role its value at the roles' last token can be
    recomputed from its state alone.
    """

    key: TemporalKey
    kind: str
    param: tuple[float, ...]
    window: int
    offset: int
    kept: int
    fill: float
    counted: int
    roles: frozenset[str] = frozenset()


TemporalFn = Callable[[list[TemporalSlot], np.ndarray], np.ndarray]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # In float64 then rounded, as the torch kernel does: a condition must not depend on how
    # many tokens shared the batch, and a float64 result rounded to float32 is stable.
    return (1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))).astype(np.float32)


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
_UNARY = {"neg": np.negative, "not": np.logical_not, "abs": np.abs}


@dataclass
class _Node:
    """One merged instruction before registers are laid out."""

    kind: str
    args: list[int]  # nodes it reads
    param: Any = None
    slot: int = -1  # index into ``Program.temporal`` for a temporal function


Rows = slice | np.ndarray  # which rows of the register file an operand is


def _rows(registers: Sequence[int]) -> Rows:
    """A slice (a view, no copy) when the registers are consecutive, evenly spaced (every
    other feature of a rule set that alternates plain and temporal conditions) or all the
    same one (a broadcast row, e.g. one constant compared with many values); else an index
    array (read with ``_read``)."""
    first = registers[0]
    if list(registers) == list(range(first, first + len(registers))):
        return slice(first, first + len(registers))
    if registers.count(first) == len(registers):
        return slice(first, first + 1)
    step = registers[1] - first
    if step > 0 and list(registers) == list(range(first, registers[-1] + 1, step)):
        return slice(first, registers[-1] + 1, step)
    return np.array(registers, dtype=np.intp)


def _read(r: np.ndarray, rows: Rows) -> np.ndarray:
    """Rows of the register file: a view for a slice; for an index array ``take``, which
    costs about half of the equivalent fancy index on a decode step's small arrays."""
    return r[rows] if rows.__class__ is slice else r.take(rows, axis=0)


@dataclass(frozen=True)
class _Group:
    """Instructions of one kind whose operands are all ready: one numpy call for all of
    them, over the rows ``out`` of the register file."""

    kind: str
    out: slice
    args: tuple[Rows, ...]


class Program:
    """All enabled rules of a rule set as one program over a register file.

    Every merged instruction has one row of a ``[registers, rows]`` float32 array (booleans
    are 0 and 1: the expression language never does arithmetic on them, and numpy's logical
    functions read any non-zero as true). Instructions of the same kind whose operands are
    ready are laid out in consecutive rows and run as one numpy call (``_Group``): twenty
    rules comparing twenty features with thresholds are one ``np.greater``, not twenty. A
    decode step is ~64 values per row, so the number of calls is what costs, not the
    arithmetic.

    ``run`` returns every rule's condition and value over the wave's rows: ``[rules, rows]``.
    """

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.temporal: list[TemporalSlot] = []
        nodes: list[_Node] = []
        index: dict[tuple[str, tuple[str, ...], str], int] = {}
        width = counted = 0
        self.sum_width = 0  # history columns of the sum-type functions (placed first)
        cond_nodes: list[int] = []
        value_nodes: list[int] = []
        for rule in rules:
            local: list[int] = []
            stateful: list[bool] = []
            for ins in rule.condition.program:
                spec = FUNCTIONS.get(ins.kind)
                is_temporal = spec is not None and spec.temporal
                depends = is_temporal or any(stateful[a] for a in ins.args)
                key = (rule.scope if depends else "", rule.window_key if depends else (), ins.key)
                node = index.get(key)
                if node is None:
                    args = [local[a] for a in ins.args]
                    if is_temporal:
                        slot = self._slot(key, ins, width, counted)  # type: ignore[arg-type]
                        width += slot.kept
                        counted += slot.counted >= 0
                        nodes.append(_Node(ins.kind, args, slot=len(self.temporal)))
                        self.temporal.append(slot)
                    elif ins.kind in ("max", "min") and len(args) > 2:
                        # Variadic max/min fold left to right, as the torch kernels do;
                        # intermediate folds are nodes of their own.
                        first = args[0]
                        for arg in args[1:-1]:
                            nodes.append(_Node(ins.kind, [first, arg]))
                            first = len(nodes) - 1
                        nodes.append(_Node(ins.kind, [first, args[-1]]))
                    else:
                        nodes.append(_Node(ins.kind, args, ins.param))
                    node = index[key] = len(nodes) - 1
                local.append(node)
                stateful.append(depends)
            cond_nodes.append(local[rule.condition.result])
            value_nodes.append(local[rule.condition.value])
        self._place()
        self.counted_width = counted
        self._layout(nodes, cond_nodes, value_nodes)

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

    def _layout(self, nodes: list[_Node], cond_nodes: list[int], value_nodes: list[int]) -> None:
        """Registers: features, then constants, then stage by stage each group of plain
        instructions and the stage's temporal functions, each in consecutive rows.

        A node's stage is the number of temporal functions on its longest path of inputs;
        stage s runs its plain instructions, then the temporal functions of s + 1, whose
        inputs all have stage s or less. Within a stage a plain node's level is one more
        than its deepest plain input of the same stage; a group is (stage, level, kind)."""
        stage = [0] * len(nodes)
        level = [0] * len(nodes)
        for n, node in enumerate(nodes):  # nodes come in dependency order
            if node.kind in ("feature", "const"):
                continue
            if node.slot >= 0:
                stage[n] = stage[node.args[0]] + 1
                continue
            stage[n] = max(stage[a] for a in node.args)
            level[n] = 1 + max((level[a] for a in node.args if stage[a] == stage[n]), default=0)
        features = [n for n, node in enumerate(nodes) if node.kind == "feature"]
        constants = [n for n, node in enumerate(nodes) if node.kind == "const"]
        register = [-1] * len(nodes)
        for n in (*features, *constants):
            register[n] = features.index(n) if n in features else len(features) + constants.index(n)
        self.feature_names: list[str] = [nodes[n].param for n in features]
        self.features = {name: i for i, name in enumerate(self.feature_names)}
        self._constants = np.array(
            [[np.float32(nodes[n].param)] for n in constants], dtype=np.float32
        ).reshape(len(constants), 1)
        groups: dict[tuple[int, int, str], list[int]] = {}
        temporal: dict[int, list[int]] = {}
        for n, node in enumerate(nodes):
            if node.kind in ("feature", "const"):
                continue
            if node.slot >= 0:
                temporal.setdefault(stage[n], []).append(n)
            else:
                groups.setdefault((stage[n], level[n], node.kind), []).append(n)
        last = max(stage, default=0)
        next_register = len(features) + len(constants)
        self.stages: list[tuple[list[_Group], tuple[slice, Rows, list[TemporalSlot]] | None]] = []
        for s in range(last + 1):
            plain: list[_Group] = []
            for key in sorted(k for k in groups if k[0] == s):
                members = groups[key]
                out = slice(next_register, next_register + len(members))
                for n in members:
                    register[n] = next_register
                    next_register += 1
                arity = len(nodes[members[0]].args)
                args = tuple(
                    _rows([register[nodes[n].args[i]] for n in members]) for i in range(arity)
                )
                plain.append(_Group(key[2], out, args))
            stateful = None
            if temporal.get(s + 1):
                members = temporal[s + 1]
                out = slice(next_register, next_register + len(members))
                for n in members:
                    register[n] = next_register
                    next_register += 1
                reads = [register[nodes[n].args[0]] for n in members]
                inputs = _rows(reads)
                if isinstance(inputs, slice) and len(range(inputs.stop)[inputs]) < len(reads):
                    # Functions of the same value: one input row each, not a broadcast.
                    inputs = np.array(reads, dtype=np.intp)
                stateful = (out, inputs, [self.temporal[nodes[n].slot] for n in members])
            self.stages.append((plain, stateful))
        self.registers = next_register
        self.conditions = [register[n] for n in cond_nodes]
        self.values = [register[n] for n in value_nodes]
        self._conditions = _rows(self.conditions) if cond_nodes else slice(0, 0)
        self._values = _rows(self.values) if value_nodes else slice(0, 0)
        self._plans: dict[int, StepPlan] = {}  # by row count (``plan``)

    @staticmethod
    def _slot(key: TemporalKey, ins: Instr, offset: int, counted: int) -> TemporalSlot:
        n = window(ins.kind, ins.param)
        roles = frozenset(key[1])
        kept = n if ins.kind == "cummax" or roles else n - 1
        return TemporalSlot(
            key=key,
            kind=ins.kind,
            param=tuple(ins.param),
            window=n,
            offset=offset,
            kept=kept,
            fill=_FILL.get(ins.kind, 0.0),
            counted=counted if ins.kind in COUNTED else -1,
            roles=roles,
        )

    def allocate(self, rows: int) -> np.ndarray:
        """A register file for ``rows`` tokens with the constants filled in; the caller puts
        feature ``feature_names[i]`` in row ``i`` and then calls ``run``."""
        registers = np.empty((self.registers, rows), dtype=np.float32)
        if len(self._constants):
            first = len(self.feature_names)
            registers[first : first + len(self._constants)] = self._constants
        return registers

    def plan(self, rows: int) -> StepPlan:
        """The ``StepPlan`` for ``rows`` rows, kept for the next call with as many (a decode
        step's row count rarely changes). Not for concurrent use: its register file is one."""
        plan = self._plans.get(rows)
        if plan is None:
            if len(self._plans) >= _PLANS_KEPT:
                self._plans.clear()
            plan = self._plans[rows] = StepPlan(self, rows)
        return plan

    def run(self, registers: np.ndarray, temporal: TemporalFn) -> tuple[np.ndarray, np.ndarray]:
        """(conditions [rules, rows] bool, values [rules, rows] float32) from a register
        file made by ``allocate`` with the features filled in.

        ``temporal(slots, inputs)`` computes a stage's temporal functions (and advances their
        state) from their input values ``[slots, rows]``: one row of output per slot.
        """
        r = registers
        with np.errstate(all="ignore"):  # x / 0 is inf and inf - inf is NaN, as in torch
            for plain, stateful in self.stages:
                for group in plain:
                    _run_group(r, group)
                if stateful is not None:
                    out, inputs, slots = stateful
                    r[out] = temporal(slots, _read(r, inputs))
        return self.results(r)

    def results(self, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(conditions, values) ``[rules, rows]`` read from a register file that has run:
        new arrays, not views of it."""
        rules = len(self.conditions)
        conditions = _read(r, self._conditions) != 0
        values = _read(r, self._values)
        # One register shared by every rule is a one-row slice: broadcast it to each rule.
        if conditions.shape[0] != rules:
            conditions = np.broadcast_to(conditions, (rules, r.shape[1])).copy()
        if values.shape[0] != rules:
            values = np.broadcast_to(values, (rules, r.shape[1])).copy()
        return conditions, values


_PLANS_KEPT = 8  # row counts whose plans a program keeps at once

# ``np.errstate(all="ignore")`` made once: entering a new one on every step costs as much as
# the step's arithmetic when the caches are cold (it builds its error state each time). The
# context variable numpy keeps it in is private: without it (another numpy), ``errstate``.
try:
    from numpy._core._ufunc_config import _extobj_contextvar as _ERROR_STATE

    with np.errstate(all="ignore"):
        _IGNORE_ERRORS = _ERROR_STATE.get()
except (ImportError, AttributeError):  # pragma: no cover - numpy < 2 or a changed layout
    _ERROR_STATE = None


class StepPlan:
    """``Program.run`` for one row count, made once and run step after step.

    The register file is kept (its constants written once), and every group's operands and
    output are views of it made here, so a group is one prepared numpy call (two for
    ``clip``), plus one ``take`` into a kept buffer for each operand that is not a slice.
    ``Program.run`` finds the group's kernel and slices the register file for every operand
    on every call: on a decode step's 64-value rows that Python work costs as much as the
    arithmetic. The values computed are the same, by the same numpy functions.

    Use: write the features into rows ``[0, len(feature_names))`` of ``registers``, then
    ``run``. One caller at a time (the engine holds its lock).
    """

    def __init__(self, program: Program, rows: int) -> None:
        self.program = program
        self.registers = r = program.allocate(rows)
        self._stages: list[tuple[list[Callable[[], object]], tuple | None]] = []
        for plain, stateful in program.stages:
            ops: list[Callable[[], object]] = []
            for group in plain:
                ops.extend(self._group(group))
            temporal = None
            if stateful is not None:
                out, inputs, slots = stateful
                fill: list[Callable[[], object]] = []
                temporal = (r[out], self._operand(inputs, fill), fill, slots)
            self._stages.append((ops, temporal))

    def _operand(self, rows: Rows, ops: list[Callable[[], object]]) -> np.ndarray:
        """A view of the registers for a slice; for an index array a kept buffer, filled by
        a ``take`` appended to ``ops`` (indices are in range: ``clip`` skips the checks'
        buffering)."""
        r = self.registers
        if rows.__class__ is slice:
            return r[rows]
        buffer = np.empty((len(rows), r.shape[1]), dtype=r.dtype)
        ops.append(functools.partial(r.take, rows, 0, buffer, "clip"))
        return buffer

    def _group(self, group: _Group) -> list[Callable[[], object]]:
        ops: list[Callable[[], object]] = []
        args = [self._operand(rows, ops) for rows in group.args]
        out = self.registers[group.out]
        kind = group.kind
        fn = _BINARY.get(kind)
        if fn is not None:
            ops.append(functools.partial(fn, args[0], args[1], out=out))
        elif kind == "sigmoid":
            x = args[0]

            def sigmoid() -> None:
                out[...] = _sigmoid(x)

            ops.append(sigmoid)
        elif kind == "clip":
            # max then min, as ``_run_group``: the same float32 values, written into ``out``.
            ops.append(functools.partial(np.maximum, args[0], args[1], out=out))
            ops.append(functools.partial(np.minimum, out, args[2], out=out))
        elif kind in _UNARY:
            ops.append(functools.partial(_UNARY[kind], args[0], out=out))
        else:  # pragma: no cover - the resolver only produces the kinds above
            raise ValueError(f"no kernel for {kind!r}")
        return ops

    def run(self, temporal: TemporalFn) -> tuple[np.ndarray, np.ndarray]:
        """As ``Program.run`` on ``registers``: (conditions, values), new arrays."""
        conditions = self.run_conditions(temporal)
        values = self.values()
        if values.base is self.registers:  # a view: the registers are written again
            values = values.copy()
        return conditions, values

    def run_conditions(self, temporal: TemporalFn, into: bool = False) -> np.ndarray:
        """``run``'s conditions (a new array) alone: the values are read by ``values``, only
        when some rule fired (the usual decode step reads none). ``into``: ``temporal``
        takes a third argument, the registers its values go to, and may write them there
        itself (returning that array) rather than return new ones to be copied in."""
        if _ERROR_STATE is None:  # pragma: no cover - see _ERROR_STATE
            with np.errstate(all="ignore"):
                self._run(temporal, into)
        else:
            # x / 0 is inf and inf - inf is NaN, as in torch
            token = _ERROR_STATE.set(_IGNORE_ERRORS)
            try:
                self._run(temporal, into)
            finally:
                _ERROR_STATE.reset(token)
        program = self.program
        conditions = _read(self.registers, program._conditions) != 0
        if conditions.shape[0] != len(program.conditions):  # one register shared by all
            shape = (len(program.conditions), self.registers.shape[1])
            conditions = np.broadcast_to(conditions, shape).copy()
        return conditions

    def values(self) -> np.ndarray:
        """The rules' values ``[rules, rows]`` of the last run (a view of the registers when
        they are a slice of them: valid until the next run)."""
        program = self.program
        values = _read(self.registers, program._values)
        if values.shape[0] != len(program.values):  # one register shared by all
            values = np.broadcast_to(values, (len(program.values), values.shape[1])).copy()
        return values

    def _run(self, temporal: TemporalFn, into: bool) -> None:
        for ops, stateful in self._stages:
            for op in ops:
                op()
            if stateful is not None:
                out, inputs, fill, slots = stateful
                for op in fill:
                    op()
                if into:
                    done = temporal(slots, inputs, out)  # type: ignore[call-arg]
                    if done is not out:
                        out[...] = done
                else:
                    out[...] = temporal(slots, inputs)


def _run_group(r: np.ndarray, group: _Group) -> None:
    kind, out, args = group.kind, r[group.out], group.args
    fn = _BINARY.get(kind)
    if fn is not None:
        fn(_read(r, args[0]), _read(r, args[1]), out=out)
    elif kind == "sigmoid":
        out[...] = _sigmoid(_read(r, args[0]))
    elif kind == "clip":
        np.minimum(np.maximum(_read(r, args[0]), _read(r, args[1])), _read(r, args[2]), out=out)
    elif kind in _UNARY:
        _UNARY[kind](_read(r, args[0]), out=out)
    else:  # pragma: no cover - the resolver only produces the kinds above
        raise ValueError(f"no kernel for {kind!r}")


def compile_rules(rules: Sequence[Rule]) -> Program:
    """Merge the conditions of ``rules`` into one ``Program``."""
    return Program(rules)
