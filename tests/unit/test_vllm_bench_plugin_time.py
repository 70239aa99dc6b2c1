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
        k: v
        for k, v in _row().items()
        if not k.startswith(("plugin_", "engine_", "relay_", "sidecar_"))
    }
    result = _result(
        {
            "compiled": {
                "off": {**row, "plugin_ms_per_step": None, "plugin_pct_of_off_itl": None},
                "sidecar-up": {**row, "plugin_ms_per_step": 0.2, "plugin_pct_of_off_itl": 2.5},
            }
        }
    )
    lines = format_vllm_table(result).splitlines()
    assert "plugin ms/step" in lines[2]
    assert lines[3].rstrip().endswith(" 0")  # the off row: no plugin time after "dropped"
    assert lines[4].endswith("0.200 (2.5%)")


def _result(execution, **extra):
    return {
        "model": "m",
        "requests": 4,
        "prompt_tokens": 32,
        "new_tokens": 32,
        "layers": "1",
        "rounds": 3,
        "engine_cpus": "0",
        "monitor_cpus": "1",
        "execution": execution,
        **extra,
    }


def _row(**extra):
    return {
        "tokens_per_s": 400.0,
        "itl_ms_p50": 8.0,
        "loss_pct_median": 2.0,
        "loss_pct_q1": 1.0,
        "loss_pct_q3": 3.0,
        "loss_pct_min": 0.0,
        "loss_pct_max": 4.0,
        "loss_pct_ci_low": 0.5,
        "loss_pct_ci_high": 3.5,
        "idle_cpu_pct": 0.0,
        "steps_captured": 10,
        "acked": 10,
        "dropped": 0,
        "plugin_ms_per_step": None,
        "plugin_pct_of_off_itl": None,
        "engine_cpu_ms_per_step": 8.0,
        "engine_cpu_extra_pct_median": 1.5,
        "engine_cpu_extra_pct_q1": -0.5,
        "engine_cpu_extra_pct_q3": 2.5,
        "relay_cpu_ms_per_step": 0.7,
        "sidecar_cpu_ms_per_step": 1.9,
        **extra,
    }


def test_table_shows_both_placements_the_cpu_per_step_and_the_same_engine_loss():
    same = {
        "loss_pct_median": 2.25,
        "loss_pct_q1": 1.0,
        "loss_pct_q3": 3.5,
        "loss_pct_min": -1.0,
        "loss_pct_max": 6.0,
        "loss_pct_ci_low": 0.5,
        "loss_pct_ci_high": 4.25,
        "itl_ms_paused": 8.0,
        "itl_ms_up": 8.2,
    }
    result = _result(
        {
            f"eager/{pinning}": {
                "off": _row(),
                "sidecar-up": _row(same_engine=same),
                "up-paused": _row(),
            }
            for pinning in ("pinned", "unpinned")
        },
        pinnings=["pinned", "unpinned"],
    )
    text = format_vllm_table(result)
    assert "unpinned: every process on every CPU" in text.splitlines()[0]
    assert (
        "eager/unpinned: same engine, sidecar-up against up-paused: loss 2.25% "
        "(95% CI 0.50 to 4.25) [1.0, 3.5] (-1.0..6.0); ITL 8.00 -> 8.20 ms"
    ) in text
    cpu_rows = [line.split() for line in text.splitlines() if line.startswith("eager/pinned ")]
    # the throughput row, then the CPU row: engine, engine +% (none for off), relay, sidecar
    assert cpu_rows[3] == ["eager/pinned", "off", "8.000", "0.700", "1.900"]
    spread = ["[-0.5,", "2.5]"]
    assert cpu_rows[4] == [
        "eager/pinned",
        "sidecar-up",
        "8.000",
        "1.50%",
        *spread,
        "0.700",
        "1.900",
    ]


def test_unknown_placements_are_refused():
    from monitor.bench.vllm_overhead import run_vllm_overhead_bench

    with pytest.raises(ValueError, match="pinnings"):
        run_vllm_overhead_bench(pinnings=("pinned", "sideways"))
    with pytest.raises(ValueError, match="pinnings"):
        run_vllm_overhead_bench(pinnings=())


def test_cpu_table_shows_the_engines_share_of_its_cpu():
    # A run slowed as a whole by another process on the engine's CPU: its share below 1.
    share = {
        "engine_cpu_share_median": 0.98,
        "engine_cpu_share_min": 0.67,
        "engine_run_queue_ms_per_step": 4.25,
    }
    result = _result({"compiled": {"off": _row(**share), "sidecar-up": _row()}})
    text = format_vllm_table(result)
    assert "pinned runs only: on CPU, the engine's on-CPU time over the run's wall time" in text
    cpu_rows = [line.split() for line in text.splitlines() if line.startswith("compiled ")]
    assert cpu_rows[2] == ["compiled", "off", "8.000", "0.700", "1.900", "0.98", "(0.67)", "4.25"]
    # A row without the share (a JSON from before it was measured) still formats.
    assert cpu_rows[3][-2:] == ["0.700", "1.900"]
    # Unpinned, the engine may run on every CPU: no share, no wait.
    both = _result(
        {f"compiled/{p}": {"off": _row(**share)} for p in ("pinned", "unpinned")},
        pinnings=["pinned", "unpinned"],
    )
    rows = {line.split()[0]: line.split() for line in format_vllm_table(both).splitlines()[-2:]}
    assert rows["compiled/pinned"][-3:] == ["0.98", "(0.67)", "4.25"]
    assert rows["compiled/unpinned"][-2:] == ["0.700", "1.900"]


def test_the_command_names_the_machine_above_the_table_and_in_the_json(monkeypatch, capsys):
    import json

    from monitor.bench import vllm_overhead
    from monitor.cli import main

    result = _result({"compiled": {"off": _row(), "sidecar-up": _row()}})
    given = {}

    def fake_bench(**kwargs):  # the engines are the vLLM suite's business; this is the output
        given.update(kwargs)
        return result

    monkeypatch.setattr(vllm_overhead, "run_vllm_overhead_bench", fake_bench)
    assert main(["bench", "overhead", "--engine", "vllm", "--execution", "compiled"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("machine: ") and "usable CPUs" in lines[0]
    assert lines[1].startswith("vLLM plugin overhead: m; 4 requests")
    assert given["new_tokens"] == 128 and given["rounds"] == 60  # the defaults
    assert main(["bench", "overhead", "--engine", "vllm", "--json", "--new-tokens", "32"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["machine"]["summary"].startswith("machine: ")
    assert printed["execution"] == result["execution"]
    assert given["new_tokens"] == 32
