"""`bench sidecar` runs end to end against a real sidecar process and reports both numbers."""

from __future__ import annotations

from monitor.bench.sidecar import format_table, run_sidecar_bench


def test_sidecar_bench_measures_throughput_and_latency():
    result = run_sidecar_bench(
        seconds=1.0, prefill_rows=128, conversations=8, latency_tokens_per_s=2000
    )
    throughput, latency = result["throughput"], result["latency"]
    assert throughput["errors"] == 0 and latency["errors"] == 0
    assert throughput["messages"] > 0 and throughput["tokens_per_s"] > 0
    assert latency["decode_steps"] > 0
    assert latency["tokens_per_s"] == 2000 and latency["steps_per_s"] == 250
    assert 0 < latency["p50_ms"] <= latency["p99_ms"]
    assert "tokens/s sustained" in format_table(result)


def test_sidecar_bench_refuses_a_load_it_cannot_pace():
    import pytest

    from monitor.bench.sidecar import _load

    assert _load("half") is None and _load("25000") == 25_000
    for text in ("0", "-5", "fast"):
        with pytest.raises(Exception, match="expected tokens/s > 0 or 'half'"):
            _load(text)
