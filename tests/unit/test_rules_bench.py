"""`bench rules`: runs end to end and reports the documented keys."""

from __future__ import annotations

import argparse
import json

from monitor.bench.rules import add_bench_rules_command, bench_ruleset, run_rules_bench


def test_bench_ruleset_is_a_realistic_mix():
    ruleset = bench_ruleset()
    temporal = sum(rule.condition.temporal for rule in ruleset.rules)
    assert len(ruleset.rules) == 20 and 8 <= temporal <= 12


def test_run_rules_bench_reports_keys():
    report = run_rules_bench(conversations=8, prefill_tokens=256, repeats=5, warmup=2)
    assert {
        "rules",
        "temporal_rules",
        "torch_threads",
        "decode",
        "prefill",
        "within_budget",
        "machine_gemm_gflops",
    } <= set(report)
    assert report["machine_gemm_gflops"] > 0
    for case in ("decode", "prefill"):
        assert {"median_ms", "p99_ms", "min_ms", "budget_ms", "cpu_median_ms"} <= set(report[case])
        assert report[case]["cpu_median_ms"] > 0
        assert 0 < report[case]["min_ms"] <= report[case]["median_ms"] <= report[case]["p99_ms"]
    assert report["decode"]["conversations"] == 8 and report["prefill"]["tokens"] == 256
    masked = report["window_roles"]
    assert masked["conversations"] == 8 and masked["target_ratio"] == 1.2
    assert [(c["values"], c["role"]) for c in masked["cases"]] == [
        ("normal", "user"),
        ("normal", "assistant"),
        ("probabilities", "user"),
        ("probabilities", "assistant"),
    ]
    for case in masked["cases"]:
        assert case["plain_median_ms"] > 0 and case["window_roles_median_ms"] > 0
        assert case["ratio"] == case["window_roles_median_ms"] / case["plain_median_ms"]
    turn_end = report["turn_end"]
    assert turn_end["conversations"] == 8 and turn_end["target_ratio"] == 1.2
    assert [c["role"] for c in turn_end["cases"]] == ["user", "assistant"]
    for case in turn_end["cases"]:
        assert case["token_median_ms"] > 0 and case["turn_end_median_ms"] > 0
        assert case["ratio"] == case["turn_end_median_ms"] / case["token_median_ms"]


def test_bench_command_prints_json(capsys):
    parser = argparse.ArgumentParser()
    add_bench_rules_command(parser.add_subparsers())
    args = parser.parse_args(
        [
            "rules",
            "--json",
            "--repeats",
            "3",
            "--warmup",
            "1",
            "--conversations",
            "4",
            "--prefill-tokens",
            "64",
        ]
    )
    assert args.handler(args) == 0
    assert json.loads(capsys.readouterr().out)["rules"] == 20
