"""`pooled(<alias>)`: a rule pools a probe as its pack recorded (window, for, window_roles, at),
expanded at load; conflicts and missing aggregations are located errors; without packs
`rules check` says what it could not expand and `rules test` files declare `aggregations:`."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from monitor.features.build.scoring import (
    aggregation_guard,
    aggregation_masked,
    aggregation_turn_end,
    parse_aggregation,
)
from monitor.features.errors import FeatureError
from monitor.rules import (
    PackFeatures,
    RuleEngine,
    RuleLoadError,
    RuleReloader,
    SequenceSlice,
    load_rules,
)
from monitor.rules.cli import check_rules, run_tests
from monitor.rules.pooling import (
    AggregationError,
    FeatureAggregation,
    parse_pooling,
)
from monitor.rules.testing import TestFileError, run_test_file

REPO = Path(__file__).resolve().parents[2]

POOLED = """\
features:
  f: probes/f
  g: probes/g
rules:
  - rule: r
    severity: info
    condition: pooled(f) > 0.5{extra}
"""


def _write(tmp_path: Path, text: str, name: str = "rules.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _known(f: str, g: str = "max_rolling_mean:8", roles: tuple[str, ...] = ("user",)):
    thresholds = {"probes/f": 1.0, "probes/g": None}
    return PackFeatures(
        thresholds,
        {"probes/f": FeatureAggregation(f, roles), "probes/g": FeatureAggregation(g, roles)},
    )


def _load(tmp_path: Path, aggregation: str, extra: str = "", **kw):  # type: ignore[no-untyped-def]
    path = _write(tmp_path, POOLED.format(extra=extra))
    return load_rules([path], _known(aggregation, **kw)).rules[0]


def _errors(tmp_path: Path, text: str, known: PackFeatures | None) -> list[str]:
    path = _write(tmp_path, text)
    with pytest.raises(RuleLoadError) as caught:
        load_rules([path], known)
    return [str(issue) for issue in caught.value.issues]


# --------------------------------------------------------------------------- expansion


@pytest.mark.parametrize(
    ("aggregation", "window", "guard", "window_roles"),
    [
        ("max_rolling_mean:8", 8, 1, ()),
        ("max", 1, 1, ()),
        ("max_rolling_mean:512,for:8", 512, 8, ()),
        ("max_rolling_mean:512,roles", 512, 1, ("user",)),
        ("max_rolling_mean:512,for:4,roles", 512, 4, ("user",)),
    ],
)
def test_each_aggregation_expands_to_its_rule(
    tmp_path: Path, aggregation: str, window: int, guard: int, window_roles: tuple[str, ...]
) -> None:
    rule = _load(tmp_path, aggregation)
    assert (rule.for_tokens, rule.window_roles, rule.at) == (guard, window_roles, "token")
    assert rule.roles == ("user",)  # unset: the roles the probe was fitted on
    # The same program as the hand-written rule: same digest, so the same state and firings.
    extra = f"\n    for: {guard}" + (
        f"\n    window_roles: [{', '.join(window_roles)}]" * bool(window_roles)
    )
    hand = _write(
        tmp_path,
        POOLED.format(extra=extra).replace("pooled(f)", f"rolling_mean(f, {window})"),
        "hand.yaml",
    )
    written = load_rules([hand], _known(aggregation)).rules[0]
    assert rule.condition.digest == written.condition.digest
    assert rule.state_key == written.state_key


def test_a_turn_end_aggregation_checks_the_rule_at_turn_ends(tmp_path: Path) -> None:
    rule = _load(tmp_path, "max_rolling_mean:512,roles,turn_end", roles=("assistant",))
    assert rule.at == "turn_end"
    assert (rule.for_tokens, rule.window_roles, rule.roles) == (1, ("assistant",), ("assistant",))
    plain = _load(tmp_path, "max_rolling_mean:512,turn_end")
    assert (plain.at, plain.window_roles) == ("turn_end", ())


def test_explicit_keys_that_agree_are_kept_and_roles_may_differ(tmp_path: Path) -> None:
    extra = "\n    for: 8 tokens\n    window_roles: [user]\n    roles: [assistant]"
    rule = _load(tmp_path, "max_rolling_mean:512,for:8,roles", extra=extra)
    assert (rule.for_tokens, rule.window_roles, rule.roles) == (8, ("user",), ("assistant",))


def test_pooled_in_a_macro_and_in_several_places(tmp_path: Path) -> None:
    text = (
        "features: {f: probes/f, g: probes/g}\n"
        "macros: {span: pooled(f)}\n"
        "rules:\n"
        "  - {rule: a, severity: info, condition: span > 1}\n"
        "  - {rule: b, severity: info, condition: span > 1 and pooled(g) < 2}\n"
    )
    path = _write(tmp_path, text)
    ruleset = load_rules([path], _known("max_rolling_mean:16,for:2", g="max_rolling_mean:4,for:2"))
    rules = {rule.name: rule for rule in ruleset.rules}
    assert rules["a"].for_tokens == rules["b"].for_tokens == 2
    assert ruleset.pooled == {
        "a": {"probes/f": "max_rolling_mean:16,for:2"},
        "b": {"probes/f": "max_rolling_mean:16,for:2", "probes/g": "max_rolling_mean:4,for:2"},
    }
    windows = sorted(i.param for i in rules["b"].condition.program if i.kind == "rolling_mean")
    assert windows == [(4.0,), (16.0,)]  # windows may differ; for/window_roles/at may not


def test_a_pooled_rule_fires_exactly_as_the_hand_written_one(tmp_path: Path) -> None:
    aggregation = "max_rolling_mean:6,for:3,roles"
    pooled = _write(tmp_path, POOLED.format(extra=""), "pooled.yaml")
    hand = _write(
        tmp_path,
        POOLED.format(extra="\n    for: 3\n    roles: [user]\n    window_roles: [user]").replace(
            "pooled(f)", "rolling_mean(f, 6)"
        ),
        "hand.yaml",
    )
    g = torch.Generator().manual_seed(3)
    values = torch.randn(400, generator=g) + 0.4
    turns = [("system", 20), ("user", 90), ("assistant", 60), ("user", 150), ("assistant", 80)]
    fired = []
    for path in (pooled, hand):
        engine = RuleEngine(load_rules([path], _known(aggregation)))
        slices, row = [], 0
        for role, n in turns:
            slices.append(SequenceSlice("c", row, n, row, role))
            row += n
        result = engine.evaluate({"probes/f": values, "probes/g": values}, slices)
        fired.append([(f.rule, f.position, f.value) for f in result.firings])
    assert fired[0] == fired[1] and fired[0]


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("extra", "line", "key"),
    [
        ("\n    for: 4 tokens", 8, "'for: 4'"),
        ("\n    window_roles: [assistant]", 8, "'window_roles: [assistant]'"),
    ],
)
def test_a_conflicting_key_is_a_located_error_naming_the_aggregation(
    tmp_path: Path, extra: str, line: int, key: str
) -> None:
    (error,) = _errors(
        tmp_path, POOLED.format(extra=extra), _known("max_rolling_mean:512,for:8,roles")
    )
    assert error.startswith(f"{tmp_path / 'rules.yaml'}:{line}:")
    assert f"{key} conflicts with pooled(f)" in error
    assert "probes/f was fitted as max_rolling_mean:512,for:8,roles" in error
    assert "rolling_mean(f, 512)" in error  # how to pool differently on purpose


def test_a_guard_on_a_pooling_without_one_conflicts(tmp_path: Path) -> None:
    (error,) = _errors(tmp_path, POOLED.format(extra="\n    for: 2"), _known("max_rolling_mean:8"))
    assert ":8:10: 'for: 2' conflicts with pooled(f)" in error
    assert "(rolling_mean(., 8) with for: 1, no window_roles, at: token)" in error


def test_pooled_features_that_need_different_rule_keys_are_an_error(tmp_path: Path) -> None:
    text = POOLED.format(extra="").replace("pooled(f) > 0.5", "pooled(f) > 0.5 and pooled(g) > 1")
    (error,) = _errors(tmp_path, text, _known("max_rolling_mean:8,for:2", g="max_rolling_mean:8"))
    assert ":7:36: pooled(g) and pooled(f) cannot pool in one rule" in error
    assert "max_rolling_mean:8,for:2" in error and "split the rule" in error


@pytest.mark.parametrize(
    ("aggregation", "expected"),
    [
        ("", "probes/f records no aggregation (an SAE feature"),
        ("mean", "of at most 512 tokens its served form is max_rolling_mean:512,roles,"),
        ("max_rolling_mean:8,for:2,turn_end", "for:K cannot go with turn_end"),
        ("max_rolling_mean:x", "is not max_rolling_mean:W"),
    ],
)
def test_a_feature_without_a_servable_aggregation_is_a_located_error(
    tmp_path: Path, aggregation: str, expected: str
) -> None:
    (error,) = _errors(tmp_path, POOLED.format(extra=""), _known(aggregation))
    assert error.startswith(f"{tmp_path / 'rules.yaml'}:7:16: pooled(f)")
    assert expected in error


def test_a_role_masked_pooling_from_a_pack_without_labeled_roles(tmp_path: Path) -> None:
    known = _known("max_rolling_mean:512,roles", roles=())
    (error,) = _errors(tmp_path, POOLED.format(extra=""), known)
    assert ":7:16: pooled(f)" in error and "set window_roles" in error
    # Set by hand, it is taken (the pack cannot say otherwise).
    path = _write(tmp_path, POOLED.format(extra="\n    window_roles: [user]"))
    rule = load_rules([path], known).rules[0]
    assert (rule.window_roles, rule.roles) == (("user",), ())


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        ("pooled(1) > 0", "pooled() takes one feature alias"),
        ("pooled(f, 8) > 0", "2 arguments given"),
        ("pooled(f + 1) > 0", "its argument is an expression"),
        ("pooled(h) > 0", "'h' is not a feature alias"),
        ("pooled > 0", "'pooled' is a function; call it as pooled(...)"),
        ("poled(f) > 0", "(did you mean 'pooled'?)"),
    ],
)
def test_pooled_syntax_errors(tmp_path: Path, condition: str, expected: str) -> None:
    text = POOLED.format(extra="").replace("pooled(f) > 0.5", condition)
    errors = _errors(tmp_path, text, _known("max_rolling_mean:8"))
    assert any(expected in error for error in errors), errors


def test_pooled_is_not_a_name_for_an_alias(tmp_path: Path) -> None:
    errors = _errors(tmp_path, "features: {pooled: probes/f}\n", None)
    assert any("'pooled' is not a valid name" in error for error in errors)


def test_without_packs_pooled_is_a_located_error(tmp_path: Path) -> None:
    (error,) = _errors(tmp_path, POOLED.format(extra=""), None)
    assert error.startswith(f"{tmp_path / 'rules.yaml'}:7:16: pooled(f) pools probes/f")
    assert "load these rules with their packs" in error and "aggregations:" in error


# --------------------------------------------------------------------------- without packs


def test_rules_check_without_packs_says_what_it_did_not_expand(tmp_path: Path) -> None:
    path = _write(tmp_path, POOLED.format(extra="\n    for: nonsense"))
    out, err = io.StringIO(), io.StringIO()
    assert check_rules([path], None, out, err) == 1  # everything else is still checked
    assert ":8:10: 'for' must be a positive number" in err.getvalue()
    path = _write(tmp_path, POOLED.format(extra=""))
    out, err = io.StringIO(), io.StringIO()
    assert check_rules([path], None, out, err) == 0, err.getvalue()
    lines = out.getvalue().splitlines()
    assert lines[0] == (
        f"note: {path}:7:16: pooled(f) not expanded: probes/f's pooling is recorded in its "
        "pack (pass --packs); the rule is checked without it"
    )
    assert lines[1].startswith("OK: 0 rules (0 enabled) in 1 files; 1 pooled() not expanded")
    out = io.StringIO()
    assert check_rules([path], _known("max_rolling_mean:8"), out, err) == 0
    assert out.getvalue() == "OK: 1 rules (1 enabled) in 1 files\n"
    # A conflict needs the pack to be seen: with it, rules check finds it.
    conflict = _write(tmp_path, POOLED.format(extra="\n    for: 3"), "conflict.yaml")
    assert check_rules([conflict], None, io.StringIO(), io.StringIO()) == 0
    err = io.StringIO()
    assert check_rules([conflict], _known("max_rolling_mean:8"), io.StringIO(), err) == 1
    assert "'for: 3' conflicts with pooled(f)" in err.getvalue()


TEST_FILE = """\
rule_files: [rules.yaml]
{aggregations}
tests:
  - name: pooled as declared
    conversations:
      c:
        turns:
          - {{role: user, tokens: 10}}
        series:
          f: "0x4 1x6"
    expect:
      - {{rule: r, conversation: c, at_token: {at}}}
