"""The vLLM overhead bench's plugin time per step: computed over the measured rounds only and
shown next to the throughput loss."""

from __future__ import annotations

import pytest

from monitor.bench.vllm_overhead import _plugin_ms_per_step, format_vllm_table


def test_plugin_time_per_step_counts_only_between_the_two_reports():
    before = {"plugin_steps": 10, "plugin_cpu_ns": 4_000_000}
    after = {"plugin_steps": 110, "plugin_cpu_ns": 29_000_000}
    assert _plugin_ms_per_step(before, after) == pytest.approx(0.25)
    # A monitor-off engine's report has no plugin counters.
    assert _plugin_ms_per_step({"attached": False}, {"attached": False}) is None


def test_table_shows_plugin_time_and_its_share_of_the_off_latency():
    row = {
        "tokens_per_s": 400.0,
        "itl_ms_p50": 8.0,
        "loss_pct_median": 2.0,
        "loss_pct_q1": 1.0,
        "loss_pct_q3": 3.0,
        "loss_pct_min": 0.0,
        "loss_pct_max": 4.0,
        "idle_cpu_pct": 0.0,
        "steps_captured": 10,
        "acked": 10,
        "dropped": 0,
    }
    result = {
        "model": "m",
        "requests": 4,
        "prompt_tokens": 32,
        "new_tokens": 32,
        "layers": "1",
        "rounds": 3,
        "engine_cpus": "0",
        "monitor_cpus": "1",
        "execution": {
            "compiled": {
                "off": {**row, "plugin_ms_per_step": None, "plugin_pct_of_off_itl": None},
                "sidecar-up": {**row, "plugin_ms_per_step": 0.2, "plugin_pct_of_off_itl": 2.5},
            }
        },
    }
    lines = format_vllm_table(result).splitlines()
    assert "plugin ms/step" in lines[2]
    assert lines[3].rstrip().endswith(" 0")  # the off row: no plugin time after "dropped"
    assert lines[4].endswith("0.200 (2.5%)")
