"""The expression language: precedence, located errors, limits, evaluation, fuzzing."""

from __future__ import annotations

import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from monitor.rules.errors import ExpressionError
from monitor.rules.expressions import (
    MAX_EXPRESSION_LENGTH,
    MAX_NESTING_DEPTH,
    SourceText,
    compile_expression,
    parse,
    show,
)

ALIASES = {"a": "p/a", "b": "p/b", "c": "p/c", "bars": "bars/17", "bio_weapons": "p/bio"}


@pytest.mark.parametrize(
    ("text", "tree"),
    [
        ("a - b - c", "((a - b) - c)"),
        ("a / b / c", "((a / b) / c)"),
        ("a - b + c", "((a - b) + c)"),
        ("a + b * c", "(a + (b * c))"),
        ("a * b + c", "((a * b) + c)"),
        ("a - (b - c)", "(a - (b - c))"),
        ("-a * b", "((-a) * b)"),
        ("- -a", "(-(-a))"),
        ("a + b > c * 2", "((a + b) > (c * 2.0))"),
        ("not a > 1 and b", "((not (a > 1.0)) and b)"),
        ("a or b and c", "(a or (b and c))"),
        ("a and b or c and d", "((a and b) or (c and d))"),
        ("a and b and c", "(a and b and c)"),
        ("not not a", "(not (not a))"),
        ("max(a, b + 1, 2) >= 1e-3", "(max(a, (b + 1.0), 2.0) >= 0.001)"),
        ("clip(a, -1, .5)", "clip(a, (-1.0), 0.5)"),
        ("a != 1 == b", "((a != 1.0) == b)"),
    ],
)
def test_precedence_and_associativity(text, tree):
    assert show(parse(text)) == tree


def _error(text: str, **kwargs) -> str:
    with pytest.raises(ExpressionError) as info:
        compile_expression(text, ALIASES, **kwargs)
    return str(info.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("bars and 1", "<expr>:1:10: operand of 'and' must be a boolean, got a number"),
        ("bars > 1 > 2", "<expr>:1:10: cannot compare a boolean with '>' (left side)"),
        ("(a > 1) == (b > 1)", "<expr>:1:9: cannot compare a boolean with '=='"),
        ("(a > 1) + 1 > 0", "<expr>:1:2: left operand of '+' must be a number, got a boolean"),
        ("-(a > 1) > 0", "<expr>:1:3: operand of unary '-' must be a number, got a boolean"),
        ("not a", "<expr>:1:5: operand of 'not' must be a boolean, got a number"),
        ("a + 1", "<expr>:1:1: condition must be a boolean expression, got a number"),
        (
            "bio_weapon > 1",
            "<expr>:1:1: unknown feature 'bio_weapon' (did you mean 'bio_weapons'?)",
        ),
        ("a > 1 and zzz > 1", "<expr>:1:11: unknown feature 'zzz'"),
        ("maxx(a, b) > 1", "<expr>:1:1: unknown function 'maxx' (did you mean 'max'?)"),
        ("max > 1", "<expr>:1:1: 'max' is a function; call it as max(...)"),
        ("max(a) > 1", "<expr>:1:1: max() takes at least 2 arguments (1 given)"),
        ("a > abs(a, b)", "<expr>:1:5: abs() takes 1 argument (2 given)"),
        ("clip(a, 1) > 0", "<expr>:1:1: clip() takes 3 arguments (2 given)"),
        ("abs(a > 1) > 0", "<expr>:1:5: argument 1 of abs() must be a number, got a boolean"),
        ("rolling_mean(a, b) > 0", "<expr>:1:17: argument 2 of rolling_mean() must be an integer"),
        ("rolling_mean(a, 2.5) > 0", "<expr>:1:17: argument 2 of rolling_mean()"),
        ("count_over(a, 3) > 0", "<expr>:1:12: argument 1 of count_over() must be a boolean"),
        ("a >", "<expr>:1:4: unexpected end of expression"),
        ("", "<expr>:1:1: empty expression"),
        ("(a > 1", "<expr>:1:7: expected ')', found end of expression"),
        ("a > 1)", "<expr>:1:6: unexpected ')'"),
        ("a = 1", "<expr>:1:3: unexpected '=' (use '==' to compare)"),
        ("a > 1 && b > 1", "<expr>:1:7: unexpected '&' (use 'and')"),
        ("a > 1e999", "<expr>:1:5: number '1e999' is out of range"),
        ("a > 1x", "<expr>:1:5: malformed number '1x'"),
        ("a > 1.2.3", "<expr>:1:5: malformed number '1.2.'"),
        ("a.b > 1", "<expr>:1:2: unexpected character '.'"),
        ("a > $", "<expr>:1:5: unexpected character '$'"),
        ("a b", "<expr>:1:3: unexpected 'b'"),
        ("max(a,) > 1", "<expr>:1:7: unexpected ')'"),
    ],
)
def test_errors_are_located(text, expected):
    assert any(line.startswith(expected) for line in _error(text).splitlines())


def test_errors_map_into_the_file():
    source = SourceText("a > 1 and nope", path="r.yaml", line=7, col=16)
    with pytest.raises(ExpressionError) as info:
        compile_expression(source, ALIASES)
    assert str(info.value) == "r.yaml:7:26: unknown feature 'nope'"


def test_several_type_errors_reported_together():
    message = _error("(a and 1) or (b + (c > 1) > 2)")
    assert "1:2:" in message and "1:8:" in message and "1:20:" in message


