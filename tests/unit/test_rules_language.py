"""Rule keys beyond the core: scope, cooldown, exceptions, lists, labels/annotations, overrides."""

from __future__ import annotations

import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from monitor.rules import RuleEngine, RuleLoadError, RuleSet, SequenceSlice, load_rules
from monitor.rules.engine import _MaskCache


@pytest.fixture
def here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(name: str, text: str) -> str:
    Path(name).write_text(textwrap.dedent(text))
    return name


def load(*texts: str) -> RuleSet:
    return load_rules([write(f"{i}.yaml", text) for i, text in enumerate(texts)])


def errors(*texts: str) -> list[str]:
    with pytest.raises(RuleLoadError) as info:
        load(*texts)
    return [str(issue) for issue in info.value.issues]


HEAD = "features: {a: p/a}\nrules:\n"


def fire(engine: RuleEngine, values: list[float], position: int = 0, **slice_args) -> list[int]:
    """Positions where rules fired for one slice of conversation 'c' (default)."""
    model = slice_args.pop("model", "")
    conversation = slice_args.pop("conversation", "c")
    sl = SequenceSlice(conversation, 0, len(values), position, **slice_args)
    result = engine.evaluate({"p/a": torch.tensor(values)}, [sl], model=model)
    return [f.position for f in result.firings]


# --------------------------------------------------------------------------- cooldown


def test_cooldown_suppresses_refire(here):
    engine = RuleEngine(load(HEAD + "  - {rule: r, severity: info, condition: a > 0, cooldown: 5}"))
    # Rising edges at 0, 2, 4, 6, 8: after firing at 0, nothing until token 5; 6 fires.
    assert fire(engine, [1, 0] * 5) == [0, 6]
    assert fire(engine, [1, 0, 1], position=10) == [12]  # 10 - 6 < 5, 12 - 6 >= 5
    assert fire(engine, [0, 1, 0, 1], position=13) == []
    assert fire(engine, [0, 1], position=17) == [18]


def test_cooldown_carries_across_batches_and_resets_on_end(here):
    engine = RuleEngine(
        load(HEAD + "  - {rule: r, severity: info, condition: a > 0, cooldown: '100 tokens'}")
    )
    assert fire(engine, [1]) == [0]
    assert fire(engine, [0, 1], position=1) == []
    assert fire(engine, [0, 1], position=3, end=True) == []
    assert fire(engine, [1]) == [0]  # a new conversation under the same id


# --------------------------------------------------------------------------- scope


def test_request_scope_resets_state_on_new_request(here):
    rules = load(
        HEAD + "  - {rule: conv, severity: info, condition: 'rolling_sum(a, 8) >= 4'}\n"
        "  - {rule: req, severity: info, condition: 'rolling_sum(a, 8) >= 4', scope: request}\n"
        "  - {rule: run, severity: info, condition: a > 0, for: 4, scope: request}\n"
    )
    engine = RuleEngine(rules)
    fired = []
    for request, position in (("r1", 0), ("r2", 2), ("r2", 4)):
        sl = SequenceSlice("c", 0, 2, position, request_id=request)
        result = engine.evaluate({"p/a": torch.ones(2)}, [sl])
        fired += [(f.rule, f.position) for f in result.firings]
    # The conversation-scoped sum reaches 4 at token 3; the request-scoped state restarted
    # at token 2 (new request), so it reaches 4 (and the run reaches 4) at token 5.
    assert fired == [("conv", 3), ("req", 5), ("run", 5)]


# --------------------------------------------------------------------------- exceptions, lists


EXCEPTIONS = """\
features: {a: p/a}
lists:
  red_teams: [red-team, eval]
  all_red: [red_teams, pentest]
  speakers: [assistant, tool]
rules:
  - rule: r
    severity: warning
    condition: a > 0
    roles: [speakers]
    exceptions:
      - name: internal-red-team
        desc: Red teams probe on purpose.
        attributes: {tenant: all_red}
      - name: eval-model-in-staging
        attributes: {model: [eval-model], env: staging}
"""


