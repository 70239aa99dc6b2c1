"""``safety-monitor bench rules``: rule-engine latency on a decode step and on a prefill.

The issue's budget on this machine: 20 rules within 1 ms for a 64-conversation decode step and
within 5 ms for one 4,096-token prefill. Times are for ``RuleEngine.evaluate`` alone, after a
warm-up, on feature tensors already on the CPU: wall-clock median and p99, and the median CPU
time of the calling thread (what other processes on a busy machine do not inflate). The
machine's fp32 GEMM rate, measured in the same run, is printed beside them as the reference
that makes numbers from different machines comparable.

A third case sets one role-masked rule (``window_roles``) beside the same rule without the key,
decode steps of the two alternating in one run, so that their ratio holds however busy the
machine is (target: at most 1.2). A fourth sets the same role-masked rule with ``at: turn_end``
beside it with ``at: token`` (what a turn-end rule keeps per step for a turn end that a slice
without rows marks later), the same way (target: at most 1.2).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from monitor.bench.machine import describe, render
from monitor.rules import RuleEngine, RuleSet, SequenceSlice, load_rules
from monitor.rules.engine import FeatureBlock

DECODE_BUDGET_MS = 1.0
PREFILL_BUDGET_MS = 5.0
WINDOW_ROLES_TARGET_RATIO = 1.2  # a window_roles rule's decode step / the same rule's without
TURN_END_TARGET_RATIO = 1.2  # an at: turn_end rule's decode step / the same rule's at: token

# One role-masked whole-turn rule (``window_roles``); the plain case drops the last line.
WINDOW_ROLES_RULE = """\
features: {a: p/a}
rules:
  - rule: r
    severity: info
    condition: rolling_mean(a, 512) > 0.5
    for: 8 tokens
    roles: [user]
    window_roles: [user]
"""

# A realistic mix: 20 rules, 10 of them temporal, with roles, for, cooldown, request scope and
# exceptions, over 3 probes and 5 SAE features.
BENCH_RULES = """\
features:
  deception: probes/deception
  bias: probes/bias
  misuse: probes/misuse
  secrecy: sae/6642
  false_claim: sae/1297
  stereotype: sae/3810
  pathogen: sae/9120
  exploit: sae/15002
lists:
  evals: [red-team, safety-evals]
macros:
  deceptive_span: rolling_mean(deception, 16)
  misuse_span: rolling_mean(misuse, 16)
rules:
  - {rule: deception-now, severity: info, condition: deception > 4, roles: [assistant]}
  - {rule: bias-now, severity: info, condition: bias > 4, roles: [assistant]}
  - {rule: misuse-now, severity: warning, condition: misuse > 4, for: 2}
  - {rule: secrecy-high, severity: info, condition: secrecy > 5 and deception > 1}
  - {rule: false-claim, severity: info, condition: false_claim > 5 and deception > 0}
  - {rule: stereotype, severity: info, condition: stereotype > 5 and bias > 1, for: 3}
  - {rule: pathogen, severity: warning, condition: pathogen > 5 and misuse > 1, for: 2}
  - {rule: exploit, severity: warning, condition: "max(exploit, pathogen) > 6", for: 4}
  - {rule: calibrated, severity: info, condition: sigmoid(deception) > 0.99, for: 4}
  - rule: clipped
    severity: info
    condition: clip(misuse, -5, 5) + abs(bias) * 0.5 > 6
    exceptions: [{name: evals, attributes: {tenant: evals}}]
  - rule: sustained-deception
    severity: critical
    condition: deceptive_span > 2.5
    for: 8
    roles: [assistant]
    cooldown: 256
    exceptions: [{name: evals, attributes: {tenant: evals}}]
  - rule: deceptive-response
    severity: warning
    scope: request
    condition: cummax(rolling_mean(deception, 32)) > 1.5
  - rule: concealment
    severity: warning
    condition: deceptive_span > 1.5 and rolling_max(secrecy, 16) > 3
    for: 4
    cooldown: 128
  - rule: biased-passage
    severity: warning
    condition: rolling_mean(bias, 24) > 2
    for: 12
    cooldown: 512
  - rule: stereotype-burst
    severity: info
    condition: count_over(stereotype > 5, 32) >= 8
    cooldown: 256
  - {rule: misuse-assistance, severity: critical, condition: misuse_span > 3, for: 4}
  - rule: bio-uplift
    severity: critical
    condition: rolling_max(rolling_mean(pathogen, 8), 64) > 4 and rolling_mean(misuse, 32) > 1.5
    for: 2
  - {rule: misuse-drift, severity: info, condition: "ewma(misuse, 16) > 1", for: 32}
  - {rule: deception-jump, severity: info, condition: "delta(deception, 8) > 4"}
  - rule: exploit-total
    severity: info
    scope: request
    condition: rolling_sum(exploit, 64) > 200