def test_failed_subexpressions_do_not_cascade():
    assert _error("nope + 1 > 2").count("\n") == 0


def test_macro_cycle_and_macro_errors():
    assert "macro cycle: x -> y -> x" in _error("x", macros={"x": "y", "y": "x and a > 1"})
    assert "unknown feature 'q'" in _error("m", macros={"m": "q > 1"})


def test_nesting_limit():
    ok = "(" * MAX_NESTING_DEPTH + "a" + ")" * MAX_NESTING_DEPTH + " > 1"
    compile_expression(ok, ALIASES)
    too_deep = "(" * (MAX_NESTING_DEPTH + 1) + "a" + ")" * (MAX_NESTING_DEPTH + 1) + " > 1"
    assert _error(too_deep).startswith(f"<expr>:1:{MAX_NESTING_DEPTH + 1}: expression nested too")
    assert "nested too deeply" in _error("not " * 70 + "a > 1")
    assert "nested too deeply" in _error("-" * 70 + "a > 1")
    assert "nested too deeply" in _error("abs(" * 70 + "a" + ")" * 70 + " > 1")


def test_length_limit():
    text = "a > 1 and " * (MAX_EXPRESSION_LENGTH // 10 + 1) + "a > 1"
    assert _error(text) == (
        f"<expr>:1:1: expression too long ({len(text)} characters, max {MAX_EXPRESSION_LENGTH})"
    )


def test_long_flat_chains_are_not_deep():
    text = " + ".join(["a"] * 500) + " > 1 and (" + " or ".join(["b > 1"] * 200) + ")"
    assert len(text) <= MAX_EXPRESSION_LENGTH
    condition = compile_expression(text, ALIASES)
    result, _ = condition.evaluate({"p/a": torch.ones(3), "p/b": torch.full((3,), 2.0)}, 3)
    assert result.tolist() == [True, True, True]


def test_macro_blowup_is_shared_not_expanded():
    macros = {"m0": "a"} | {f"m{i}": f"m{i - 1} + m{i - 1}" for i in range(1, 60)}
    started = time.perf_counter()
    condition = compile_expression("m59 > 0", ALIASES, macros=macros)
    assert time.perf_counter() - started < 1.0
    assert len(condition.program) < 70


def _eval(text: str, **features: list[float]):
    tensors = {ALIASES[name]: torch.tensor(v, dtype=torch.float32) for name, v in features.items()}
    rows = len(next(iter(features.values())))
    condition = compile_expression(text, ALIASES)
    result, value = condition.evaluate(tensors, rows)
    return result.tolist(), value.tolist()


def test_evaluation_semantics():
    assert _eval("a * 2 - b / 4 == 1", a=[1.0, 0.5], b=[4.0, 0.0])[0] == [True, True]
    assert _eval("a * 2 - b / 4 == 0", a=[1.0, 0.5], b=[8.0, 0.0])[0] == [True, False]
    assert _eval("max(a, b, 0) > 1 or min(a, b) < -1", a=[2, 0, -2], b=[0, 0, 0])[0] == [
        True,
        False,
        True,
    ]
    assert _eval("abs(a) >= 2 and not b > 0", a=[-2, 2, 1], b=[0, 1, 0])[0] == [True, False, False]
    assert _eval("clip(a, 0, 1) == 1", a=[5, 0.5, -3])[0] == [True, False, False]
    assert _eval("sigmoid(a) > 0.5", a=[1, -1])[0] == [True, False]
    assert _eval("1 < 2", a=[0, 0, 0])[0] == [True, True, True]


def test_value_is_left_operand_of_first_comparison():
    assert _eval("not (a + 1 > 2) or b > 5", a=[1, 3], b=[0, 0])[1] == [2.0, 4.0]
    assert _eval("a > 1 and b < 0", a=[4, 0], b=[0, 0])[1] == [4.0, 0.0]


def test_common_subexpressions_are_shared():
    condition = compile_expression("abs(a) > 1 and abs(a) < 3", ALIASES)
    assert [ins.kind for ins in condition.program].count("abs") == 1


def test_digest_ignores_formatting_and_macros():
    one = compile_expression("a>1 and b<2", ALIASES)
    two = compile_expression("hot  and (b < 2)", ALIASES, macros={"hot": "a > 1"})
    assert one.digest == two.digest
    assert one.digest != compile_expression("a > 1 and b < 3", ALIASES).digest


def test_temporal_functions_need_an_engine():
    condition = compile_expression("rolling_mean(a, 4) > 1", ALIASES)
    with pytest.raises(ValueError, match="RuleEngine"):
        condition.evaluate({"p/a": torch.ones(2)}, 2)


_ALPHABET = st.sampled_from([*"ab()+-*/<>=!,. 0123456789e", "and ", "or ", "not ", "max"])


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.text(max_size=60), st.lists(_ALPHABET, max_size=30).map("".join)))
def test_fuzz_only_expression_errors(text):
    try:
        condition = compile_expression(text, ALIASES)
    except ExpressionError as exc:
        assert exc.issues and all(issue.line >= 1 and issue.col >= 1 for issue in exc.issues)
        return
    features = {name: torch.tensor([0.0, 1.5, -2.0]) for name in ALIASES.values()}
    result, value = condition.evaluate(features, 3)
    assert result.dtype == torch.bool and result.shape == (3,) and value.shape == (3,)
