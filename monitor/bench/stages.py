"""Where a sidecar's CPU goes per message: the pipeline run in this process, stage by stage.

``bench sidecar`` measures wall-clock numbers over gRPC; this measures what each message costs
the sidecar's own thread, in CPU time (``time.thread_time``, so other processes on a busy
machine do not count), for the same pack, rules and messages:

  parse      the protobuf message from its wire bytes, and its activations decoded and checked
             finite: what the server's event loop does as a message arrives, while the worker
             thread encodes the one before
  validate   ``validate_batch`` on the worker: sequences, shapes (the rest of the checks)
  encode     the pack's restricted encode (the matrix multiply and its epilogue)
  rules      ``RuleEngine.evaluate``
  events     everything else of ``Pipeline.process``: picking the rules' feature columns,
             grouping, events, acks, metrics, logs

Everything but ``encode`` is what issue 15's target bounds (at most 0.5 ms of CPU per
64-conversation decode step); ``safety-monitor bench stages`` prints these numbers alone,
without a sidecar process.

The encode's rate is reported beside the machine's own fp32 GEMM on the same shapes, measured
in the same run, so the numbers can be compared across machines.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from monitor.bench.machine import describe, render
from monitor.features import FeaturePack
from monitor.outputs.metrics import SidecarMetrics
from monitor.rules import RuleSet
from monitor.sidecar.columns import ConversationTable
from monitor.sidecar.config import Limits
from monitor.sidecar.pipeline import Pipeline
from monitor.sidecar.validate import decode_layers
from monitor.wire import pb

STAGES = ("parse", "validate", "encode", "rules", "events")


class _Clock:
    """Accumulates thread CPU time per stage around wrapped calls."""

    def __init__(self) -> None:
        self.spent = dict.fromkeys(STAGES, 0.0)

    def wrap(self, stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.spent[stage] += time.thread_time() - started

        return timed


def _parse(data: bytes) -> tuple[pb.StepBatch, tuple[torch.Tensor | None, ...]]:
    """What the server's event loop does with a message as it arrives: parse it, decode its
    activations and check them finite (``validate.decode_layers``)."""
    batch = pb.StepBatch.FromString(data)
    return batch, decode_layers(batch)


def stage_costs(
    pack: FeaturePack,
    ruleset: RuleSet,
    messages: Sequence[bytes],
    hook_point: str,
    rounds: int = 3,
) -> dict[str, Any]:
    """CPU ms per message of each stage on one core (one torch thread; median over ``rounds``
    passes over ``messages``), for serialised StepBatch messages that continue each other (as
    a stream would send them, in either sequence format), with the encode's GFLOP/s beside
    the machine's one-core GEMM."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per core: CPU time of this thread is all the work
    try:
        return _stage_costs(pack, ruleset, messages, hook_point, rounds)
    finally:
        torch.set_num_threads(threads)


def _stage_costs(
    pack: FeaturePack,
    ruleset: RuleSet,
    messages: Sequence[bytes],
    hook_point: str,
    rounds: int,
) -> dict[str, Any]:
    per_round: list[dict[str, float]] = []
    rows = 0
    for _ in range(rounds):
        clock = _Clock()
        limits = Limits()
        pipeline = Pipeline([pack], ruleset, SidecarMetrics(), limits)
        table = ConversationTable(limits.max_conversation_slots)  # one stream's
        pipeline.validate = clock.wrap("validate", pipeline.validate)  # type: ignore[method-assign]
        pipeline.encode_block = clock.wrap("encode", pipeline.encode_block)  # type: ignore[method-assign]
        engine = pipeline.engine
        engine.evaluate = clock.wrap("rules", engine.evaluate)  # type: ignore[method-assign]
        parse = clock.wrap("parse", _parse)
        total = 0.0
        rows = 0
        for data in messages:
            batch, decoded = parse(data)
            started = time.thread_time()
            outcome = pipeline.process(batch, table=table, decoded=decoded)
            total += time.thread_time() - started
            if not outcome.events or not outcome.events[-1].HasField("ack"):
                raise RuntimeError(f"bench message {batch.seq_no} was not acked: {outcome}")
            rows += outcome.events[-1].ack.rows
        inside = clock.spent["validate"] + clock.spent["encode"] + clock.spent["rules"]
        clock.spent["events"] = total - inside
        per_round.append({k: 1000 * v / len(messages) for k, v in clock.spent.items()})
    ms = {stage: statistics.median(r[stage] for r in per_round) for stage in STAGES}
    total_ms = sum(ms.values())
    rows_per_message = rows / len(messages)
    # The columns the pipeline's encode computes: only those the rules read, when narrowed.
    columns = pipeline.encoded_width(pack, hook_point)
    flop = 2.0 * rows_per_message * pack.d_model(hook_point) * columns
    gemm = machine_gemm_gflops(int(rows_per_message), pack.d_model(hook_point))
    encode_gflops = flop / (ms["encode"] / 1000) / 1e9 if ms["encode"] else float("inf")
    return {
        "rows_per_message": rows_per_message,
        "cpu_ms": {stage: round(value, 4) for stage, value in ms.items()},
        "total_cpu_ms": round(total_ms, 4),
        "all_but_encode_cpu_ms": round(total_ms - ms["encode"], 4),
        "encode_gflops": round(encode_gflops, 2),
        "machine_gemm_gflops": round(gemm, 2),
        "encode_fraction_of_gemm": round(encode_gflops / gemm, 3),
        "torch_threads": 1,
        "encoded_columns": columns,
    }


