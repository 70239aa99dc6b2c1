"""`bench encoder` at tiny sizes: the report's keys, and that restricted == full columns."""

from __future__ import annotations

import argparse
import json

import pytest

from monitor.bench.encoder import add_bench_encoder_command, run_encoder_bench


def test_run_encoder_bench_tiny() -> None:
    result = run_encoder_bench(rows=16, d_model=32, d_sae=128, k=8, dtype="bf16", repeats=2)
    assert set(result) >= {
        "shape",
        "threads",
        "gemm_fp32",
        "full",
        "restricted",
        "speedup_restricted_vs_full",
        "restricted_fraction_of_gemm_rate",
        "max_abs_diff",
        "max_abs_diff_relative",
        "feature_scale",
    }
    assert result["shape"] == {"rows": 16, "d_model": 32, "d_sae": 128, "k": 8, "dtype": "bf16"}
    for key in ("full", "restricted"):
        assert result[key]["rows_per_s"] > 0 and result[key]["gflops"] > 0
    assert result["max_abs_diff_relative"] <= 1e-5
    assert 0 < result["active_fraction"] < 1


def test_bench_encoder_command(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_bench_encoder_command(parser.add_subparsers())
    argv = ["encoder", "--rows", "8", "--d-model", "16", "--d-sae", "64", "--k", "4"]
    args = parser.parse_args([*argv, "--repeats", "1", "--json"])
    assert args.handler(args) == 0
    assert json.loads(capsys.readouterr().out)["shape"]["k"] == 4
    args = parser.parse_args([*argv, "--repeats", "1", "--dtype", "fp16"])
    assert args.handler(args) == 0
    table = capsys.readouterr().out
    assert "restricted / full speedup" in table and "GFLOP/s" in table
    args = parser.parse_args(["encoder", "--k", "0"])
    assert args.handler(args) == 2
