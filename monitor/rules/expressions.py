"""The rule expression language: tokenizer, Pratt parser, name resolution, type check, compiler.

Pipeline: text -> tokens -> AST (every node keeps its source location) -> typed IR (names
resolved to qualified features, macros expanded, types checked) -> a flat program of torch
kernels. No ``eval``: the only things an expression can do are the operators and functions in
``FUNCTIONS``.

Temporal functions (``rolling_mean`` and friends) need per-conversation state that only the
engine has, so the program hands them to a ``temporal`` callback instead of computing them.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch

from monitor.rules.errors import ExpressionError, RuleIssue, SourceLocation

MAX_EXPRESSION_LENGTH = 4096
MAX_NESTING_DEPTH = 64
# Macro expansion can nest expressions inside each other; bound it separately so a chain of
# macros cannot exhaust the Python stack. Each level costs about four frames of the resolver,
# so this stays well inside Python's default limit of 1000 even when called from deep code.
MAX_EXPANSION_DEPTH = 128
MAX_WINDOW = 4096
MAX_HALFLIFE = 256.0

NUMBER = "number"
BOOLEAN = "boolean"
_ERROR = "error"  # a sub-expression already reported; suppresses follow-on errors

KEYWORDS = frozenset({"and", "or", "not"})
# `pooled(<alias>)`: the alias's feature pooled as its pack recorded (monitor/rules/pooling.py).
# Expanded at load into rolling_mean(<alias>, W), so it is no function the program runs.
POOLED = "pooled"
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


# --------------------------------------------------------------------------- source text


@dataclass(frozen=True)
class SourceText:
    """Expression text plus where it sits in its file, so offsets map to line:col.

    ``line_origins`` gives the file (line, col) of the first character of each text line for
    multi-line YAML scalars; ``()`` means only the start is known and everything maps to it.
    """

    text: str
    path: str = "<expr>"
    line: int = 1
    col: int = 1
    line_origins: tuple[tuple[int, int], ...] | None = None

    def locate(self, offset: int) -> SourceLocation:
        """The file location of character `offset` of the text."""
        if self.line_origins is None:
            return SourceLocation(self.path, self.line, self.col + offset)
        index = self.text.count("\n", 0, offset)
        if index >= len(self.line_origins):
            return SourceLocation(self.path, self.line, self.col)
        line, col = self.line_origins[index]
        return SourceLocation(
            self.path, line, col + offset - (self.text.rfind("\n", 0, offset) + 1)
        )

    @property
    def start(self) -> SourceLocation:
        """The file location of the text's first character."""
        return self.locate(0)


# --------------------------------------------------------------------------- tokens


@dataclass(frozen=True)
class Token:
    """One lexical token of an expression: its kind, text and offset in the source text."""

    kind: str  # 'num' | 'name' | 'kw' | 'op' | 'eof'
    text: str
    offset: int


_TOKEN = re.compile(
    r"(?P<ws>\s+)"
    r"|(?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<op>>=|<=|==|!=|[-+*/<>(),])"
)
_HINTS = {
    "=": "unexpected '=' (use '==' to compare)",
    "!": "unexpected '!' (use 'not')",
    "&": "unexpected '&' (use 'and')",
    "|": "unexpected '|' (use 'or')",
}


def tokenize(source: SourceText) -> list[Token]:
    """Split an expression into tokens; raises ExpressionError at the first bad character."""
    text = source.text
    if len(text) > MAX_EXPRESSION_LENGTH:
        _fail(
            source, 0, f"expression too long ({len(text)} characters, max {MAX_EXPRESSION_LENGTH})"
        )
    tokens: list[Token] = []
    pos = 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            char = text[pos]
            _fail(source, pos, _HINTS.get(char, f"unexpected character {char!r}"))
        kind = match.lastgroup or ""
        if kind == "num" and re.match(r"[A-Za-z0-9_.]", text[match.end() : match.end() + 1]):
            _fail(source, pos, f"malformed number {text[pos : match.end() + 1]!r}")
        if kind != "ws":
            word = match.group()
            tokens.append(Token("kw" if word in KEYWORDS else kind, word, pos))
        pos = match.end()
    tokens.append(Token("eof", "", len(text)))
    return tokens