"""


@pytest.mark.parametrize(
    ("aggregations", "at"),
    [
        ('aggregations:\n  f: "max_rolling_mean:2"', 5),
        ('aggregations:\n  probes/f: "max_rolling_mean:2,for:3"', 7),
        ("aggregations:\n  f: {aggregation: 'max_rolling_mean:4,roles', labeled_roles: [user]}", 6),
    ],
)
def test_rules_test_files_declare_the_aggregations(
    tmp_path: Path, aggregations: str, at: int
) -> None:
    _write(tmp_path, POOLED.format(extra=""))
    test = _write(tmp_path, TEST_FILE.format(aggregations=aggregations, at=at), "t_test.yaml")
    result = run_test_file(test)
    assert result.passed, (result.load_error, [c.fired for c in result.cases])


def test_a_rules_test_file_without_aggregations_fails_to_load_and_says_why(
    tmp_path: Path,
) -> None:
    _write(tmp_path, POOLED.format(extra=""))
    test = _write(tmp_path, TEST_FILE.format(aggregations="", at=5), "t_test.yaml")
    out = io.StringIO()
    assert run_tests([test], out=out) == 1
    assert "pooled(f) pools probes/f as its pack recorded" in out.getvalue()
    assert "a rules test file declares 'aggregations:'" in out.getvalue()
    bad = _write(
        tmp_path, TEST_FILE.format(aggregations="aggregations: {nope: max}", at=5), "b_test.yaml"
    )
    with pytest.raises(TestFileError, match="unknown feature alias 'nope'"):
        run_test_file(bad)
    unused = TEST_FILE.format(aggregations="aggregations: {probes/zz: max}", at=5)
    with pytest.raises(TestFileError, match="unknown feature alias 'probes/zz'"):
        run_test_file(_write(tmp_path, unused, "u_test.yaml"))
    roles = TEST_FILE.format(
        aggregations="aggregations: {f: {aggregation: max, labeled_roles: [null, 3]}}", at=5
    )
    with pytest.raises(TestFileError, match="labeled_roles must be non-empty strings"):
        run_test_file(_write(tmp_path, roles, "r_test.yaml"))


def test_the_shipped_rule_tests_declare_what_the_shipped_pack_records() -> None:
    """rules/tests pin the pooling their expectations were written for; it must be the
    shipped pack's, or the tests test rules that are not served."""
    import yaml

    from monitor.demo_minilm import PACK
    from monitor.features.pack import load_pack

    recorded = PackFeatures.of([load_pack(PACK)]).aggregations
    for test in sorted((REPO / "rules" / "tests").glob("*_test.yaml")):
        declared = yaml.safe_load(test.read_text())["aggregations"]
        for alias, value in declared.items():
            want = recorded[f"probes/{alias}"]
            declared_here = (value["aggregation"], tuple(sorted(value["labeled_roles"])))
            assert declared_here == (want.aggregation, want.labeled_roles), (
                f"rules/tests/{test.name} declares {alias}: {declared_here}, the shipped pack "
                f"records {want}: update its aggregations: and the expectations they imply"
            )


