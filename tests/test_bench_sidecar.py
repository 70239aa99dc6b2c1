"""`bench sidecar` runs end to end against a real sidecar process and reports both numbers."""

from __future__ import annotations

from monitor.bench.sidecar import format_table, run_sidecar_bench


def test_sidecar_bench_measures_throughput_and_latency():
    result = run_sidecar_bench(seconds=1.0, prefill_rows=128, conversations=8)
    throughput, latency = result["throughput"], result["latency"]
    assert throughput["errors"] == 0 and latency["errors"] == 0
    assert throughput["messages"] > 0 and throughput["tokens_per_s"] > 0
    assert latency["decode_steps"] > 0
    assert 0 < latency["p50_ms"] <= latency["p99_ms"]
    assert "tokens/s sustained" in format_table(result)
