"""`bench sidecar` runs end to end against a real sidecar process and reports both numbers."""

from __future__ import annotations

import pytest

from monitor.bench.sidecar import THREAD_GROUPS, format_table, run_sidecar_bench


def test_sidecar_bench_measures_throughput_and_latency():
    import os

    cores = os.sched_getaffinity(0)
    result = run_sidecar_bench(
        seconds=1.0, prefill_rows=128, conversations=8, latency_tokens_per_s=2000, pin="both"
    )
    throughput, latency = result["throughput"], result["latency"]
    assert throughput["errors"] == 0 and latency["errors"] == 0
    assert throughput["messages"] > 0 and throughput["tokens_per_s"] > 0
    assert latency["decode_steps"] > 0
    assert latency["tokens_per_s"] == 2000 and latency["steps_per_s"] == 250
    assert 0 < latency["p50_ms"] <= latency["p99_ms"]
    # The sidecar's own CPU per message, from its process, beside the wall-clock numbers.
    assert throughput["sidecar_cpu_ms_per_message"] > 0
    assert latency["sidecar_cpu_ms_per_message"] > 0
    # ... and by thread (the worker is named by the sidecar at the OS level): decode steps
    # that keep up run on the event loop itself, so only it surely spent CPU on them.
    by_thread = latency["sidecar_cpu_ms_per_message_by_thread"]
    assert tuple(by_thread) == THREAD_GROUPS
    assert by_thread["event loop"] > 0 and by_thread["pipeline"] >= 0
    assert throughput["sidecar_cpu_ms_per_message_by_thread"]["pipeline"] > 0  # backlogged
    # The schedule's lateness apart from send-to-ack, and due-to-ack, which holds both: a
    # step's due time is never after gRPC took it, so its due-to-ack is never the shorter.
    assert 0 <= latency["send_late_p50_ms"] <= latency["send_late_p99_ms"]
    assert latency["due_to_ack_p99_ms"] >= latency["p99_ms"]
    # The light-load point: 4-row steps at 125 steps/s, with the sidecar's CPU per step.
    light = result["light"]
    assert light["rows_per_step"] == 4 and light["steps_per_s"] == 125
    assert light["errors"] == 0 and light["decode_steps"] > 0
    assert light["sidecar_cpu_ms_per_message"] > 0
    # Back-to-back decode steps and the encode-only bounds of the same run.
    saturation = result["decode_saturation"]
    assert saturation["errors"] == 0 and saturation["tokens_per_s"] > 0
    assert set(result["encode_only_rows_per_s"]) == {"128", "8"}
    assert all(rate > 0 for rate in result["encode_only_rows_per_s"].values())
    assert result["sequence_format"] == "columns"
    for name, rows in (("decode", 8), ("decode-col", 8), ("prefill", 128)):
        stages = result["stages"][name]
        assert stages["rows_per_message"] == rows
        assert all(ms >= 0 for ms in stages["cpu_ms"].values())
        assert stages["cpu_ms"]["encode"] > 0 and stages["cpu_ms"]["rules"] > 0
        assert stages["total_cpu_ms"] == pytest.approx(sum(stages["cpu_ms"].values()), abs=1e-3)
        assert stages["machine_gemm_gflops"] > 0 and stages["encode_gflops"] > 0
    if len(os.sched_getaffinity(0)) >= 2:
        # The client alone on the first core, the sidecar alone on the last.
        assert result["pin"] == "both" and result["client_cores"] == [min(cores)]
        assert result["sidecar_core"] == max(cores)
    table = format_table(result)
    assert "tokens/s sustained" in table and "of the machine's fp32 GEMM" in table
    assert "(pipeline " in table and "sends late on the schedule" in table
    assert os.sched_getaffinity(0) == cores  # the client's pinning is given back


def test_sidecar_bench_runs_a_baseline_checkout_side_by_side():
    """`--baseline-tree`: a second sidecar, from another checkout (here this one), takes
    every phase too; the table shows both. A checkout of something else is refused."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    result = run_sidecar_bench(
        seconds=0.5,
        prefill_rows=64,
        conversations=8,
        latency_tokens_per_s=800,
        saturation=False,
        baseline_tree=str(root),
    )
    base = result["baseline"]
    assert base["tree"] == str(root)
    for phase in ("throughput", "latency", "light"):
        assert result[phase]["errors"] == 0 and base[phase]["errors"] == 0
        assert base[phase]["sidecar_cpu_ms_per_message"] > 0
    # At most one event per step (fewer when steps were grouped and their acks coalesced).
    for run in (result, base):
        assert 0 < run["light"]["events_per_step"] <= 1.0
    assert "side by side with the baseline sidecar" in format_table(result)
    with pytest.raises(ValueError, match="not a checkout of this project"):
        run_sidecar_bench(seconds=0.1, baseline_tree=str(root / "docs"))


def test_sidecar_bench_refuses_a_load_it_cannot_pace():
    from monitor.bench.sidecar import _load

    assert _load("half") is None and _load("25000") == 25_000
    for text in ("0", "-5", "fast"):
        with pytest.raises(Exception, match="expected tokens/s > 0 or 'half'"):
            _load(text)
    with pytest.raises(ValueError, match="pin must be one of"):
        run_sidecar_bench(seconds=0.1, pin="sidecar")


def test_stages_bench_reports_each_stage_without_a_sidecar(capsys):
    from monitor.bench.stages import DECODE_TARGET_MS, format_stages, run_stages_bench
    from monitor.cli import main

    report = run_stages_bench(rounds=1, conversations=8, prefill_rows=64)
    assert set(report["stages"]) == {"decode", "decode-col", "prefill"}
    for name, rows in (("decode", 8), ("decode-col", 8), ("prefill", 64)):
        stages = report["stages"][name]
        assert stages["rows_per_message"] == rows
        cpu = stages["cpu_ms"]
        assert set(cpu) == {"parse", "validate", "encode", "rules", "events"}
        assert cpu["encode"] > 0 and cpu["rules"] > 0 and cpu["validate"] > 0
        # Everything but the pack's encode is what the decode target bounds.
        assert stages["all_but_encode_cpu_ms"] == pytest.approx(
            stages["total_cpu_ms"] - cpu["encode"], abs=1e-3
        )
        assert stages["encode_gflops"] > 0 and stages["machine_gemm_gflops"] > 0
    decode = report["stages"]["decode-col"]["all_but_encode_cpu_ms"]
    assert report["decode_within_target"] == (decode <= DECODE_TARGET_MS)
    assert "all but the encode per 8-conversation decode step" in format_stages(report)
    assert main(["bench", "stages", "--rounds", "1", "--json"]) == 0
    assert '"decode-col"' in capsys.readouterr().out


def test_stages_bench_side_by_side_runs_both_checkouts_alternately(tmp_path):
    from pathlib import Path

    from monitor.bench.stages import format_side_by_side, run_side_by_side

    with pytest.raises(ValueError, match="not a checkout"):
        run_side_by_side(str(tmp_path))
    # This checkout as its own baseline: both sides run, in processes of their own.
    here = Path(__file__).resolve().parents[2]
    report = run_side_by_side(str(here), pairs=2, rounds=1, conversations=8)
    decode = report["decode_col_all_but_encode_ms"]
    assert len(decode["this"]) == len(decode["baseline"]) == 2
    assert all(ms > 0 for runs in decode.values() for ms in runs)
    assert report["median_ratio_baseline_over_this"] > 0
    assert set(report["stages"]["baseline"]) == {"decode", "decode-col", "prefill"}
    assert "median ratio baseline/this" in format_side_by_side(report)