# --------------------------------------------------------------------------- the grammar


@pytest.mark.parametrize(
    "text",
    [
        "max",
        "max_rolling_mean:1",
        "max_rolling_mean:8",
        "max_rolling_mean:4096",
        "max_rolling_mean:512,for:8",
        "max_rolling_mean:512,roles",
        "max_rolling_mean:512,for:64,roles",
        "max_rolling_mean:512,roles,for:4",
        "max_rolling_mean:0",
        "max_rolling_mean:4097",
        "max_rolling_mean:8,for:65",
        "max_rolling_mean:8,for:2,for:3",
        "max_rolling_mean:8,roles,roles",
        "max_rolling_mean:8,bogus",
        "min_rolling_mean:8",
        "max_rolling_mean:512,roles,turn_end",
        "max_rolling_mean:512,turn_end",
        "max_rolling_mean:512,turn_end,roles",
        "max_rolling_mean:8,for:2,turn_end",
        "max_rolling_mean:8,turn_end,turn_end",
        "max,turn_end",
        "mean,turn_end",
        # Counts in ASCII digits only, in both parsers ('²' passes str.isdigit, '٣' is 3
        # to int()); a leading zero is the same count to both.
        "max_rolling_mean:\u00b2",
        "max_rolling_mean:\u0663",
        "max_rolling_mean:8,for:\u2460",
        "max_rolling_mean:8,for:\u0663,roles",
        "max_rolling_mean:08",
        "max_rolling_mean:8,for:02",
        "max_rolling_mean:+8",
        "max_rolling_mean:123456",
    ],
)
def test_the_rules_parser_agrees_with_pack_fits(text: str) -> None:
    """The rules package parses the aggregation grammar itself (it must not import the
    pack-building code); both parsers accept the same texts with the same meaning."""
    try:
        fitted = (
            parse_aggregation(text)[1],
            aggregation_guard(text),
            aggregation_masked(text),
            aggregation_turn_end(text),
        )
    except FeatureError:
        fitted = None
    try:
        pooling = parse_pooling(text)
        served = (pooling.window, pooling.guard, pooling.masked, pooling.turn_end)
    except AggregationError:
        served = None
    assert served == fitted


