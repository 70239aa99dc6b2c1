"""`bench overhead` (transformers): the order of the modes within rounds (every mode in every
place equally often, rounds in mirrored pairs), the per-mode summary (the loss's median with
its 95% interval, the model thread's extra CPU per step against the same round's baseline),
and the timer of the CPU inside the capture's hooks."""

from __future__ import annotations

import time
from collections import Counter

import pytest
import torch

from monitor.bench.overhead import (
    LINGER_MODE,
    MODES,
    NULL_MODE,
    _add_hook_cpu,
    _HookTimer,
    _interleaved_rounds,
    _summarise,
    bench_modes,
    build_bench_model,
    extra_cpu_per_step,
    format_table,
    paired_losses,
    round_orders,
)


@pytest.mark.parametrize("modes", [MODES, (*MODES, LINGER_MODE)])
def test_every_mode_runs_in_every_place_equally_often(modes):
    n = len(modes)
    orders = round_orders(modes, 2 * n)
    assert all(sorted(order) == sorted(modes) for order in orders)
    places = Counter((mode, order.index(mode)) for order in orders for mode in modes)
    # A fixed order (the bench before) puts each mode in one place 2n times.
    assert set(places.values()) == {2} and len(places) == n * n
    for first, second in zip(orders[::2], orders[1::2], strict=True):
        assert second == first[::-1]  # mirrored: every mode's mean place in a pair is the same
    # Longer runs repeat the cycle: 31 rounds of 5 modes leave each place count within one.
    counts = Counter((m, o.index(m)) for o in round_orders(modes, 31) for m in modes)
    assert max(counts.values()) - min(counts.values()) <= 2


def test_no_mode_always_follows_the_same_one():
    orders = round_orders(MODES, 2 * len(MODES))
    before = {m: {o[o.index(m) - 1] for o in orders if o.index(m) > 0} for m in MODES}
    assert all(len(modes) > 1 for modes in before.values())


def test_paired_losses_and_extra_cpu():
    assert paired_losses([1.25, 2.0], [1.0, 2.0]) == pytest.approx([20.0, 0.0])
    extra_ms, extra_pct = extra_cpu_per_step([0.55, 0.40], [0.50, 0.40], steps=10)
    assert extra_ms == pytest.approx([5.0, 0.0]) and extra_pct == pytest.approx([10.0, 0.0])


def _runs(rounds: int) -> dict:
    # The baseline drifts slower over the run; sidecar-up takes 4% more wall time and 0.2 ms
    # more of the model thread's CPU per step (of 2 ms) in every round.
    steps = 10
    base = [1.0 + 0.01 * i for i in range(rounds)]
    seconds = {"baseline": base, "sidecar-up": [b * 1.04 for b in base]}
    thread = {"baseline": [0.020] * rounds, "sidecar-up": [0.022] * rounds}
    return {
        "orders": [list(o) for o in round_orders(("baseline", "sidecar-up"), rounds)],
        "seconds": seconds,
        "thread_cpu": thread,
        "process_cpu": {"baseline": [0.021] * rounds, "sidecar-up": [0.024] * rounds},
    }, steps


def test_summary_gives_the_loss_and_cpu_with_intervals():
    runs, steps = _runs(7)
    result = _summarise(runs, steps, {}, None, 64, 2, 4)
    up = result["modes"]["sidecar-up"]
    loss = 100 * (1 - 1 / 1.04)
    assert up["loss_pct_median"] == pytest.approx(loss, abs=0.01) == up["overhead_pct"]
    assert up["loss_pct_ci_low"] <= up["loss_pct_median"] <= up["loss_pct_ci_high"]
    assert up["thread_cpu_extra_ms_median"] == pytest.approx(0.2)
    assert up["thread_cpu_extra_pct_median"] == pytest.approx(10.0)
    assert up["process_cpu_extra_ms_median"] == pytest.approx(0.3)
    assert result["modes"]["baseline"]["thread_cpu_ms_per_step"] == pytest.approx(2.0)
    assert "loss_pct_median" not in result["modes"]["baseline"]
    assert result["per_round"]["orders"][1] == ["sidecar-up", "baseline"]
    table = format_table(result)
    assert "95% CI" in table and f"{loss:.2f}%" in table and "+0.200 ms" in table