def test_exceptions_and_lists(here):
    rules = load(EXCEPTIONS)
    (rule,) = rules.rules
    assert rules.lists["all_red"] == ("red-team", "eval", "pentest")
    assert rule.roles == ("assistant", "tool")
    assert [e.name for e in rule.exceptions] == ["internal-red-team", "eval-model-in-staging"]
    engine = RuleEngine(rules)

    def fires(conversation: str, role: str = "assistant", model: str = "", **attributes) -> bool:
        return bool(
            fire(
                engine,
                [1.0],
                conversation=conversation,
                role=role,
                attributes=attributes,
                model=model,
            )
        )

    assert fires("c1", tenant="acme")
    assert fires("c2", role="tool")
    assert not fires("c3", role="user")
    assert not fires("c4", tenant="pentest")
    assert not fires("c5", tenant="eval")
    assert not fires("c6", model="eval-model", env="staging")  # model from the batch
    assert fires("c7", model="eval-model")  # every attribute of an exception must match
    assert fires("c8", model="prod-model", env="staging")
    # A slice's own model attribute wins over the batch's.
    own = {"model": "eval-model", "env": "staging"}
    assert fire(engine, [1.0], conversation="c9", role="tool", attributes=own, model="x") == []


def test_mixed_signatures_in_one_batch(here):
    engine = RuleEngine(load(EXCEPTIONS))
    slices = [
        SequenceSlice("x", 0, 1, 0, "assistant", attributes={"tenant": "eval"}),
        SequenceSlice("y", 1, 1, 0, "assistant", attributes={"tenant": "acme"}),
        SequenceSlice("z", 2, 1, 0, "user"),
    ]
    result = engine.evaluate({"p/a": torch.ones(3)}, slices)
    assert [f.conversation_id for f in result.firings] == ["y"]


def test_signature_cache_overflow_mid_batch(here, monkeypatch):
    """When the mask cache fills up, a batch mixing known and new signatures still gets a mask
    for each slice (a cleared cache used to lose the known ones: KeyError mid-evaluation)."""
    monkeypatch.setattr(_MaskCache, "_LIMIT", 2)
    engine = RuleEngine(load(EXCEPTIONS))

    def step(tenants: list[str], position: int) -> list[str]:
        slices = [
            SequenceSlice(f"c-{t}", i, 1, position, "assistant", attributes={"tenant": t})
            for i, t in enumerate(tenants)
        ]
        result = engine.evaluate({"p/a": torch.ones(len(tenants))}, slices)
        return [f.conversation_id for f in result.firings]

    assert step(["acme", "eval"], 0) == ["c-acme"]
    # "acme" is cached, "other" is new, and 2 + 1 signatures exceed the limit.
    assert step(["acme", "other", "eval"], 1) == ["c-other"]
    assert step(["pentest", "acme"], 2) == []  # acme's run continued: `for: 1` fired at 0


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ("    exceptions: {a: b}\n", "0.yaml:6:17: 'exceptions' must be a list"),
        ("    exceptions: [{name: x}]\n", "0.yaml:6:18: exception is missing required key"),
        (
            "    exceptions: [{name: x, attributes: {tenant: t}, atributes: {}}]\n",
            "0.yaml:6:53: unknown exception key 'atributes' (did you mean 'attributes'?)",
        ),
        (
            "    exceptions: [{name: x, attributes: {bad-name: t}}]\n",
            "0.yaml:6:41: invalid attribute name 'bad-name'",
        ),
        (
            "    exceptions: [{name: x, attributes: {t: [a]}}, {name: x, attributes: {t: [b]}}]\n",
            "0.yaml:6:51: duplicate exception 'x'",
        ),
        ("    scope: session\n", "0.yaml:6:12: invalid scope 'session' (one of: conversation"),
        ("    cooldown: -1\n", "0.yaml:6:15: 'cooldown' must be a non-negative number"),
        ("    annotations: {summary: '{valeu}'}\n", "0.yaml:6:28: unknown placeholder {valeu}"),
        ("    roles: [nobody, '']\n", "0.yaml:6:21: 'roles' entries must be non-empty strings"),
    ],
)
def test_new_keys_errors_are_located(here, rule, expected):
    text = "features: {a: p/a}\nrules:\n  - rule: r\n    severity: info\n    condition: a > 0\n"
    found = errors(text + rule)
    assert any(line.startswith(expected) for line in found), found


