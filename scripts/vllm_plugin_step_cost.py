"""The vLLM plugin's Python per engine step, replayed without an engine: the thread CPU time of
the plugin's wrappers around a model runner's `_prepare_inputs`, `execute_model` and
`sample_tokens` (monitor/capture/vllm/plugin.py), with a real capture client, relay and
`safety-monitor serve` behind them, for the batches `bench overhead --engine vllm` runs (4
requests: a 32-token prefill each, then 32 decode steps, as the bench's runs had until
2026-12-02, now 128: the same steps, more of them; layer 1 of a hidden-256 float32 model),
one step every 8 ms (the engine's inter-token latency here, so the relay sleeps and wakes as
it does beside a real engine). Its working directory (the sidecar's log) is removed when the
replay completes and kept, its path printed, when it fails (monitor/bench/workdir.py).

What it counts is what the plugin adds on the engine's thread, its own timing
(`PluginTiming`) included; the runner's methods themselves do nothing. Run from the
repository root, in the lock of a shared machine:
``OMP_NUM_THREADS=1 python scripts/vllm_plugin_step_cost.py [--runs 30] [--profile]
[--compare-decode-run] [--baseline-tree DIR [--rounds N]]`` (about 10 s per 30 runs).
`--profile` prints a cProfile of the decode steps instead; `--compare-decode-run` alternates
runs with the worker's decode-run shortcut on and off (`DecodeRun.matches` always False) in
one process and prints both medians, side by side on the same machine state.
`--baseline-tree DIR` compares this checkout's plugin with another's (a `git worktree` of
an earlier commit): N rounds, each running this script once per tree in a subprocess
(`--runs` runs each, the order flipping every round; each tree with its own relay and
sidecar), then both medians over every run and their ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import inspect
import json
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import torch

HIDDEN = 256
REQUESTS = 4
PROMPT = 32
NEW = 32
PACE_S = float(os.environ.get("PACE_S", "0.008"))


class _Runner:
    """What the plugin's wrappers and `WorkerCapture` read of vLLM's model runner."""

    def load_model(self) -> None:
        return None

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        return None

    def execute_model(self, scheduler_output, *args, **kwargs):
        return None

    def sample_tokens(self, *args, **kwargs):
        return "output"


def _capture(client, buffer_rows: int):
    """A WorkerCapture as `__init__` builds it for one layer (that needs a loaded vLLM
    model); the per-step path is the real one."""
    from monitor.capture.vllm.batch import BatchSplitter, plan_rank
    from monitor.capture.vllm.config import PluginSettings
    from monitor.capture.vllm.worker import PluginTiming, WorkerCapture
    from monitor.hookpoints import hook_point_name

    capture = WorkerCapture.__new__(WorkerCapture)
    hook_point = hook_point_name(1)
    capture.settings = PluginSettings(target=client.target, layers=(1,))
    capture.plan = plan_rank([1], 0, 0, 1, (0, 4))
    capture.is_output_rank = True
    capture.hook_points = [hook_point]
    capture.buffers = {hook_point: torch.randn(buffer_rows, HIDDEN)}
    capture.splitter = BatchSplitter()
    capture.client = client
    capture._layout = None
    capture._blocks = {}
    capture._blocks_lock = threading.Lock()
    capture.block_requests = capture.blocks_unmatched = 0
    capture.conversations_ended = capture.turn_ends_sent = 0
    capture.recent_ends = deque(maxlen=100)
    capture.guard_timeouts = capture.steps = capture.naming_errors = 0
    capture.timing = PluginTiming()
    capture._plans = {}
    capture._views = {}
    capture._on_cuda = False
    capture._empty = {hook_point: torch.empty(0, HIDDEN)}
    for name in ("_decode_key", "_decode_plan"):  # the decode-step cache, where it exists
        if hasattr(WorkerCapture, name):
            setattr(capture, name, None)
    return capture


def _patched_runner_class() -> type:
    from monitor.capture.vllm import plugin

    module = ModuleType("fake_gpu_model_runner")
    module.GPUModelRunner = type("GPUModelRunner", (_Runner,), {"load_model": _Runner.load_model})
    plugin._patch_runner(module)
    return module.GPUModelRunner


def _replay(runner, runs: int, profile: cProfile.Profile | None, tag: str) -> list[float]:
    """`runs` batches (request ids tagged `tag`); returns the thread CPU microseconds per
    decode step of each run."""
    per_run = []
    finished: set[str] = set()
    for run in range(runs):
        ids = [f"r{i}-{tag}{run}-0a1b2c3d" for i in range(REQUESTS)]
        runner.requests = {
            rid: SimpleNamespace(
                sampling_params=SimpleNamespace(extra_args={"_sm_request_id": rid[:-9]}),
                num_prompt_tokens=PROMPT,
            )
            for rid in ids
        }
        batch = SimpleNamespace(
            num_reqs=REQUESTS,
            req_ids=ids,
            num_computed_tokens_cpu=np.zeros(8, dtype=np.int32),
        )
        runner.input_batch = batch
        decode_ns = 0
        for step in range(NEW + 1):
            prefill = step == 0
            tokens = np.full(8, PROMPT if prefill else 1, dtype=np.int32)
            new = [SimpleNamespace(req_id=r) for r in ids] if prefill else []
            output = SimpleNamespace(
                finished_req_ids=finished, scheduled_new_reqs=new, total_num_scheduled_tokens=0
            )
            started = time.thread_time_ns()
            if profile is not None and not prefill:
                profile.enable()
            runner._prepare_inputs(output, tokens)
            runner.execute_model(output)
            runner.sample_tokens(None)
            if profile is not None and not prefill:
                profile.disable()
            if not prefill:
                decode_ns += time.thread_time_ns() - started
            finished = set()
            batch.num_computed_tokens_cpu[:REQUESTS] += PROMPT if prefill else 1
            time.sleep(PACE_S)
        finished = set(ids)
        per_run.append(decode_ns / NEW / 1e3)
    return per_run


def _compare_decode_run(runner, runs: int) -> None:
    """Print the median decode-step cost with the decode-run shortcut and without, from
    runs alternating between the two (the order flipping each pair)."""
    from monitor.capture.vllm.batch import DecodeRun

    matches = DecodeRun.matches
    results: dict[str, list[float]] = {"with": [], "without": []}
    try:
        for index in range(runs):
            for mode in ("with", "without") if index % 2 else ("without", "with"):
                DecodeRun.matches = matches if mode == "with" else lambda *_: False
                results[mode] += _replay(runner, 1, None, f"{mode}{index}-")
    finally:
        DecodeRun.matches = matches
    for mode, values in results.items():
        q1, _, q3 = statistics.quantiles(values, n=4)
        print(
            f"decode step, thread CPU us, {mode} the decode run: median "
            f"{statistics.median(values):.1f} [{q1:.1f}, {q3:.1f}] over {runs} runs"
        )


def _compare_trees(baseline: Path, runs: int, rounds: int) -> None:
    """Alternate subprocesses of this script in this checkout and in `baseline` (each
    imports `monitor` from its own tree: the working directory comes first on sys.path) and
    print both medians over every run, and their ratio."""
    trees = {"this tree": Path.cwd().resolve(), "baseline": baseline.resolve()}
    results: dict[str, list[float]] = {name: [] for name in trees}
    for index in range(rounds):
        order = list(trees) if index % 2 else list(trees)[::-1]
        for name in order:
            root = trees[name]
            env = {**os.environ, "PYTHONPATH": str(root)}
            done = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), "--runs", str(runs), "--json"],
                cwd=root,
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            if done.returncode != 0:
                raise SystemExit(f"the replay in {root} failed:\n{done.stderr[-4000:]}")
            results[name] += json.loads(done.stdout.strip().splitlines()[-1])["per_run_us"]
    medians = {name: statistics.median(values) for name, values in results.items()}
    for name, values in results.items():
        q1, _, q3 = statistics.quantiles(values, n=4)
        print(
            f"decode step, thread CPU us, {name} ({trees[name]}): median {medians[name]:.1f} "
            f"[{q1:.1f}, {q3:.1f}] over {len(values)} runs"
        )
    ratio = medians["this tree"] / medians["baseline"]
    print(f"this tree / baseline: {ratio:.2f} ({rounds} rounds of {runs} runs per tree)")


@contextlib.contextmanager
def _temporary_workdir(prefix: str) -> Iterator[Path]:
    """`bench_workdir` for a baseline tree that predates it: removed in any case."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--compare-decode-run", action="store_true")
    parser.add_argument("--baseline-tree", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--json", action="store_true", help="one JSON line of per-run costs")
    args = parser.parse_args()
    if args.baseline_tree is not None:
        _compare_trees(args.baseline_tree, args.runs, args.rounds)
        return
    sys.path.insert(0, str(Path.cwd()))
    from monitor.bench.vllm_overhead import _start_sidecar

    try:
        from monitor.bench.workdir import bench_workdir
    except ImportError:  # a `--baseline-tree` checkout from before it (8fda6c8 and older)
        bench_workdir = _temporary_workdir
    from monitor.capture.client import CaptureClient

    # Removed when the replay completes, kept (and named) when it fails: the sidecar log.
    with bench_workdir("sm-plugin-step-") as workdir:
        # A `--baseline-tree` checkout from before `--hidden` (8ea3cdf and older) takes no width.
        width = (HIDDEN,) if "hidden" in inspect.signature(_start_sidecar).parameters else ()
        sidecar, target = _start_sidecar(workdir, None, *width)
        client = CaptureClient(target, metrics_registry=None)
        try:
            deadline = time.monotonic() + 30
            while not client.connected and time.monotonic() < deadline:
                time.sleep(0.05)
            runner_class = _patched_runner_class()
            runner = runner_class()
            runner._safety_monitor = _capture(client, 256)
            _replay(runner, 3, None, "warmup")  # warm-up: caches, templates, the relay's stream
            runner._safety_monitor.timing.__init__()
            if args.compare_decode_run:
                _compare_decode_run(runner, args.runs)
                return
            profile = cProfile.Profile() if args.profile else None
            per_run = _replay(runner, args.runs, profile, "run")
            timing = runner._safety_monitor.timing
            client.flush(30)
            stats = client.stats
            if profile is not None:
                pstats.Stats(profile).sort_stats("tottime").print_stats(30)
                return
            if args.json:
                print(json.dumps({"per_run_us": per_run, "acked": stats.batches_acked}))
                return
            print(
                f"decode step, thread CPU us: median {statistics.median(per_run):.1f} "
                f"[{min(per_run):.1f}..{max(per_run):.1f}] over {args.runs} runs; PluginTiming "
                f"(prefills too): {timing.cpu_ns / max(timing.steps, 1) / 1e3:.1f} us/step; "
                f"acked {stats.batches_acked}, dropped {dict(stats.dropped)}"
            )
        finally:
            client.close(timeout=10)
            sidecar.stop()


if __name__ == "__main__":
    main()