def _fail(source: SourceText, offset: int, message: str) -> None:
    raise ExpressionError([source.locate(offset).issue(message)])


# --------------------------------------------------------------------------- AST


@dataclass(frozen=True, eq=False)
class Number:
    """A numeric literal."""

    value: float
    loc: SourceLocation


@dataclass(frozen=True, eq=False)
class Name:
    """A feature alias, qualified feature name, macro or list name, resolved later."""

    ident: str
    loc: SourceLocation


@dataclass(frozen=True, eq=False)
class Unary:
    """A unary minus or `not`."""

    op: str  # '-' | 'not'
    operand: Node
    loc: SourceLocation


@dataclass(frozen=True, eq=False)
class Arith:
    """A left-associative chain ``first op1 x1 op2 x2 ...`` of one precedence level.

    Chains are n-ary (not nested binary nodes) so a long sum does not make the tree deep.
    """

    first: Node
    rest: tuple[tuple[str, Node], ...]


@dataclass(frozen=True, eq=False)
class Compare:
    """A comparison of two operands."""

    op: str
    left: Node
    right: Node
    loc: SourceLocation  # of the operator


@dataclass(frozen=True, eq=False)
class BoolOp:
    """`and` / `or` over two or more operands."""

    op: str  # 'and' | 'or'
    operands: tuple[Node, ...]


@dataclass(frozen=True, eq=False)
class Call:
    """A function call such as `rolling_mean(x, 16)`."""

    func: str
    args: tuple[Node, ...]
    loc: SourceLocation  # of the function name


Node = Union[Number, Name, Unary, Arith, Compare, BoolOp, Call]  # noqa: UP007 (runtime alias)


def start_of(node: Node) -> SourceLocation:
    """Location of the first character of a node's text."""
    while isinstance(node, Arith | Compare | BoolOp):
        node = (
            node.first
            if isinstance(node, Arith)
            else (node.left if isinstance(node, Compare) else node.operands[0])
        )
    return node.loc


def show(node: Node) -> str:
    """Fully parenthesised rendering; tests use it to pin down precedence and associativity."""
    if isinstance(node, Number):
        return repr(node.value)
    if isinstance(node, Name):
        return node.ident
    if isinstance(node, Unary):
        return f"({node.op}{' ' if node.op == 'not' else ''}{show(node.operand)})"
    if isinstance(node, Arith):
        text = show(node.first)
        for op, operand in node.rest:
            text = f"({text} {op} {show(operand)})"
        return text
    if isinstance(node, Compare):
        return f"({show(node.left)} {node.op} {show(node.right)})"
    if isinstance(node, BoolOp):
        return "(" + f" {node.op} ".join(show(x) for x in node.operands) + ")"
    return f"{node.func}(" + ", ".join(show(x) for x in node.args) + ")"


# --------------------------------------------------------------------------- parser

_COMPARISONS = (">", ">=", "<", "<=", "==", "!=")
_BINDING = {"or": 1, "and": 2, **dict.fromkeys(_COMPARISONS, 4), "+": 5, "-": 5, "*": 6, "/": 6}
_NOT_POWER = 3  # `not a > 1` is `not (a > 1)`, `not a and b` is `(not a) and b`
_NEG_POWER = 7  # `-a * b` is `(-a) * b`