@pytest.mark.parametrize(
    "text",
    [
        "max_rolling_mean:\u00b2",
        "max_rolling_mean:\u0663",
        "max_rolling_mean:8,for:\u2460",
        "max_rolling_mean:+8",
        "max_rolling_mean: 8",
        "max_rolling_mean:123456",
    ],
)
def test_only_ascii_counts_are_windows_and_guards(tmp_path: Path, text: str) -> None:
    """A pack's aggregation comes from elsewhere: '²' passes str.isdigit() and int() refuses
    it; '٣' is a digit to int(). Both are located errors, never a traceback or a window."""
    with pytest.raises(AggregationError):
        parse_pooling(text)
    (error,) = _errors(tmp_path, POOLED.format(extra=""), _known(text))
    assert ":7:16: pooled(f): probes/f's aggregation cannot be served by a rule" in error


# --------------------------------------------------------------------------- reload


def test_a_reload_expands_against_the_packs_it_was_given(tmp_path: Path) -> None:
    """The sidecar loads its packs once, at start: a reload (poll or SIGHUP) expands pooled()
    against the running packs, so the rules always pool as the probe being served was
    fitted; a restart with a refitted pack expands against the new one."""
    path = _write(tmp_path, POOLED.format(extra=""))
    reloader = RuleReloader([path], known_features=_known("max_rolling_mean:8,for:2"))
    first = reloader.check()
    assert first is not None and first.ok and first.ruleset is not None
    assert first.ruleset.rules[0].for_tokens == 2
    path.write_text(POOLED.format(extra="").replace("0.5", "0.75"))
    second = reloader.check()
    assert second is not None and second.ok and second.ruleset is not None
    assert second.ruleset.rules[0].for_tokens == 2  # still the running pack's pooling
    assert second.ruleset.pooled == {"r": {"probes/f": "max_rolling_mean:8,for:2"}}
    # What a restart with a refitted pack does: the same file, the new pack's pooling.
    refit = RuleReloader([path], known_features=_known("max_rolling_mean:32,roles"))
    third = refit.check()
    assert third is not None and third.ok and third.ruleset is not None
    rule = third.ruleset.rules[0]
    assert (rule.for_tokens, rule.window_roles) == (1, ("user",))
    assert [i.param for i in rule.condition.program if i.kind == "rolling_mean"] == [(32.0,)]