def test_list_errors(here):
    found = errors("lists:\n  x: [a]\n  bad name: [b]\n  y: c\n", "lists: {x: [d]}\n")
    assert found == [
        "0.yaml:3:3: invalid list name 'bad name' (letters, digits, '_', '.', '-')",
        "0.yaml:4:6: list 'y' must be a list of strings",
        "1.yaml:1:9: list 'x' is already defined at 0.yaml:2:3",
    ]


def test_labels_and_annotations_are_rendered(here):
    rules = load(
        HEAD + "  - rule: r\n    severity: info\n    condition: a > 1\n"
        "    labels: {team: ts}\n"
        "    annotations: {summary: 'value {value:.1f} at {position}', runbook: 'https://x/r'}\n"
    )
    engine = RuleEngine(rules)
    result = engine.evaluate({"p/a": torch.tensor([0.0, 2.5])}, [SequenceSlice("c", 0, 2, 7)])
    (firing,) = result.firings
    assert firing.labels == {"team": "ts"}
    assert firing.annotations == {"summary": "value 2.5 at 8", "runbook": "https://x/r"}


# --------------------------------------------------------------------------- overrides

BASE = """\
features: {a: p/a, b: p/b}
rules:
  - rule: r
    severity: info
    condition: a > 1
    roles: [assistant]
    labels: {team: ts}
    exceptions: [{name: one, attributes: {tenant: t1}}]
"""


def test_override_append_and_replace(here):
    rules = load(
        BASE,
        """\
        rules:
          - rule: r
            condition: b < 0
            severity: critical
            roles: [tool]
            labels: {page: "yes"}
            exceptions: [{name: two, attributes: {tenant: t2}}]
            override:
              condition: append
              severity: replace
              roles: append
              labels: append
              exceptions: append
        """,
    )
    (rule,) = rules.rules
    assert rule.condition.source == "(a > 1) and (b < 0)"
    assert rule.condition.features == {"p/a", "p/b"}
    assert (rule.severity, rule.roles) == ("critical", ("assistant", "tool"))
    assert rule.labels == {"team": "ts", "page": "yes"}
    assert [e.name for e in rule.exceptions] == ["one", "two"]
    replaced = load(
        BASE, "rules:\n  - {rule: r, condition: b > 2, override: {condition: replace}}\n"
    )
    assert replaced.rules[0].condition.source == "b > 2"


def test_enabled_toggle_from_later_file(here):
    rules = load(BASE, "rules:\n  - {rule: r, enabled: false}\n")
    assert not rules.rules[0].enabled and rules.required_features == set()


def test_appended_condition_is_an_and_not_text(here):
    # Falco appends raw text; `a > 1 or b > 1` + `b < 0` must not become `a > 1 or b > 1 and b < 0`.
    rules = load(
        "features: {a: p/a, b: p/b}\n"
        "rules:\n  - {rule: r, severity: info, condition: a > 1 or b > 1}\n",
        "rules:\n  - {rule: r, condition: b < 0, override: {condition: append}}\n",
    )
    engine = RuleEngine(rules)
    slices = [SequenceSlice("c", 0, 1, 0)]
    result = engine.evaluate({"p/a": torch.tensor([2.0]), "p/b": torch.tensor([0.5])}, slices)
    assert result.firings == []


def test_override_errors_are_located_in_the_overriding_file(here):
    found = errors(
        BASE,
        """\
        rules:
          - {rule: nope, condition: a > 1, override: {condition: append}}
          - {rule: r, condition: b <, override: {condition: append}}
          - {rule: r, severity: info, override: {severity: append}}
          - {rule: r, desc: x, override: {condition: replace}}
          - {rule: r, desc: x, override: {desc: merge}}
          - {rule: r, override: {rule: replace}}
          - {rule: r, desc: x, severity: info, override: {desc: replace}}
        """,
    )
    assert found == [
        "1.yaml:2:12: override of unknown rule 'nope': define it in an earlier file or earlier"
        " in this one",
        "1.yaml:3:29: unexpected end of expression",
        "1.yaml:4:52: 'severity' can only be replaced, not appended to",
        "1.yaml:5:15: 'desc' is set in an override entry but not in 'override'",
        "1.yaml:5:35: override names 'condition' but the entry does not set it",
        "1.yaml:6:41: override mode must be 'append' or 'replace'",
        "1.yaml:7:26: cannot override 'rule' (the name picks the rule)",
        "1.yaml:8:24: 'severity' is set in an override entry but not in 'override'",
    ]


