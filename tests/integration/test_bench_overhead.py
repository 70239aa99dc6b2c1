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
        rounds=rounds, new_tokens=new_tokens, batch=2, hidden=64, layers=6, soak_steps=100
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
    table = format_table(result)
    assert "sidecar-up" in table and "soak: 100 steps captured" in table