# --------------------------------------------------------------------------- pooling notes


def _pack(aggregation: str, roles: tuple[str, ...] = ("user",)):  # type: ignore[no-untyped-def]
    """A pack of two probe columns, f and g, both recording `aggregation` and `roles`."""
    import math

    from monitor.features import RestrictedEncoder
    from monitor.features.pack import FeatureInfo, FeaturePack, HookPointEncoder

    encoder = RestrictedEncoder(
        weight=torch.randn(8, 2),
        bias=torch.zeros(2),
        floor=torch.full((2,), -math.inf),
        normalization="none",
    )
    infos = [
        FeatureInfo(
            name=name,
            hook_point="layers.1",
            activation="identity",
            sae_index=None,
            alert_threshold=1.0,
            aggregation=aggregation,
            threshold_pooling=aggregation,
            labeled_roles=roles,
        )
        for name in ("f", "g")
    ]
    return FeaturePack("probes", {"layers.1": HookPointEncoder("layers.1", encoder, infos)})


def _notes(tmp_path: Path, text: str, aggregation: str) -> list[str]:
    from monitor.evaluation.engine_replay import pack_features, pooling_notes

    pack = _pack(aggregation)
    return pooling_notes(load_rules([_write(tmp_path, text)], pack_features([pack])), [pack])