class _Parser:
    """Pratt parser; recursion happens only per nesting level, which is bounded."""

    def __init__(self, source: SourceText) -> None:
        self.source = source
        self.tokens = tokenize(source)
        self.index = 0
        self.depth = 0

    @property
    def peek(self) -> Token:
        return self.tokens[self.index]

    def advance(self) -> Token:
        token = self.tokens[self.index]
        self.index = min(self.index + 1, len(self.tokens) - 1)
        return token

    def loc(self, token: Token) -> SourceLocation:
        return self.source.locate(token.offset)

    def error(self, token: Token, message: str | None = None) -> ExpressionError:
        if message is None:
            what = "end of expression" if token.kind == "eof" else repr(token.text)
            message = f"unexpected {what}"
        return ExpressionError([self.loc(token).issue(message)])

    def parse(self) -> Node:
        if self.peek.kind == "eof":
            raise self.error(self.peek, "empty expression")
        node = self.expression(0)
        if self.peek.kind != "eof":
            raise self.error(self.peek)
        return node

    def expression(self, min_power: int) -> Node:
        left = self.prefix()
        while True:
            token = self.peek
            power = _BINDING.get(token.text) if token.kind in ("op", "kw") else None
            if power is None or power <= min_power:
                return left
            self.advance()
            left = _combine(token, left, self.expression(power), self.loc(token))

    def prefix(self) -> Node:
        token = self.advance()
        if token.kind == "num":
            return self.number(token)
        if token.kind == "name":
            return self.call(token) if self.peek.text == "(" else Name(token.text, self.loc(token))
        if token.text in ("(", "-", "not"):
            return self.nested(token)
        raise self.error(token)

    def number(self, token: Token) -> Number:
        value = float(token.text)
        if math.isinf(value):
            raise self.error(token, f"number {token.text!r} is out of range")
        return Number(value, self.loc(token))

    def nested(self, token: Token) -> Node:
        self.enter(token)
        if token.text == "(":
            node = self.expression(0)
            self.expect(")")
        elif token.text == "-":
            node = Unary("-", self.expression(_NEG_POWER), self.loc(token))
        else:
            node = Unary("not", self.expression(_NOT_POWER), self.loc(token))
        self.depth -= 1
        return node

    def call(self, name: Token) -> Call:
        self.enter(self.advance())
        args: list[Node] = []
        if self.peek.text != ")":
            args.append(self.expression(0))
            while self.peek.text == ",":
                self.advance()
                args.append(self.expression(0))
        self.expect(")")
        self.depth -= 1
        return Call(name.text, tuple(args), self.loc(name))

    def enter(self, token: Token) -> None:
        self.depth += 1
        if self.depth > MAX_NESTING_DEPTH:
            raise self.error(token, f"expression nested too deeply (max depth {MAX_NESTING_DEPTH})")

    def expect(self, text: str) -> None:
        token = self.advance()
        if token.text != text or token.kind == "eof":
            raise self.error(
                token,
                f"expected {text!r}, found "
                + ("end of expression" if token.kind == "eof" else repr(token.text)),
            )


def _combine(token: Token, left: Node, right: Node, loc: SourceLocation) -> Node:
    op = token.text
    if op in ("and", "or"):
        if isinstance(left, BoolOp) and left.op == op:
            return BoolOp(op, (*left.operands, right))
        return BoolOp(op, (left, right))
    if op in _COMPARISONS:
        return Compare(op, left, right, loc)
    # Extending a chain of the same level is exactly left associativity.
    if isinstance(left, Arith) and _BINDING[left.rest[0][0]] == _BINDING[op]:
        return Arith(left.first, (*left.rest, (op, right)))
    return Arith(left, ((op, right),))


def parse(source: SourceText | str) -> Node:
    """Parse an expression into an AST; raises ExpressionError with a located issue."""
    if isinstance(source, str):
        source = SourceText(source)
    return _Parser(source).parse()


# --------------------------------------------------------------------------- functions


@dataclass(frozen=True)
class FunctionSpec:
    """Signature of a built-in. ``params`` are trailing literal arguments (windows, half-lives)."""

    name: str
    args: tuple[str, ...]  # types of the expression arguments
    variadic: bool = False  # args[0] repeated, at least two
    params: tuple[str, ...] = ()  # 'window' (integer 1..MAX_WINDOW) | 'halflife'
    temporal: bool = False


