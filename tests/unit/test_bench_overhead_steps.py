"""`bench overhead` (transformers): the per-step estimators beside the headline loss: the
`StepClock` stamps every generated token, `decode_step_times` gives the median and mean decode
step (prefill out), and the summary pairs them with the same round's baseline."""

from __future__ import annotations

import pytest
import torch

from monitor.bench.overhead import (
    NULL_MODE,
    StepClock,
    _generate,
    _interleaved_rounds,
    _summarise,
    build_bench_model,
    decode_step_times,
    format_table,
    round_orders,
)


def test_decode_step_times_leaves_the_prefill_out():
    # Prefill ends at 10.0 (its length is unknown to the clock and not counted); then decode
    # steps of 1, 2, 3 and a slow 10 seconds.
    median, mean = decode_step_times([10.0, 11.0, 13.0, 16.0, 26.0])
    assert median == pytest.approx(2.5)  # the slow step moves the median by half a step
    assert mean == pytest.approx(4.0)  # and the mean by its whole share


@pytest.mark.parametrize(
    ("stamps", "message"),
    [([], "expected >= 2"), ([1.0], "got 1"), ([1.0, 2.0, 1.5, 3.0], "at step 2")],
)
def test_decode_step_times_rejects_bad_stamps_naming_the_place(stamps, message):
    with pytest.raises(ValueError, match=message):
        decode_step_times(stamps)


def test_the_step_clock_stamps_every_generated_token_and_never_stops():
    model = build_bench_model(hidden=64, layers=2)
    prompt = torch.randint(0, 8192, (2, 4), generator=torch.Generator().manual_seed(0))
    clock = StepClock()
    plain = _generate(model, prompt, 5)
    clocked = _generate(model, prompt, 5, clock)
    assert len(clock.stamps) == 5  # after the prefill's token and each of 4 decode steps
    assert clock.stamps == sorted(clock.stamps)
    assert torch.equal(plain, clocked)  # the same tokens: the clock only watches


def _runs(rounds: int) -> tuple[dict, int]:
    # Whole calls: sidecar-up 4% slower. Median decode step: 2% slower; mean decode step: 3%.
    base = [1.0 + 0.01 * i for i in range(rounds)]
    step = [0.020 + 0.0001 * i for i in range(rounds)]
    modes = ("baseline", "sidecar-up")
    return {
        "orders": [list(o) for o in round_orders(modes, rounds)],
        "seconds": {"baseline": base, "sidecar-up": [b * 1.04 for b in base]},
        "thread_cpu": {m: [0.02] * rounds for m in modes},
        "process_cpu": {m: [0.02] * rounds for m in modes},
        "step_median": {"baseline": step, "sidecar-up": [s * 1.02 for s in step]},
        "step_mean": {"baseline": step, "sidecar-up": [s * 1.03 for s in step]},
    }, 10


def test_summary_pairs_the_step_estimators_and_keeps_the_headline():
    runs, steps = _runs(7)
    result = _summarise(runs, steps, {}, None, 64, 2, 4)
    up = result["modes"]["sidecar-up"]
    # The headline stays the whole-call throughput loss.
    assert up["overhead_pct"] == pytest.approx(100 * (1 - 1 / 1.04), abs=0.01)
    assert up["step_loss_pct_median"] == pytest.approx(100 * (1 - 1 / 1.02), abs=0.01)
    assert up["decode_loss_pct_median"] == pytest.approx(100 * (1 - 1 / 1.03), abs=0.01)
    assert up["step_loss_pct_ci_low"] <= up["step_loss_pct_median"] <= up["step_loss_pct_ci_high"]
    assert "step_loss_pct_median" not in result["modes"]["baseline"]
    assert result["per_round"]["step_median_s"]["sidecar-up"][0] == pytest.approx(0.0204)
    table = format_table(result)
    assert "median step   1.96% (1.96 to 1.96), mean step   2.91% (2.91 to 2.91)" in table


def test_runs_without_step_times_still_summarise():
    # A result from before the step clock (or a hand-made one) has no step lists.
    runs, steps = _runs(5)
    del runs["step_median"], runs["step_mean"]
    result = _summarise(runs, steps, {}, None, 64, 2, 4)
    assert "step_loss_pct_median" not in result["modes"]["sidecar-up"]
    assert "per-step loss" not in format_table(result)


def test_the_rounds_time_every_mode_the_null_mode_too():
    model = build_bench_model(hidden=64, layers=2)
    prompt = torch.randint(0, 8192, (1, 4), generator=torch.Generator().manual_seed(0))
    runs = _interleaved_rounds(model, prompt, 4, 2, {}, ("baseline", NULL_MODE))
    for key in ("step_median", "step_mean"):
        for mode in ("baseline", NULL_MODE):
            assert len(runs[key][mode]) == 2 and all(v > 0 for v in runs[key][mode])
    # A decode step is shorter than the whole call divided by the decode steps (prefill out).
    assert all(
        m < s / 3
        for m, s in zip(runs["step_mean"]["baseline"], runs["seconds"]["baseline"], strict=True)
    )
    result = _summarise(runs, 4, {}, None, 64, 2, 1)
    assert "step_loss_pct_median" in result["modes"][NULL_MODE]