def test_a_pooled_rule_gets_no_pooling_note_unless_it_checks_other_roles(
    tmp_path: Path,
) -> None:
    for aggregation in ("max_rolling_mean:8", "max_rolling_mean:512,for:8,roles"):
        assert _notes(tmp_path, POOLED.format(extra=""), aggregation) == []
        assert _notes(tmp_path, POOLED.format(extra="\n    roles: [user]"), aggregation) == []
    (note,) = _notes(
        tmp_path, POOLED.format(extra="\n    roles: [assistant]"), "max_rolling_mean:8,roles"
    )
    assert note.startswith("rule 'r' pools probes/f with pooled() as the pack fitted it")
    assert "roles: [assistant] and window_roles: [user]" in note


def test_a_hand_written_rule_off_a_turn_end_pooling_is_noted(tmp_path: Path) -> None:
    aggregation = "max_rolling_mean:512,roles,turn_end"
    hand = POOLED.format(extra="\n    roles: [user]\n    window_roles: [user]").replace(
        "pooled(f)", "rolling_mean(f, 512)"
    )
    (note,) = _notes(tmp_path, hand, aggregation)  # checked at every token, not at turn ends
    assert "with for: 1, roles: [user] and window_roles: [user], but the pack" in note
    assert "window_roles: [user], the roles its fit data labeled, at: turn_end)" in note
    assert "pooled(<alias>) follows the pack" in note
    assert _notes(tmp_path, POOLED.format(extra=""), aggregation) == []


# --------------------------------------------------------------------------- recalibration


CALIBRATED = """\
features: {f: probes/f}
thresholds:
  t: {value: 0.5, pooled: {"probes/f": "max_rolling_mean:8"}}   # rules calibrate
macros:
  span: pooled(f)
rules:
  - rule: r
    severity: info
    condition: span > t
"""