"""


def bench_ruleset() -> RuleSet:
    """The bench's rule set: a realistic mix of instant and temporal rules."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "bench.yaml"
        path.write_text(BENCH_RULES)
        return load_rules([path])


def _features(ruleset: RuleSet, rows: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    # Benign-looking noise: rules rarely fire, as in production.
    return {
        name: torch.randn(rows, generator=generator) - 1.0
        for name in sorted(ruleset.required_features)
    }


def _timed(step: Callable[[int], None], warmup: int, repeats: int) -> list[tuple[float, float]]:
    """(wall ms, thread CPU ms) of each timed step."""
    for i in range(warmup):
        step(i)
    times = []
    for i in range(warmup, warmup + repeats):
        start, cpu = time.perf_counter(), time.thread_time()
        step(i)
        times.append(((time.perf_counter() - start) * 1000, (time.thread_time() - cpu) * 1000))
    return times


def _summary(times: list[tuple[float, float]]) -> dict[str, float]:
    ordered = sorted(wall for wall, _ in times)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {
        "median_ms": statistics.median(ordered),
        "p99_ms": p99,
        "min_ms": ordered[0],
        "cpu_median_ms": statistics.median(cpu for _, cpu in times),
    }


def bench_decode(ruleset: RuleSet, conversations: int, warmup: int, repeats: int) -> dict:
    """Engine latency per decode step of `conversations` conversations (one token each)."""
    engine = RuleEngine(ruleset, max_conversations=max(conversations, 1))
    generator = torch.Generator().manual_seed(0)
    batches = [_features(ruleset, conversations, generator) for _ in range(16)]
    roles = ["assistant"] * conversations
    # One attributes mapping per sequence, as a server decoding each request would build.
    tenants = [{"tenant": f"tenant-{j % 4}"} for j in range(conversations)]

    def step(i: int) -> None:
        slices = [
            SequenceSlice(f"c{j}", j, 1, i, roles[j], request_id="r", attributes=tenants[j])
            for j in range(conversations)
        ]
        engine.evaluate(batches[i % len(batches)], slices, model="bench")

    return {"conversations": conversations, **_summary(_timed(step, warmup, repeats))}


def bench_prefill(ruleset: RuleSet, tokens: int, warmup: int, repeats: int) -> dict:
    """Engine latency of one `tokens`-token prefill."""
    engine = RuleEngine(ruleset)
    features = _features(ruleset, tokens, torch.Generator().manual_seed(1))

    def step(i: int) -> None:
        sl = SequenceSlice(f"p{i}", 0, tokens, 0, "assistant", end=True, request_id="r")
        engine.evaluate(features, [sl], model="bench")

    return {"tokens": tokens, **_summary(_timed(step, warmup, repeats))}


def _window_roles_engines(function: str) -> tuple[RuleEngine, RuleEngine]:
    masked = WINDOW_ROLES_RULE.replace("rolling_mean(a, 512)", function)
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "rules.yaml"
        path.write_text(masked.replace("    window_roles: [user]\n", ""))
        plain = RuleEngine(load_rules([path]))
        path.write_text(masked)
        return plain, RuleEngine(load_rules([path]))


def _alternating_steps(
    engines: Sequence[RuleEngine],
    count: int,
    warmup: int,
    make_step: Callable[[int], tuple[FeatureBlock, list[SequenceSlice]]],
) -> tuple[list[float], ...]:
    """Each engine's milliseconds per step over ``count`` steps (``make_step(t)`` gives step
    t's block and slices; the first ``warmup`` are not timed), the engines taking turns at
    running first: the second to run finds the step's block warm in the cache, an advantage
    neither may have on every step."""
    times: tuple[list[float], ...] = tuple([] for _ in engines)
    for t in range(count):
        block, slices = make_step(t)
        pairs = list(zip(engines, times, strict=True))
        for engine, timed in pairs if t % 2 == 0 else pairs[::-1]:
            start = time.perf_counter()
            engine.evaluate(block, slices)
            if t >= warmup:
                timed.append((time.perf_counter() - start) * 1000)
    return times


def bench_window_roles(
    conversations: int = 64,
    prefill: int = 600,
    steps: int = 300,
    warmup: int = 20,
    function: str = "rolling_mean(a, 512)",
) -> dict:
    """Decode-step cost of a ``window_roles`` rule against the same rule without the key.

    ``<function> > 0.5`` (``rolling_mean(a, 512)`` unless told; ``for: 8``,
    ``roles: [user]``), ``conversations``
    conversations prefilled with ``prefill`` user tokens, then ``steps`` timed one-token
    steps of the user's tokens (the masked window moves on) and of the assistant's (it stays),
    the two engines alternating step by step (and which runs first, so neither always finds
    the step's block warm). Two kinds of values: standard normal, and
    probabilities (the sigmoid of N(0, 12**2) logits, from about 1e-20 to 1), whose float64
    sums round, so the masked path's running sums carry their rounding errors."""
    cases = []
    for values in ("normal", "probabilities"):
        for role in ("user", "assistant"):
            rng = np.random.default_rng(0)

            def draw(rows: int, values: str = values, rng: np.random.Generator = rng) -> np.ndarray:
                z = rng.standard_normal((rows, 1), dtype=np.float32)
                if values == "normal":
                    return z
                return (1.0 / (1.0 + np.exp(-12.0 * z))).astype(np.float32)

            engines = _window_roles_engines(function)
            index = {"p/a": 0}
            block = FeatureBlock(draw(conversations * prefill), index)
            for engine in engines:
                engine.evaluate(
                    block,
                    [
                        SequenceSlice(f"c{i}", i * prefill, prefill, 0, "user")
                        for i in range(conversations)
                    ],
                )
            times = _alternating_steps(
                engines,
                warmup + steps,
                warmup,
                lambda t, draw=draw, role=role, index=index: (
                    FeatureBlock(draw(conversations), index),
                    [SequenceSlice(f"c{i}", i, 1, prefill + t, role) for i in range(conversations)],
                ),
            )
            plain, masked = (statistics.median(timed) for timed in times)
            cases.append(
                {
                    "values": values,
                    "role": role,
                    "plain_median_ms": plain,
                    "window_roles_median_ms": masked,
                    "ratio": masked / plain,
                }
            )
    return {
        "function": function,
        "conversations": conversations,
        "steps": steps,
        "target_ratio": WINDOW_ROLES_TARGET_RATIO,
        "cases": cases,
    }


def bench_turn_end(
    conversations: int = 64, prefill: int = 600, steps: int = 300, warmup: int = 20
) -> dict:
    """Decode-step cost of an ``at: turn_end`` rule against the same rule with ``at: token``:
    ``rolling_mean(a, 512) > 0.5`` with ``roles: [user]`` and ``window_roles: [user]``,
    ``conversations`` conversations prefilled with ``prefill`` user tokens, then ``steps``
    timed one-token steps (no turn end among them, as in most decode steps) of the user's
    tokens and of the assistant's, the two engines alternating step by step (and which runs
    first); standard normal values."""
    rule = WINDOW_ROLES_RULE.replace("    for: 8 tokens\n", "")
    engines = []
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "rules.yaml"
        for at in ("token", "turn_end"):
            path.write_text(f"{rule}    at: {at}\n")
            engines.append(RuleEngine(load_rules([path])))
    index = {"p/a": 0}
    rng = np.random.default_rng(0)
    block = FeatureBlock(rng.standard_normal((conversations * prefill, 1), dtype=np.float32), index)
    prefills = [
        SequenceSlice(f"c{i}", i * prefill, prefill, 0, "user") for i in range(conversations)
    ]
    for engine in engines:
        engine.evaluate(block, prefills)
    cases = []
    position = prefill
    for role in ("user", "assistant"):
        times = _alternating_steps(
            engines,
            warmup + steps,
            warmup,
            lambda t, role=role, start=position: (
                FeatureBlock(rng.standard_normal((conversations, 1), dtype=np.float32), index),
                [SequenceSlice(f"c{i}", i, 1, start + t, role) for i in range(conversations)],
            ),
        )
        position += warmup + steps
        token, turn_end = (statistics.median(timed) for timed in times)
        cases.append(
            {
                "role": role,
                "token_median_ms": token,
                "turn_end_median_ms": turn_end,
                "ratio": turn_end / token,
            }
        )
    return {
        "conversations": conversations,
        "steps": steps,
        "target_ratio": TURN_END_TARGET_RATIO,
        "cases": cases,
    }


def run_rules_bench(
    conversations: int = 64,
    prefill_tokens: int = 4096,
    repeats: int = 200,
    warmup: int = 20,
    prefill_repeats: int | None = None,
    window_roles_steps: int | None = None,
) -> dict:
    """Median/p99 of ``evaluate`` for a decode step and a prefill, and the ``window_roles``
    and ``at: turn_end`` step-cost ratios (``bench_window_roles``, ``bench_turn_end``,
    ``window_roles_steps`` steps per case, default ``repeats`` but at least 100); a
    JSON-ready dict."""
    ruleset = bench_ruleset()
    temporal = sum(rule.condition.temporal for rule in ruleset.rules)
    decode = bench_decode(ruleset, conversations, warmup, repeats)
    prefill = bench_prefill(
        ruleset, prefill_tokens, max(1, warmup // 4), prefill_repeats or max(1, repeats // 4)
    )
    window_roles = bench_window_roles(
        conversations, steps=window_roles_steps or max(repeats, 100), warmup=warmup
    )
    turn_end = bench_turn_end(
        conversations, steps=window_roles_steps or max(repeats, 100), warmup=warmup
    )
    from monitor.bench.stages import machine_gemm_gflops

    return {
        "rules": len(ruleset.rules),
        "temporal_rules": temporal,
        "torch_threads": torch.get_num_threads(),
        "machine_gemm_gflops": round(machine_gemm_gflops(512, 2304), 1),
        "decode": {**decode, "budget_ms": DECODE_BUDGET_MS},
        "prefill": {**prefill, "budget_ms": PREFILL_BUDGET_MS},
        "window_roles": window_roles,
        "turn_end": turn_end,
        "within_budget": decode["median_ms"] <= DECODE_BUDGET_MS
        and prefill["median_ms"] <= PREFILL_BUDGET_MS,
    }


def format_table(report: dict) -> str:
    """The report as a table."""
    lines = [
        f"{report['rules']} rules ({report['temporal_rules']} temporal), "
        f"torch threads {report['torch_threads']}; machine fp32 GEMM (512 x 2304 x 2048) "
        f"{report['machine_gemm_gflops']} GFLOP/s in the same run",
        f"{'case':<28}{'median ms':>11}{'p99 ms':>10}{'CPU ms':>10}{'budget ms':>11}",
    ]
    for key, label in (("decode", "conversations decode step"), ("prefill", "token prefill")):
        row = report[key]
        size = row.get("conversations", row.get("tokens"))
        lines.append(
            f"{f'{size} {label}':<28}{row['median_ms']:>11.3f}{row['p99_ms']:>10.3f}"
            f"{row['cpu_median_ms']:>10.3f}{row['budget_ms']:>11.1f}"
        )
    lines.append("within budget" if report["within_budget"] else "OVER BUDGET")
    masked = report["window_roles"]
    lines.append(
        f"window_roles: {masked['function']}, {masked['conversations']} conversations, "
        f"decode step medians side by side (target ratio <= {masked['target_ratio']})"
    )
    lines.append(f"{'values':<15}{'tokens of':<11}{'plain ms':>10}{'masked ms':>11}{'ratio':>8}")
    for case in masked["cases"]:
        lines.append(
            f"{case['values']:<15}{case['role']:<11}{case['plain_median_ms']:>10.3f}"
            f"{case['window_roles_median_ms']:>11.3f}{case['ratio']:>8.2f}"
        )
    turn_end = report["turn_end"]
    lines.append(
        f"at: turn_end: the same rule with window_roles, {turn_end['conversations']} "
        f"conversations, decode step medians beside at: token (target ratio <= "
        f"{turn_end['target_ratio']})"
    )
    lines.append(f"{'tokens of':<11}{'token ms':>10}{'turn_end ms':>13}{'ratio':>8}")
    for case in turn_end["cases"]:
        lines.append(
            f"{case['role']:<11}{case['token_median_ms']:>10.3f}"
            f"{case['turn_end_median_ms']:>13.3f}{case['ratio']:>8.2f}"
        )
    return "\n".join(lines)


def add_bench_rules_command(bench_subparsers: argparse._SubParsersAction) -> None:
    """Register ``rules`` on the ``bench`` command's subparsers (sets ``handler``)."""
    parser = bench_subparsers.add_parser("rules", help="rule engine latency (decode, prefill)")
    parser.add_argument("--conversations", type=int, default=64, help="decode batch size")
    parser.add_argument("--prefill-tokens", type=int, default=4096, help="prefill length")
    parser.add_argument("--repeats", type=int, default=200, help="timed decode steps")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps first")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(handler=_bench_rules)


def _bench_rules(args: argparse.Namespace) -> int:
    machine = describe()
    report = run_rules_bench(args.conversations, args.prefill_tokens, args.repeats, args.warmup)
    print(render(report, args.json, format_table, machine))
    return 0
