"""`safety-monitor bench overhead` end to end on a tiny model: real sidecar, real relays, and
every captured step accounted for in every mode."""

from __future__ import annotations

import os

import torch

from monitor.bench.overhead import MODES, format_table, run_overhead_bench


def test_overhead_bench_runs_every_mode_and_accounts_for_every_step():
    new_tokens, rounds = 4, 2
    cores, threads = os.sched_getaffinity(0), torch.get_num_threads()
    result = run_overhead_bench(
        rounds=rounds,
        new_tokens=new_tokens,
        batch=2,
        hidden=64,
        layers=6,
        soak_steps=100,
        hook_timing_runs=2,
    )
    modes = result["modes"]
    assert set(modes) == set(MODES)
    assert all(row["tokens_per_s"] > 0 for row in modes.values())
    forwards = rounds * new_tokens  # generate(): a prefill, then one forward per new token
    assert modes["sidecar-up"]["acked"] == forwards and modes["sidecar-up"]["dropped"] == 0
    assert modes["local-encode"]["acked"] == forwards
    assert modes["sidecar-down"]["acked"] == 0 and modes["sidecar-down"]["dropped"] == forwards
    soak = result["soak"]
    assert soak["steps"] == 100 and soak["acked"] >= forwards + 100
    # The bench pins itself to one core while it measures; the caller gets its process back.
    assert os.sched_getaffinity(0) == cores and torch.get_num_threads() == threads
    # The rounds ran as a mirrored pair; every mode has its loss's interval and the model
    # thread's CPU per step, measured (a real generate() takes CPU on this thread).
    orders = result["per_round"]["orders"]
    assert orders[1] == orders[0][::-1] and sorted(orders[0]) == sorted(MODES)
    assert all(row["thread_cpu_ms_per_step"] > 0 for row in modes.values())
    for mode in MODES[1:]:
        row = modes[mode]
        assert row["loss_pct_ci_low"] <= row["loss_pct_median"] <= row["loss_pct_ci_high"]
        ci = (row["thread_cpu_extra_ms_ci_low"], row["thread_cpu_extra_ms_ci_high"])
        assert ci[0] <= row["thread_cpu_extra_ms_median"] <= ci[1]
    assert all(len(v) == rounds for v in result["per_round"]["thread_cpu_s"].values())
    # The capture's hooks take CPU on the model's thread beyond the timers' own.
    assert result["hook_timing_runs"] == 2
    for mode in MODES[1:]:
        assert modes[mode]["hook_cpu_ms_median"] > result["hook_timer_floor_ms"] > 0
    table = format_table(result)
    assert "sidecar-up" in table and "soak: 100 steps captured" in table
    assert "95% CI" in table and "extra CPU/step" in table and "inside the capture's hooks" in table