def machine_gemm_gflops(rows: int, d_model: int, columns: int = 2048, repeats: int = 7) -> float:
    """The machine's fp32 GEMM rate on ``[rows, d_model] @ [d_model, columns]`` (median of
    ``repeats``): the reference an encode is compared with."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(rows, d_model, generator=generator)
    b = torch.randn(d_model, columns, generator=generator)
    out = torch.empty(rows, columns)
    torch.mm(a, b, out=out)  # warm-up
    # One torch thread: CPU time of this thread, which other processes do not inflate on a
    # busy machine (and which the stage costs use too); several: wall time.
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    times = []
    for _ in range(repeats):
        started = clock()
        torch.mm(a, b, out=out)
        times.append(clock() - started)
    return 2.0 * rows * d_model * columns / statistics.median(times) / 1e9


def encode_only_rows_per_s(pack: FeaturePack, hook_point: str, rows: int, seconds: float) -> float:
    """How many rows per second the pack alone encodes, in messages of ``rows`` BF16 rows
    (the bound a sidecar's throughput is compared with)."""
    x = torch.randn(rows, pack.d_model(hook_point), generator=torch.Generator().manual_seed(1))
    x = x.bfloat16()
    pack.encode(hook_point, x)  # warm-up
    done = 0
    started = time.perf_counter()
    while done == 0 or time.perf_counter() - started < seconds:
        pack.encode(hook_point, x)
        done += 1
    return done * rows / (time.perf_counter() - started)


DECODE_TARGET_MS = 0.5  # issue 15: all but the encode, per 64-conversation decode step


def run_stages_bench(rounds: int = 5, conversations: int = 64, prefill_rows: int = 512) -> dict:
    """Stage costs of the ``bench sidecar`` pack and rules, in this process (no sidecar)."""
    from monitor.bench.sidecar import D_MODEL, FEATURES, all_stage_costs, reference_setup

    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="safety-monitor-bench-stages-") as tmp:
        pack, ruleset = reference_setup(Path(tmp))
        stages = all_stage_costs(pack, ruleset, prefill_rows, conversations, rounds)
    torch.set_num_threads(threads)
    decode = stages["decode-col"]["all_but_encode_cpu_ms"]
    return {
        "shape": f"d_model {D_MODEL}, {FEATURES} features, BF16, 20 rules (10 temporal)",
        "conversations": conversations,
        "rounds": rounds,
        "stages": stages,
        "decode_target_ms": DECODE_TARGET_MS,
        "decode_within_target": decode <= DECODE_TARGET_MS,
    }


def run_side_by_side(
    baseline_tree: str, pairs: int = 5, rounds: int = 3, conversations: int = 64
) -> dict:
    """``run_stages_bench`` of this checkout and of ``baseline_tree`` (another checkout, e.g.
    ``git worktree add --detach DIR <commit>``), alternately in fresh processes, ``pairs``
    times each: on a busy machine both see the same minute. Reports each run's columnar
    decode step (all but the encode), the medians, and the median of the per-pair ratios
    baseline / this."""
    tree = Path(baseline_tree).resolve()
    if not (tree / "monitor" / "bench" / "stages.py").is_file():
        raise ValueError(f"--baseline-tree {baseline_tree}: not a checkout of this project")
    here = Path(__file__).resolve().parents[2]
    runs: dict[str, list[dict]] = {"this": [], "baseline": []}
    for pair in range(pairs):
        # Alternating which goes first: neither always runs on the warmer machine.
        order = (("this", here), ("baseline", tree))
        for name, root in order if pair % 2 == 0 else order[::-1]:
            report = _stages_in(root, rounds, conversations)
            if "all_but_encode_cpu_ms" not in report.get("stages", {}).get("decode-col", {}):
                raise ValueError(
                    f"--baseline-tree {root}: its `bench stages` does not report the columnar "
                    "decode step's all-but-encode time (a checkout from before it did)"
                )
            runs[name].append(report)
    decode = {
        name: [r["stages"]["decode-col"]["all_but_encode_cpu_ms"] for r in reports]
        for name, reports in runs.items()
    }
    ratios = [b / t for b, t in zip(decode["baseline"], decode["this"], strict=True) if t]
    return {
        "baseline_tree": str(tree),
        "pairs": pairs,
        "rounds": rounds,
        "decode_col_all_but_encode_ms": decode,
        "median_ms": {name: round(statistics.median(v), 4) for name, v in decode.items()},
        "median_ratio_baseline_over_this": round(statistics.median(ratios), 3),
        "stages": {name: reports[-1]["stages"] for name, reports in runs.items()},
        "decode_target_ms": DECODE_TARGET_MS,
    }


