"""`safety-monitor bench relay` end to end: a real sidecar, real relays (this checkout's, with
and without pacing, and a "baseline" checkout's, here this one again), every step acked."""

from __future__ import annotations

import os
from pathlib import Path

from monitor.bench.relay import format_relay_table, run_relay_bench

REPO = Path(__file__).resolve().parents[2]


def test_relay_bench_runs_every_mode_and_every_step_is_acked():
    cores = os.sched_getaffinity(0)
    result = run_relay_bench(
        rounds=2, seconds=0.4, rate=50, rows=2, hidden=64, idle_seconds=0.5, baseline_tree=REPO
    )
    modes = result["modes"]
    assert set(modes) == {"current", "no-pacing", "baseline"}
    for mode, row in modes.items():
        assert row["steps"] == 20, mode  # 0.4 s at 50 steps/s, each round
        assert row["dropped"] == 0, mode
        # The measured rounds and the warm-up, every step acked.
        assert row["acked"] >= 2 * 20, mode
        assert row["relay_ms_per_step"] > 0 and row["sidecar_ms_per_step"] > 0, mode
        assert row["relay_switches_per_step"] > 0, mode
    # Pacing off: every step of a relay that waits to be woken costs the producer a write.
    assert modes["no-pacing"]["eventfd_writes_per_step"] > 0
    assert os.sched_getaffinity(0) == cores  # the caller's process as it was
    assert "no-pacing" in format_relay_table(result)