def test_the_interval_widens_with_noisy_rounds():
    runs, steps = _runs(9)
    noisy = [
        s * f for s, f in zip(runs["seconds"]["sidecar-up"], [0.9, 1.1] * 4 + [1.0], strict=True)
    ]
    runs["seconds"]["sidecar-up"] = noisy
    up = _summarise(runs, steps, {}, None, 64, 2, 4)["modes"]["sidecar-up"]
    assert up["loss_pct_ci_high"] - up["loss_pct_ci_low"] > 5


def _burn(ms: float) -> None:
    # Busy on this thread for `ms` of its own CPU time (preemption does not count).
    end = time.thread_time_ns() + int(ms * 1e6)
    while time.thread_time_ns() < end:
        pass


def test_hook_timer_counts_only_the_hooks_it_brackets():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    layer = model[0]
    # The capture's hooks, attached first: a model pre-hook and a layer hook.
    model.register_forward_pre_hook(lambda *_: _burn(2))
    layer.register_forward_hook(lambda *_: _burn(3))
    timer = _HookTimer(model, [layer])
    # Attached after the timer: outside its brackets, not counted.
    layer.register_forward_hook(lambda *_: _burn(20))
    model.register_forward_pre_hook(lambda *_: _burn(20))
    model(torch.zeros(1, 4))
    assert 5e6 <= timer.total_ns < 15e6
    timer.remove()
    model(torch.zeros(1, 4))  # removed: nothing more counted
    assert timer.total_ns < 15e6


def test_hook_cpu_goes_into_the_result():
    runs, steps = _runs(5)
    result = _summarise(runs, steps, {}, None, 64, 2, 4)
    _add_hook_cpu(result, {"timers": [0.001] * 3, "sidecar-up": [0.10, 0.12, 0.11]})
    up = result["modes"]["sidecar-up"]
    assert up["hook_cpu_ms_median"] == pytest.approx(0.11)
    assert up["hook_cpu_pct"] == pytest.approx(5.5)  # of the baseline's 2 ms per step
    assert result["hook_timer_floor_ms"] == pytest.approx(0.001)
    assert result["hook_timing_runs"] == 3
    assert "0.110 ms (95% CI 0.100 to 0.120), 5.50% of the baseline" in format_table(result)


def test_the_null_mode_is_the_baseline_again_measured_as_a_mode():
    assert bench_modes(False, False) == MODES
    assert bench_modes(True, True) == (*MODES, LINGER_MODE, NULL_MODE)
    # With no client the null mode runs the model bare, like the baseline, in every round.
    model = build_bench_model(hidden=64, layers=2)
    prompt = torch.randint(0, 8192, (1, 4), generator=torch.Generator().manual_seed(0))
    attached = []
    model.register_forward_pre_hook(lambda *_: attached.append(1))
    runs = _interleaved_rounds(model, prompt, 2, 2, {}, ("baseline", NULL_MODE))
    assert len(runs["seconds"][NULL_MODE]) == 2 and len(runs["seconds"]["baseline"]) == 2
    assert runs["orders"] == [["baseline", NULL_MODE], [NULL_MODE, "baseline"]]
    assert len(model._forward_pre_hooks) == 1  # nothing attached or left behind
    assert len(attached) >= 2 * 2 * 2  # every round ran both modes' forward passes
    # It is summarised as any mode: a loss against the baseline with its interval.
    result = _summarise(runs, 2, {}, None, 64, 2, 1)
    assert "loss_pct_median" in result["modes"][NULL_MODE]
    assert NULL_MODE in format_table(result)


def test_null_is_refused_for_the_vllm_bench(capsys):
    from monitor.cli import main

    assert main(["bench", "overhead", "--engine", "vllm", "--null"]) == 2
    assert "--null is for the transformers bench" in capsys.readouterr().err