def test_a_threshold_calibrated_for_another_pooling_is_noted(tmp_path: Path) -> None:
    """`rules calibrate` records the pooling a threshold was set under; after a refit that
    pools the feature otherwise the rules still load (so they can be recalibrated), with a
    located note that eval, rules calibrate, rules check and the sidecar show."""
    path = _write(tmp_path, CALIBRATED)
    same = load_rules([path], _known("max_rolling_mean:8"))
    assert same.notes == [] and same.thresholds["t"].value == 0.5
    assert same.thresholds["t"].pooled == {"probes/f": "max_rolling_mean:8"}
    refit = load_rules([path], _known("max_rolling_mean:512,roles,turn_end"))
    (note,) = refit.notes
    assert note.startswith(f"{path}:3:3: threshold 't' was calibrated with probes/f pooled as ")
    assert "'max_rolling_mean:8', and rule 'r' now pools it as max_rolling_mean:512,roles," in note
    assert note.endswith("re-run rules calibrate")
    out = io.StringIO()
    known = _known("max_rolling_mean:512,roles,turn_end")
    assert check_rules([path], known, out, io.StringIO()) == 0
    assert out.getvalue().startswith(f"note: {note}\n")
    from monitor.evaluation.engine_replay import pooling_notes

    assert pooling_notes(refit, []) == [note]


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("{value: 1, poled: {}}", "threshold 't': unknown key 'poled' (did you mean 'pooled'?)"),
        ("{pooled: {}}", "threshold 't' must have a 'value'"),
        ("{value: 1, pooled: [x]}", "threshold 't': 'pooled' must map features to poolings"),
        ("{value: x, pooled: {}}", "threshold 't' must be a number or '<pack>/<feature>'"),
    ],
)
def test_malformed_calibrated_thresholds(tmp_path: Path, entry: str, expected: str) -> None:
    text = CALIBRATED.replace('{value: 0.5, pooled: {"probes/f": "max_rolling_mean:8"}}', entry)
    errors = _errors(tmp_path, text, _known("max_rolling_mean:8"))
    assert any(expected in error for error in errors), errors


def test_rules_calibrate_writes_the_pooling_with_the_number(tmp_path: Path) -> None:
    from monitor.evaluation.calibrate import replace_thresholds

    text = "thresholds:\n  t: 0.5   # set by rules calibrate\n  u: {value: 2}\n"
    pooled = {"t": {"probes/f": "max_rolling_mean:8"}, "u": {}}
    updated = replace_thresholds(text, {"t": 0.25, "u": 3.0}, pooled)
    assert updated == (
        'thresholds:\n  t: {value: 0.25, pooled: {"probes/f": "max_rolling_mean:8"}}   # set by '
        "rules calibrate\n  u: 3\n"
    )
    path = _write(tmp_path, CALIBRATED)
    again = replace_thresholds(path.read_text(), {"t": 0.75}, {"t": {"probes/f": "max"}})
    path.write_text(again)
    ruleset = load_rules([path], _known("max"))
    assert ruleset.thresholds["t"].value == 0.75 and ruleset.notes == []


# --------------------------------------------------------------------------- at: turn_end


def test_an_explicit_at_must_agree_with_a_turn_end_pooling(tmp_path: Path) -> None:
    known = _known("max_rolling_mean:512,roles,turn_end")
    (error,) = _errors(tmp_path, POOLED.format(extra="\n    at: token"), known)
    assert ":8:9: 'at: token' conflicts with pooled(f)" in error
    assert "fitted as max_rolling_mean:512,roles,turn_end" in error
    assert "at: turn_end)" in error
    rule = _load(tmp_path, "max_rolling_mean:512,roles,turn_end", extra="\n    at: turn_end")
    assert rule.at == "turn_end"
    (error,) = _errors(tmp_path, POOLED.format(extra="\n    at: turn_end"), _known("max"))
    assert "'at: turn_end' conflicts with pooled(f)" in error
    # A guard cannot go with a turn-end pooling: the conflict names the aggregation.
    errors = _errors(tmp_path, POOLED.format(extra="\n    for: 4"), known)
    assert any("'for: 4' conflicts with pooled(f)" in error for error in errors), errors