def test_override_keeps_required_keys_located(here):
    found = errors(BASE, "rules:\n  - {rule: r, severity: loud, override: {severity: replace}}\n")
    assert found == ["1.yaml:2:25: invalid severity 'loud' (one of: info, warning, critical)"]


# --------------------------------------------------------------------------- chunking invariance

CHUNK_RULES_TEXT = """\
features: {a: p/a}
rules:
  - {rule: cool, severity: info, condition: a > 0.5, cooldown: 3}
  - {rule: req, severity: info, condition: 'rolling_sum(a, 4) > 1.5', scope: request}
  - {rule: reqfor, severity: info, condition: a > 0, for: 2, scope: request, cooldown: 2}
  - rule: exc
    severity: info
    condition: 'ewma(a, 2) > 0.3'
    roles: [assistant]
    exceptions: [{name: t, attributes: {tenant: [t1]}}]
"""


def _load_text(text: str) -> RuleSet:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "rules.yaml"
        path.write_text(text)
        return load_rules([path])


CHUNK_RULES = _load_text(CHUNK_RULES_TEXT)

_TOKEN = st.tuples(
    st.sampled_from([0.0, 0.25, 0.75, 1.0]),
    st.sampled_from(["assistant", "user"]),
    st.sampled_from(["r1", "r2"]),
)


def _chunks(tokens: list, cuts: set[int]) -> list[tuple[int, list]]:
    chunks, start = [], 0
    for i in range(1, len(tokens) + 1):
        if i == len(tokens) or i in cuts or tokens[i][1:] != tokens[i - 1][1:]:
            chunks.append((start, tokens[start:i]))
            start = i
    return chunks


def _replay(rules: RuleSet, tenants: dict, batches: list[list[tuple[str, int, list]]]) -> list:
    engine = RuleEngine(rules)
    fired = []
    for batch in batches:
        slices, values = [], []
        for conversation, start, chunk in batch:
            slices.append(
                SequenceSlice(
                    conversation,
                    len(values),
                    len(chunk),
                    start,
                    role=chunk[0][1],
                    request_id=chunk[0][2],
                    attributes={"tenant": tenants[conversation]},
                )
            )
            values += [v for v, _, _ in chunk]
        result = engine.evaluate({"p/a": torch.tensor(values)}, slices)
        fired += [(f.rule, f.conversation_id, f.position) for f in result.firings]
    return sorted(fired)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(_TOKEN, min_size=1, max_size=20), min_size=1, max_size=3),
    st.randoms(use_true_random=False),
)
def test_chunking_invariance_with_scope_cooldown_exceptions(conversation_list, rng):
    rules = CHUNK_RULES
    conversations = {f"c{i}": tokens for i, tokens in enumerate(conversation_list)}
    tenants = {c: rng.choice(["t1", "t2"]) for c in conversations}
    one_by_one = [
        [(c, t, tokens[t : t + 1])]
        for t in range(max(map(len, conversations.values())))
        for c, tokens in conversations.items()
        if t < len(tokens)
    ]
    queues = {
        c: _chunks(tokens, {i for i in range(len(tokens)) if rng.random() < 0.3})
        for c, tokens in conversations.items()
    }
    batches: list[list] = [[]]
    while any(queues.values()):
        c = rng.choice([c for c, q in queues.items() if q])
        start, chunk = queues[c].pop(0)
        batches[-1].append((c, start, chunk))
        if rng.random() < 0.4:
            batches.append([])
    assert _replay(rules, tenants, batches) == _replay(rules, tenants, one_by_one)
