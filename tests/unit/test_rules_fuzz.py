"""Bad input: arbitrary YAML documents, huge files, deep nesting and object-building tags."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monitor.rules import RuleLoadError, load_rules
from monitor.rules.builder import RULE_KEYS
from monitor.rules.loader import TOP_KEYS

_KEYS = st.one_of(
    st.sampled_from([*TOP_KEYS, *RULE_KEYS, "override", "name", "attributes", "a", "m", "x"]),
    st.text(max_size=8),
)
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**20), 10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(
        [
            "a > 1",
            "rolling_mean(a, 4) > 1",
            "p/a",
            "info",
            "critical",
            "append",
            "replace",
            "request",
            "3 tokens",
            "{value}",
            "assistant",
            "r",
        ]
    ),
    st.text(max_size=20),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(_KEYS, children, max_size=5)
    ),
    max_leaves=30,
)
_DOCUMENTS = st.dictionaries(_KEYS, _VALUES, max_size=5) | st.fixed_dictionaries(
    {
        "features": st.dictionaries(_KEYS, st.one_of(st.just("p/a"), _SCALARS), max_size=3),
        "rules": st.lists(st.dictionaries(_KEYS, _VALUES, max_size=8), max_size=3),
    }
)


def _load_text(text: str, *more: str) -> None:
    with tempfile.TemporaryDirectory() as directory:
        paths = []
        for i, body in enumerate((text, *more)):
            path = Path(directory) / f"{i}.yaml"
            path.write_text(body, encoding="utf-8", errors="surrogatepass")
            paths.append(path)
        load_rules(paths)


def _only_located_errors(*texts: str) -> list[str]:
    try:
        _load_text(*texts)
    except RuleLoadError as exc:
        assert exc.issues and all(i.line >= 1 and i.col >= 1 for i in exc.issues)
        return [i.message for i in exc.issues]
    return []


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_DOCUMENTS, _DOCUMENTS)
def test_arbitrary_yaml_documents_give_only_rule_load_errors(first, second):
    _only_located_errors(yaml.safe_dump(first), yaml.safe_dump(second))


def test_huge_file_refused_quickly(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("# padding\n" * 120_000)  # ~1.2 MB
    start = time.perf_counter()
    with pytest.raises(
        RuleLoadError, match=r"big.yaml:1:1: file too large \(\d+ bytes, max 1 MiB\)"
    ):
        load_rules([path])
    assert time.perf_counter() - start < 1


@pytest.mark.parametrize(
    "text",
    ["x: " + "[" * 5000 + "]" * 5000 + "\n", "x:\n" + "".join(" " * i + "- \n" for i in range(60))],
)
def test_deep_yaml_refused(text):
    messages = _only_located_errors(text)
    assert any("nested too deeply" in m for m in messages), messages


def test_deep_expression_refused():
    condition = "(" * 200 + "a" + ")" * 200 + " > 1"
    text = (
        f"features: {{a: p/a}}\nrules:\n  - {{rule: r, severity: info, condition: '{condition}'}}\n"
    )
    messages = _only_located_errors(text)
    assert messages == ["expression nested too deeply (max depth 64)"]


def test_long_macro_chain_refused():
    macros = "".join(f"  m{i}: m{i + 1} + 1\n" for i in range(400))
    text = f"features: {{a: p/a}}\nmacros:\n{macros}  m400: a\nrules:\n"
    text += "  - {rule: r, severity: info, condition: m0 > 1}\n"
    messages = _only_located_errors(text)
    assert any("nested too deeply after macro expansion" in m for m in messages)


@pytest.mark.parametrize(
    "text",
    [
        "rules: !!python/object/apply:os.system ['true']\n",
        "features: {a: !!python/name:os.system p}\n",
        "x: !!binary aGVsbG8=\n",
        "rules:\n  - !custom {rule: r}\n",
        "x: !!set {a: null}\n",
    ],
)
def test_object_building_tags_refused(text):
    messages = _only_located_errors(text)
    assert len(messages) == 1 and messages[0].startswith("YAML tag "), messages


def test_plain_tags_are_fine():
    text = (
        "features: !!map {a: !!str p/a}\nrules:\n  - {rule: r, severity: info, condition: a > 1}\n"
    )
    assert _only_located_errors(text) == []


def test_alias_bomb_is_cheap():
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    text = "\n".join(lines) + "\nrules: *a8\n"
    start = time.perf_counter()
    messages = _only_located_errors(text)
    assert time.perf_counter() - start < 2 and messages