def test_a_turn_end_pooled_rule_fires_at_turn_ends_as_the_hand_written_one(
    tmp_path: Path,
) -> None:
    """The turn mean: the user's mean read at the end of each user turn, nowhere else."""
    aggregation = "max_rolling_mean:512,roles,turn_end"
    pooled = _write(tmp_path, POOLED.format(extra=""), "pooled.yaml")
    hand = _write(
        tmp_path,
        POOLED.format(
            extra="\n    roles: [user]\n    window_roles: [user]\n    at: turn_end"
        ).replace("pooled(f)", "rolling_mean(f, 512)"),
        "hand.yaml",
    )
    values = torch.cat(
        [
            torch.full((5,), 3.0),
            torch.full((20,), 0.4),
            torch.full((10,), 2.0),
            torch.full((15,), 0.9),
        ]
    )
    turns = [("system", 5), ("user", 20), ("assistant", 10), ("user", 15)]
    fired = []
    for path in (pooled, hand):
        rules = load_rules([path], _known(aggregation))
        assert rules.rules[0].at == "turn_end"
        engine = RuleEngine(rules)
        slices, row = [], 0
        for role, n in turns:
            slices.append(SequenceSlice("c", row, n, row, role, turn_end=True))
            row += n
        result = engine.evaluate({"probes/f": values, "probes/g": values}, slices)
        fired.append([(f.rule, f.position, round(f.value, 5)) for f in result.firings])
    # The first user turn's mean is 0.4 (the system prompt is not in the window); after the
    # second it is (20 * 0.4 + 15 * 0.9) / 35 = 0.614 > 0.5, at its last token only.
    assert fired[0] == fired[1] == [("r", 49, 0.61429)]


def test_a_rules_test_file_with_a_turn_end_aggregation(tmp_path: Path) -> None:
    _write(tmp_path, POOLED.format(extra=""))
    text = TEST_FILE.format(
        aggregations="aggregations:\n  f: {aggregation: 'max_rolling_mean:512,roles,turn_end', "
        "labeled_roles: [user]}",
        at=9,
    )
    assert run_test_file(_write(tmp_path, text, "t_test.yaml")).passed
    still_open = text.replace(
        "{role: user, tokens: 10}", "{role: user, tokens: 10, turn_end: false}"
    )
    result = run_test_file(_write(tmp_path, still_open, "open_test.yaml"))
    assert not result.passed and result.cases[0].fired == []  # no turn end, no check


def test_rules_calibrate_rewrites_a_block_style_entry_and_keeps_what_follows(
    tmp_path: Path,
) -> None:
    import yaml

    from monitor.evaluation.calibrate import replace_thresholds

    text = (
        "thresholds:\n"
        "  t:\n"
        "    value: 3\n"
        "    pooled:\n"
        "      probes/f: max_rolling_mean:8\n"
        "  # a comment that stays\n"
        "  u: 4\n"
    )
    out = replace_thresholds(text, {"t": 5.0, "u": 6.0}, {"t": {"probes/f": "max"}})
    assert out == (
        "thresholds:\n"
        "  t:\n"
        '    {value: 5, pooled: {"probes/f": "max"}}\n'
        "  # a comment that stays\n"
        "  u: 6\n"
    )
    assert yaml.safe_load(out) == {
        "thresholds": {"t": {"value": 5, "pooled": {"probes/f": "max"}}, "u": 6}
    }


def test_recalibration_notes_escape_and_skip_pack_thresholds(tmp_path: Path) -> None:
    hostile = CALIBRATED.replace('"max_rolling_mean:8"', '"\\e[31mRED\\nnote: forged"')
    path = _write(tmp_path, hostile)
    known = _known("max_rolling_mean:8")
    (note,) = load_rules([path], known).notes
    assert "\x1b" not in note and "\n" not in note
    out = io.StringIO()
    assert check_rules([path], known, out, io.StringIO()) == 0
    assert "\x1b" not in out.getvalue() and out.getvalue().count("\n") == 2  # note, summary
    # A threshold that is the pack feature's own calibrated value follows the refit.
    pack_value = CALIBRATED.replace("value: 0.5", "value: probes/f")
    assert load_rules([_write(tmp_path, pack_value)], _known("max_rolling_mean:4")).notes == []
    # One mistake, one error.
    errors = _errors(tmp_path, CALIBRATED.replace("value: 0.5, ", ""), known)
    assert errors == [f"{tmp_path / 'rules.yaml'}:3:6: threshold 't' must have a 'value'"]