def _stages_in(root: Path, rounds: int, conversations: int) -> dict:
    """``bench stages --json`` of the checkout at ``root``, in a process of its own with one
    OpenMP thread."""
    import os
    import subprocess
    import sys

    code = (
        "import json, sys; from monitor.bench.stages import run_stages_bench; "
        "from monitor.logs import configure_logging; configure_logging('auto', 'warning'); "
        "print(json.dumps(run_stages_bench(int(sys.argv[1]), int(sys.argv[2]))))"
    )
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code, str(rounds), str(conversations)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if done.returncode:
        raise RuntimeError(f"bench stages in {root} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def format_side_by_side(report: dict) -> str:
    """The side-by-side report as lines."""
    decode = report["decode_col_all_but_encode_ms"]
    lines = [
        f"all but the encode per columnar decode step (ms, one core), {report['pairs']} "
        f"alternating runs each of {report['rounds']} passes; baseline {report['baseline_tree']}",
        "this:     " + " ".join(f"{v:.3f}" for v in decode["this"]),
        "baseline: " + " ".join(f"{v:.3f}" for v in decode["baseline"]),
        f"median: this {report['median_ms']['this']:.3f}, baseline "
        f"{report['median_ms']['baseline']:.3f}; median ratio baseline/this "
        f"{report['median_ratio_baseline_over_this']:.2f} (target {report['decode_target_ms']} ms)",
    ]
    from monitor.bench.sidecar import stage_lines

    for name in ("this", "baseline"):
        lines.append(f"last {name} run:")
        lines.extend(stage_lines(report["stages"][name]))
    return "\n".join(lines)


def format_stages(report: dict) -> str:
    """The report as a table."""
    from monitor.bench.sidecar import stage_lines

    decode = report["stages"]["decode-col"]["all_but_encode_cpu_ms"]
    return "\n".join(
        [
            f"sidecar CPU per message by stage (ms, one core, median of {report['rounds']} "
            f"passes): {report['shape']}",
            *stage_lines(report["stages"]),
            f"all but the encode per {report['conversations']}-conversation decode step "
            f"(columnar): {decode:.3f} ms, target {report['decode_target_ms']} ms: "
            + ("within target" if report["decode_within_target"] else "OVER TARGET"),
        ]
    )


def add_bench_stages_command(bench_subparsers: argparse._SubParsersAction) -> None:
    """Register ``stages`` on the ``bench`` command's subparsers (sets ``handler``)."""
    parser = bench_subparsers.add_parser(
        "stages", help="sidecar CPU per message by stage (decode, prefill), no sidecar process"
    )
    parser.add_argument("--rounds", type=int, default=5, help="passes; the median is shown")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--baseline-tree",
        default=None,
        metavar="DIR",
        help="also run the bench of another checkout (e.g. `git worktree add --detach DIR "
        "<commit>`), alternately with this one in fresh processes, and report the median "
        "ratio of their decode steps",
    )
    parser.add_argument(
        "--pairs", type=int, default=5, help="with --baseline-tree: runs of each checkout"
    )
    parser.set_defaults(handler=_bench_stages)


def _bench_stages(args: argparse.Namespace) -> int:
    from monitor.logs import configure_logging

    configure_logging("auto", "warning")
    machine = describe()
    if args.baseline_tree:
        pairs, rounds = max(1, args.pairs), max(1, args.rounds)
        both = run_side_by_side(args.baseline_tree, pairs, rounds)
        print(render(both, args.json, format_side_by_side, machine))
        return 0
    report = run_stages_bench(max(1, args.rounds))
    print(render(report, args.json, format_stages, machine))
    return 0