FUNCTIONS: dict[str, FunctionSpec] = {
    spec.name: spec
    for spec in (
        FunctionSpec("max", (NUMBER,), variadic=True),
        FunctionSpec("min", (NUMBER,), variadic=True),
        FunctionSpec("abs", (NUMBER,)),
        FunctionSpec("sigmoid", (NUMBER,)),
        FunctionSpec("clip", (NUMBER, NUMBER, NUMBER)),
        FunctionSpec("rolling_mean", (NUMBER,), params=("window",), temporal=True),
        FunctionSpec("rolling_sum", (NUMBER,), params=("window",), temporal=True),
        FunctionSpec("rolling_max", (NUMBER,), params=("window",), temporal=True),
        FunctionSpec("rolling_min", (NUMBER,), params=("window",), temporal=True),
        FunctionSpec("count_over", (BOOLEAN,), params=("window",), temporal=True),
        FunctionSpec("delta", (NUMBER,), params=("window",), temporal=True),
        FunctionSpec("ewma", (NUMBER,), params=("halflife",), temporal=True),
        FunctionSpec("cummax", (NUMBER,), temporal=True),
    )
}


def _arity_message(spec: FunctionSpec, given: int) -> str | None:
    if spec.variadic:
        return None if given >= 2 else f"{spec.name}() takes at least 2 arguments ({given} given)"
    wanted = len(spec.args) + len(spec.params)
    if given == wanted:
        return None
    plural = "" if wanted == 1 else "s"
    return f"{spec.name}() takes {wanted} argument{plural} ({given} given)"


def _literal_param(kind: str, node: Node) -> tuple[float | None, str]:
    """Value of a window/half-life argument, which must be a literal so state size is fixed."""
    if kind == "window":
        ok = isinstance(node, Number) and node.value.is_integer() and 1 <= node.value <= MAX_WINDOW
        return (node.value if ok else None), f"must be an integer literal from 1 to {MAX_WINDOW}"
    ok = isinstance(node, Number) and 0 < node.value <= MAX_HALFLIFE
    return (node.value if ok else None), f"must be a number literal in (0, {MAX_HALFLIFE:g}]"


# --------------------------------------------------------------------------- IR


@dataclass(frozen=True, eq=False)
class Op:
    """A typed, resolved operation. Identity-compared: macro expansion shares sub-DAGs."""

    kind: str
    args: tuple[Op, ...] = ()
    param: Any = None  # constant value, qualified feature name, or temporal parameters


_ARITH_KINDS = {"+": "add", "-": "sub", "*": "mul", "/": "div"}
_COMPARE_KINDS = {">": "gt", ">=": "ge", "<": "lt", "<=": "le", "==": "eq", "!=": "ne"}
COMPARE_OPS = frozenset(_COMPARE_KINDS.values())


@dataclass(frozen=True)
class PooledUse:
    """One ``pooled(<alias>)`` in a condition (or a macro it uses): what it names, where."""

    alias: str
    feature: str  # the alias's '<pack>/<feature>'
    loc: SourceLocation  # of `pooled`


# The window of a `pooled()` use; a message saying why there is none (reported at the use); or
# None when the use is left unexpanded on purpose (the loader noted it: `rules check` without
# packs), which fails the condition without an issue.
PooledWindow = Callable[[PooledUse], int | str | None]


@dataclass(frozen=True)
class MacroDef:
    """A macro as declared: its name, parsed expression and location."""

    name: str
    ast: Node | None  # None when the macro's own text failed to parse (already reported)
    loc: SourceLocation


