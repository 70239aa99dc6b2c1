"""`bench overhead --engine vllm --linger-ms 0,20`: the list's parsing (a bad value named with
its place), the modes' names, the mirrored round order, the per-pair loss, and the linger
comparison in the table. The engine side (`vllm_engine`'s `linger` op) runs in the bench."""

from __future__ import annotations

import pytest

from monitor.bench.vllm_overhead import (
    ENGINE_MODES,
    PAUSED_MODE,
    _engine_of,
    _lingers,
    _pairs_summary,
    format_vllm_table,
    linger_mode,
    parse_lingers,
    round_order,
)


def test_a_list_of_lingers_and_its_mode_names():
    assert parse_lingers("0,20") == (0.0, 20.0)
    assert parse_lingers(" 20 ") == (20.0,)  # one value: as before, sidecar-up lingers 20
    assert parse_lingers("20,0,2.5") == (20.0, 0.0, 2.5)
    assert [linger_mode(v) for v in (20.0, 0.0, 2.5)] == [
        "sidecar-up-linger20",
        "sidecar-up-linger0",
        "sidecar-up-linger2.5",
    ]
    assert _lingers(None) == () and _lingers(5) == (5.0,) and _lingers([0, 20]) == (0.0, 20.0)
    # Every extra linger, and up-paused, runs on the sidecar-up engine.
    assert {_engine_of(m) for m in ("sidecar-up-linger20", PAUSED_MODE, "sidecar-up")} == {
        "sidecar-up"
    }
    assert _engine_of("sidecar-down") == "sidecar-down"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0,x", r"--linger-ms '0,x', value 2 \('x'\): not a number"),
        ("0,,20", r"value 2 \(''\): not a number"),
        ("5,-1", r"value 2 \('-1'\): expected 0..1000 ms"),
        ("1001", r"value 1 \('1001'\): expected 0..1000 ms"),
        ("0,nan", r"value 2 \('nan'\): expected 0..1000"),
        ("0,inf", r"value 2 \('inf'\): expected 0..1000"),
        ("20,0,20", r"value 3 \('20'\): given twice"),
        ("0,1,2,3,4", "at most 4 values"),
    ],
)
def test_bad_lingers_are_named_with_their_place(text, message):
    with pytest.raises(ValueError, match=message):
        parse_lingers(text)


def test_the_command_line_refuses_a_bad_list_and_a_list_for_transformers(capsys):
    from monitor.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["bench", "overhead", "--engine", "vllm", "--linger-ms", "0,x"])
    assert exited.value.code == 2
    assert "argument --linger-ms: --linger-ms '0,x', value 2 ('x')" in capsys.readouterr().err
    assert main(["bench", "overhead", "--linger-ms", "0,20"]) == 2
    assert "a list is for --engine vllm" in capsys.readouterr().err


def test_rounds_go_in_mirrored_pairs_rotating_from_pair_to_pair():
    modes = (*ENGINE_MODES, PAUSED_MODE)
    orders = [round_order(modes, i) for i in range(8)]
    assert orders[0] == modes and orders[1] == modes[::-1]
    assert orders[2] == modes[1:] + modes[:1] and orders[3] == orders[2][::-1]
    for first, second in zip(orders[::2], orders[1::2], strict=True):
        # Within a pair every mode's mean place is the same: a linear drift cancels.
        places = {m: first.index(m) + second.index(m) for m in modes}
        assert set(places.values()) == {len(modes) - 1}
    # Over the rotations every mode runs first once.
    assert {order[0] for order in orders[::2]} == set(modes)


def test_the_loss_per_pair_of_rounds_cancels_a_linear_drift():
    # The base runs at 100 tokens/s, slowing by 4% a round; the mode costs 2% and runs
    # later in the first round of each pair, earlier in the second. Per round the losses
    # alternate around 2%; per pair (tokens over seconds of both) they are 2% within the
    # drift's curvature.
    base, mode = [], []
    for index in range(6):
        drift = 1 - 0.04 * index
        late = 0.01 if index % 2 == 0 else -0.01  # its place in the round, in drift terms
        base.append((100, 100 / (100 * drift)))
        mode.append((100, 100 / (98 * (drift - late))))
    per_round = [
        100 * (1 - (t / s) / (bt / bs)) for (t, s), (bt, bs) in zip(mode, base, strict=True)
    ]
    assert max(per_round) - min(per_round) > 1.5
    pairs = _pairs_summary(mode, base)
    assert pairs["loss_pct_pairs_median"] == pytest.approx(2.0, abs=0.05)
    assert pairs["loss_pct_pairs_max"] - pairs["loss_pct_pairs_min"] < 0.1
    assert _pairs_summary(mode[:1], base[:1]) == {}  # one round: no pair


def test_the_table_shows_each_linger_against_the_first():
    from tests.unit.test_vllm_bench_plugin_time import _result, _row

    same = {
        "loss_pct_median": 2.0,
        "loss_pct_q1": 1.0,
        "loss_pct_q3": 3.0,
        "loss_pct_min": -1.0,
        "loss_pct_max": 6.0,
        "loss_pct_ci_low": 0.5,
        "loss_pct_ci_high": 3.5,
        "itl_ms_paused": 8.0,
        "itl_ms_up": 8.2,
    }
    against = {
        "first_linger_ms": 0.0,
        **{key: -value for key, value in same.items() if key.startswith("loss")},
        "loss_pct_ci_low": -3.5,
        "loss_pct_ci_high": -0.5,
        "monitor_cpu_ms_diff_median": -0.9,
        "monitor_cpu_ms_diff_ci_low": -1.1,
        "monitor_cpu_ms_diff_ci_high": -0.7,
    }
    result = _result(
        {
            "compiled": {
                "off": _row(),
                "sidecar-up": _row(same_engine=same, linger_ms=0.0),
                "sidecar-up-linger20": _row(
                    same_engine=same,
                    against_first_linger=against,
                    linger_ms=20.0,
                    steps_per_message=2.96,
                ),
                "up-paused": _row(),
            }
        },
        linger_ms=[0.0, 20.0],
    )
    text = format_vllm_table(result)
    assert "relay linger 0 ms (sidecar-up, sidecar-down, up-baseline), 20 ms " in text
    assert (
        "compiled: same engine, sidecar-up-linger20 against sidecar-up (linger 0 ms): loss "
        "-2.00% (95% CI -3.50 to -0.50) [-1.0, -3.0] (1.0..-6.0); relay + sidecar CPU per "
        "engine step -0.900 ms (95% CI -1.10 to -0.70); 2.96 steps per message"
    ) in text
    assert "compiled: same engine, sidecar-up-linger20 against up-paused: loss 2.00%" in text
    rows = [line.split() for line in text.splitlines() if line.startswith("compiled ")]
    # The longer mode name widens the column instead of running into the numbers.
    assert rows[2][:4] == ["compiled", "sidecar-up-linger20", "400.0", "8.00"]


def test_the_decode_step_loss_is_paired_per_round():
    from monitor.bench.vllm_overhead import _step_summary

    # The mode's median decode step is 2% slower than the reference's in every round, while
    # the rounds themselves differ by 6%: 2% in every round, and so is the interval.
    base = [5.0, 5.2, 4.9, 5.1, 5.0]
    mode = [b / 0.98 for b in base]
    row = _step_summary(mode, base)
    assert row["step_loss_pct_median"] == pytest.approx(2.0)
    assert row["step_loss_pct_ci_low"] == pytest.approx(2.0)
    assert row["step_loss_pct_ci_high"] == pytest.approx(2.0)