class Resolver:
    """Resolves names, expands macros and checks types, collecting issues instead of stopping.

    One resolver is shared by every rule of a load, so a macro is expanded (and its errors
    reported) once, and rules using it share the resulting sub-DAG.
    """

    def __init__(
        self,
        aliases: Mapping[str, str],
        macros: Mapping[str, MacroDef],
        pooled_window: PooledWindow | None = None,
    ) -> None:
        """``pooled_window`` expands ``pooled(<alias>)`` (the loader's, from the packs'
        aggregations); without it ``pooled()`` is an error."""
        self.aliases = dict(aliases)
        self.macros = dict(macros)
        self.pooled_window = pooled_window
        self.issues: dict[RuleIssue, None] = {}  # ordered set
        self._expanded: dict[str, tuple[Op | None, str]] = {}
        self._active: list[str] = []
        self._depth = 0
        # The pooled() uses of what is being resolved, innermost macro last; a memoised macro
        # hands its own on to each condition that uses it.
        self._uses: list[list[PooledUse]] = []
        self._macro_uses: dict[str, list[PooledUse]] = {}
        self.last_uses: tuple[PooledUse, ...] = ()  # of the last `condition()`

    def report(self, loc: SourceLocation, message: str) -> None:
        """Record an issue at `loc` (each distinct issue once)."""
        self.issues.setdefault(loc.issue(message), None)

    def condition(self, ast: Node, source: SourceText) -> Condition | None:
        """Resolve and compile a rule condition; None (with issues recorded) when it is wrong.
        Its ``pooled()`` uses are left in ``last_uses``."""
        self._uses.append([])
        try:
            op, kind = self.resolve(ast)
        finally:
            self.last_uses = tuple(self._uses.pop())
        if kind == NUMBER:
            self.report(start_of(ast), "condition must be a boolean expression, got a number")
            return None
        return compile_condition(op, source) if op is not None else None

    def macro(self, name: str) -> tuple[Op | None, str]:
        """Expand one macro (memoised); also used to check macros no rule references."""
        if name not in self._expanded:
            self._active.append(name)
            self._uses.append([])
            ast = self.macros[name].ast
            self._expanded[name] = self.resolve(ast) if ast is not None else (None, _ERROR)
            self._macro_uses[name] = self._uses.pop()
            self._active.pop()
        if self._uses:
            self._uses[-1].extend(self._macro_uses.get(name, ()))
        return self._expanded[name]

    def resolve(self, node: Node) -> tuple[Op | None, str]:
        """Resolve names and macros under `node` and type-check it: the compiled operation
        and its kind (None and an error kind after reporting an issue)."""
        self._depth += 1
        try:
            if self._depth > MAX_EXPANSION_DEPTH:
                self.report(start_of(node), "expression nested too deeply after macro expansion")
                return None, _ERROR
            op, kind = self._resolve(node)
            # A failed sub-expression has no type: checking it again would only repeat errors.
            return op, (kind if op is not None else _ERROR)
        finally:
            self._depth -= 1

    def _resolve(self, node: Node) -> tuple[Op | None, str]:
        if isinstance(node, Number):
            return Op("const", param=node.value), NUMBER
        if isinstance(node, Name):
            return self._name(node)
        if isinstance(node, Unary):
            return self._unary(node)
        if isinstance(node, Arith):
            return self._arith(node)
        if isinstance(node, Compare):
            return self._compare(node)
        if isinstance(node, BoolOp):
            return self._boolop(node)
        return self._call(node)

    def _name(self, node: Name) -> tuple[Op | None, str]:
        name = node.ident
        if name in self.macros:
            if name in self._active:
                cycle = " -> ".join([*self._active[self._active.index(name) :], name])
                self.report(node.loc, f"macro cycle: {cycle}")
                return None, _ERROR
            return self.macro(name)
        if name in self.aliases:
            return Op("feature", param=self.aliases[name]), NUMBER
        if name in FUNCTIONS or name == POOLED:
            self.report(node.loc, f"'{name}' is a function; call it as {name}(...)")
            return None, _ERROR
        self.report(node.loc, f"unknown feature {name!r}" + did_you_mean(name, self._names()))
        return None, _ERROR

    def _names(self) -> list[str]:
        return [*self.aliases, *self.macros]

    def _expect(self, node: Node, wanted: str, what: str) -> Op | None:
        op, kind = self.resolve(node)
        if kind not in (wanted, _ERROR):
            self.report(start_of(node), f"{what} must be a {wanted}, got a {kind}")
            return None
        return op

    def _unary(self, node: Unary) -> tuple[Op | None, str]:
        if node.op == "-":
            op = self._expect(node.operand, NUMBER, "operand of unary '-'")
            return _build("neg", op), NUMBER
        op = self._expect(node.operand, BOOLEAN, "operand of 'not'")
        return _build("not", op), BOOLEAN

    def _arith(self, node: Arith) -> tuple[Op | None, str]:
        first_op = node.rest[0][0]
        result = self._expect(node.first, NUMBER, f"left operand of '{first_op}'")
        for op, operand in node.rest:
            right = self._expect(operand, NUMBER, f"right operand of '{op}'")
            result = _build(_ARITH_KINDS[op], result, right)
        return result, NUMBER

    def _compare(self, node: Compare) -> tuple[Op | None, str]:
        # Both operands checked at the operator: for `a > 1 > 2` the second '>' is the culprit.
        ops = []
        for side, operand in (("left", node.left), ("right", node.right)):
            op, kind = self.resolve(operand)
            if kind == BOOLEAN:
                self.report(node.loc, f"cannot compare a boolean with '{node.op}' ({side} side)")
                op = None
            ops.append(op)
        return _build(_COMPARE_KINDS[node.op], *ops), BOOLEAN

    def _boolop(self, node: BoolOp) -> tuple[Op | None, str]:
        operands = [self._expect(x, BOOLEAN, f"operand of '{node.op}'") for x in node.operands]
        result = operands[0]
        for operand in operands[1:]:
            result = _build(node.op, result, operand)
        return result, BOOLEAN

    def _pooled(self, node: Call) -> tuple[Op | None, str]:
        """``pooled(<alias>)`` -> ``rolling_mean(<alias>, W)``, W from the feature's pack: the
        same operation a hand-written call compiles to (same digest, same state)."""
        arg = node.args[0] if len(node.args) == 1 else None
        if not isinstance(arg, Name) or arg.ident not in self.aliases:
            what = (
                f"{arg.ident!r} is not a feature alias"
                if isinstance(arg, Name)
                else f"{len(node.args)} arguments given"
                if len(node.args) != 1
                else "its argument is an expression"
            )
            self.report(
                node.loc,
                f"pooled() takes one feature alias, pooled as its pack recorded ({what}); "
                "to pool anything else write rolling_mean(x, W)",
            )
            return None, _ERROR
        use = PooledUse(arg.ident, self.aliases[arg.ident], node.loc)
        if self.pooled_window is None:
            self.report(node.loc, "pooled() is not available here")
            return None, _ERROR
        window = self.pooled_window(use)
        if self._uses:
            self._uses[-1].append(use)
        if isinstance(window, str):
            self.report(node.loc, window)
            return None, _ERROR
        if window is None:
            return None, _ERROR
        feature = Op("feature", param=use.feature)
        return Op("rolling_mean", (feature,), param=(float(window),)), NUMBER

    def _call(self, node: Call) -> tuple[Op | None, str]:
        if node.func == POOLED:
            return self._pooled(node)
        spec = FUNCTIONS.get(node.func)
        if spec is None:
            self.report(
                node.loc,
                f"unknown function {node.func!r}" + did_you_mean(node.func, [*FUNCTIONS, POOLED]),
            )
            return None, _ERROR
        problem = _arity_message(spec, len(node.args))
        if problem:
            self.report(node.loc, problem)
            return None, _ERROR
        split = len(node.args) - len(spec.params)
        types = spec.args * split if spec.variadic else spec.args
        args = [
            self._expect(arg, wanted, f"argument {i + 1} of {spec.name}()")
            for i, (arg, wanted) in enumerate(zip(node.args[:split], types, strict=True))
        ]
        params = []
        for i, (kind, arg) in enumerate(zip(spec.params, node.args[split:], strict=True)):
            value, rule = _literal_param(kind, arg)
            if value is None:
                self.report(start_of(arg), f"argument {split + i + 1} of {spec.name}() {rule}")
            params.append(value)
        if None in params:
            return None, _ERROR
        return _build(spec.name, *args, param=tuple(params) if spec.temporal else None), NUMBER


def _build(kind: str, *args: Op | None, param: Any = None) -> Op | None:
    """Make an Op unless an argument already failed (then the whole expression has)."""
    if any(arg is None for arg in args):
        return None
    return Op(kind, tuple(a for a in args if a is not None), param)


def did_you_mean(word: str, candidates: Sequence[str] | Mapping[str, Any]) -> str:
    """`` (did you mean 'x'?)`` for the closest of `candidates`, or an empty string."""
    matches = difflib.get_close_matches(word, list(candidates), n=1)
    return f" (did you mean {matches[0]!r}?)" if matches else ""


# --------------------------------------------------------------------------- compiled program


@dataclass(frozen=True)
class Instr:
    """One instruction of a compiled condition: its function, the registers of its operands, a
    constant parameter, and a structural key shared by identical sub-expressions.
    """

    kind: str
    args: tuple[int, ...]  # registers of earlier instructions
    param: Any
    key: str  # structural digest: identical sub-expressions share it (state key, CSE key)


TemporalFn = Callable[[Instr, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Condition:
    """A compiled, type-checked boolean expression.

    ``value`` is the register of the left operand of the first comparison (depth first), which
    is what an alert reports as "the value"; ``digest`` identifies the expanded expression, so
    state survives a reload that only renames a macro or reformats the text.
    """

    source: str
    location: SourceLocation
    program: tuple[Instr, ...]
    result: int
    value: int
    features: frozenset[str]
    digest: str

    @property
    def temporal(self) -> bool:
        """Whether the condition keeps state across tokens (rolling windows, ewma, delta, ...)."""
        return any(FUNCTIONS.get(ins.kind, _STATELESS).temporal for ins in self.program)

    def evaluate(
        self,
        features: Mapping[str, torch.Tensor],
        rows: int,
        temporal: TemporalFn | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Evaluate over ``rows`` tokens: (bool condition [rows], float32 value [rows])."""
        registers: list[torch.Tensor] = []
        for ins in self.program:
            inputs = [registers[i] for i in ins.args]
            if ins.kind in _KERNELS:
                registers.append(_KERNELS[ins.kind](ins, inputs, features))
            elif temporal is None:
                raise ValueError(f"{ins.kind}() needs per-conversation state: use RuleEngine")
            else:
                registers.append(temporal(ins, inputs[0]))
        condition = registers[self.result].expand(rows)
        value = registers[self.value]
        if value.dtype != torch.float32:
            value = value.to(torch.float32)
        if value.dim() == 0:  # a (cached, shared) constant: hand out a copy, not a view
            return condition, value.expand(rows).clone()
        return condition, value.expand(rows)


_STATELESS = FunctionSpec("", ())


def compile_condition(root: Op, source: SourceText) -> Condition:
    """Flatten the IR DAG into registers, merging structurally identical sub-expressions."""
    program: list[Instr] = []
    by_id: dict[int, int] = {}
    by_key: dict[str, int] = {}
    stack: list[tuple[Op, bool]] = [(root, False)]
    # Iterative post-order: the IR of a long chain is deep even though the AST is not.
    while stack:
        op, ready = stack.pop()
        if id(op) in by_id:
            continue
        if not ready:
            stack.append((op, True))
            stack.extend((arg, False) for arg in reversed(op.args))
            continue
        args = tuple(by_id[id(arg)] for arg in op.args)
        key = _digest(op.kind, op.param, [program[i].key for i in args])
        if key not in by_key:
            by_key[key] = len(program)
            program.append(Instr(op.kind, args, op.param, key))
        by_id[id(op)] = by_key[key]
    result = by_id[id(root)]
    first = _first_comparison(root)
    value = by_id[id(first.args[0])] if first is not None else result
    names = frozenset(ins.param for ins in program if ins.kind == "feature")
    return Condition(
        source.text, source.start, tuple(program), result, value, names, program[result].key
    )


def _digest(kind: str, param: Any, arg_keys: list[str]) -> str:
    text = f"{kind}|{param!r}|{','.join(arg_keys)}"
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def _first_comparison(root: Op) -> Op | None:
    stack, seen = [root], set()
    while stack:
        op = stack.pop()
        if op.kind in COMPARE_OPS:
            return op
        if id(op) not in seen:
            seen.add(id(op))
            stack.extend(reversed(op.args))
    return None


def compile_expression(
    source: SourceText | str,
    aliases: Mapping[str, str],
    macros: Mapping[str, str] | None = None,
) -> Condition:
    """Parse, check and compile one boolean expression (convenience for tests and tools)."""
    if isinstance(source, str):
        source = SourceText(source)
    defs = {}
    for name, text in (macros or {}).items():
        defs[name] = MacroDef(name, parse(SourceText(text, path=f"<macro {name}>")), source.start)
    resolver = Resolver(aliases, defs)
    condition = resolver.condition(parse(source), source)
    if resolver.issues or condition is None:
        raise ExpressionError(resolver.issues)
    return condition


# --------------------------------------------------------------------------- kernels


def _const(
    ins: Instr, args: list[torch.Tensor], features: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    return _constant(ins.param)


@functools.lru_cache(maxsize=4096)
def _constant(value: float) -> torch.Tensor:
    # Cached: building a tensor costs more than the comparison it feeds on a decode step.
    return torch.tensor(value, dtype=torch.float32)


def _feature(
    ins: Instr, args: list[torch.Tensor], features: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    return features[ins.param]


def _sigmoid(x: torch.Tensor) -> torch.Tensor:
    # In float64 then rounded: vectorised and scalar exp differ in the last bit, and a
    # condition must not depend on how many tokens shared the batch.
    return torch.sigmoid(x.to(torch.float64)).to(torch.float32)


def _reduce(
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> Callable[..., torch.Tensor]:
    def kernel(
        ins: Instr, args: list[torch.Tensor], features: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        result = args[0]
        for arg in args[1:]:
            result = fn(result, arg)
        return result

    return kernel


def _unary(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., torch.Tensor]:
    def kernel(
        ins: Instr, args: list[torch.Tensor], features: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        return fn(args[0])

    return kernel


def _clip(
    ins: Instr, args: list[torch.Tensor], features: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    return torch.minimum(torch.maximum(args[0], args[1]), args[2])


_KERNELS: dict[
    str, Callable[[Instr, list[torch.Tensor], Mapping[str, torch.Tensor]], torch.Tensor]
] = {
    "const": _const,
    "feature": _feature,
    "neg": _unary(torch.neg),
    "not": _unary(torch.logical_not),
    "abs": _unary(torch.abs),
    "sigmoid": _unary(_sigmoid),
    "clip": _clip,
    "max": _reduce(torch.maximum),
    "min": _reduce(torch.minimum),
    "add": _reduce(torch.add),
    "sub": _reduce(torch.sub),
    "mul": _reduce(torch.mul),
    "div": _reduce(torch.div),
    "and": _reduce(torch.logical_and),
    "or": _reduce(torch.logical_or),
    "gt": _reduce(torch.gt),
    "ge": _reduce(torch.ge),
    "lt": _reduce(torch.lt),
    "le": _reduce(torch.le),
    "eq": _reduce(torch.eq),
    "ne": _reduce(torch.ne),
}
