"""`safety-monitor bench overhead`: what capture costs the serving model.

Generation throughput of a randomly initialised transformers causal LM (sized so one decode
step takes several milliseconds on one CPU core), measured side by side in one run, every mode
once per round, rounds in mirrored pairs with the order rotating from pair to pair (the vLLM
bench's `round_order`) so drift and a mode's place in the round hit every mode alike:

  baseline       no hooks
  sidecar-up     capture on 2 layers, streaming to a real sidecar process
  sidecar-down   capture on 2 layers, nothing listening (fail-open: steps dropped)
  local-encode   capture with local encoding (`encode_locally`, `encode_in="auto"`: on this
                 CPU model the relay encodes), sending only feature values
  sidecar-up+linger  (with `--linger-ms N`) sidecar-up with the relay's linger at N ms

Per mode: the median over rounds of the throughput lost against the same round's baseline,
with its 95% bootstrap interval (`monitor.bench.intervals`): the headline, the issue's target.
Beside it, the CPU time of the model's thread per generated step (`time.thread_time_ns`,
which time spent preempted or waiting does not inflate), extra against the same round's
baseline. It misses what does not run on that thread: waits for the GIL while another
thread of the process holds it, time the thread is preempted, and work in the process's
other threads (the process's CPU per step, all its threads, is in `--json`); and it counts,
as the throughput does, the model's own work slowed by the hooks' use of the caches. On the
2-core machine it was as noisy as the throughput while the model's thread hardly waited
(its CPU per step then is its wall time per step, and the model's own work varies from round
to round), and narrower only when the thread was preempted (README, Benchmarks: four runs of
`safety-monitor bench overhead --rounds 31`, 2026-12-02 16:32-16:55 UTC, shared machine).
Hence a third number, steady: the CPU inside the capture's hooks alone (`_HookTimer`), timed
after the rounds, its intervals 0.01-0.04 ms wide in the same runs.

The model runs on core 0 with one torch thread; the sidecar process is pinned to the other
core, as it would run in its own container. Optionally a soak: memory of the serving process
over N captured forward passes with the sidecar up.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from monitor.bench.intervals import summary
from monitor.bench.machine import describe, render
from monitor.bench.vllm_overhead import round_order

MODES = ("baseline", "sidecar-up", "sidecar-down", "local-encode")
LINGER_MODE = "sidecar-up+linger"
# `--null`: the baseline run a second time as if it were a mode (no hooks). Its "loss" against
# the baseline is the bench's own noise: an unbiased bench puts its median near 0 with an
# interval as wide as the capture modes' (an A/A test).
NULL_MODE = "baseline-again"
HOOK_LAYERS = (2, 4)
# generate() calls per capture mode (and once more for the timers alone) in the hook-timing
# phase after the rounds: about 0.7 s each with the default model.
HOOK_TIMING_RUNS = 7


def add_bench_overhead_command(bench_subparsers: Any) -> None:
    """Register ``overhead`` under ``safety-monitor bench``."""
    parser = bench_subparsers.add_parser(
        "overhead", help="generation throughput with and without capture, side by side"
    )
    # transformers: the 95% interval of the median loss was 4-13 points wide at 31 rounds on the
    # 2-core machine (2026-12-02 16:32-16:55 UTC, shared machine, four runs of
    # `bench overhead --rounds 31`; README, Benchmarks), as wide as the runs' spread: more
    # rounds narrow it, the default stays short.
    # vllm: the rounds are the smaller part of a run, which starts its engines first
    # (2026-12-02, shared machine: 60 rounds took 68 s of 150), and 60 rather than 20 halved
    # the 95% intervals of the median losses (the median of five: 6.5 points over all 60
    # rounds of that run, 13.1 over its first 20; README, Serving with vLLM). 128 new tokens
    # per run rather than 32 narrowed them on the whole (median width 5.6-8.5 points in three
    # runs against 8.7-17.4 in three, alternating, same afternoon), for 228-293 s a run
    # instead of 167-183.
    parser.add_argument("--rounds", type=int, default=None, help="default 21 (vllm: 60)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 48 (vllm: 128)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=None, help="default 512 (vllm: 256)")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument(
        "--soak-steps", type=int, default=0, help="also measure memory over N steps"
    )
    parser.add_argument(
        "--linger-ms",
        type=_linger_list,
        default=None,
        metavar="MS[,MS...]",
        help="also run sidecar-up with the relay's linger at this many ms (mode "
        "sidecar-up+linger); vllm: the monitored engines run with it instead "
        "(SAFETY_MONITOR_LINGER_MS; up-baseline gets it too, and ignores it if its plugin "
        "predates the setting), and a list (vllm only, e.g. 0,20) runs the sidecar-up engine "
        "with each value in every round (modes sidecar-up, then sidecar-up-linger<N>)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--null",
        action="store_true",
        help="transformers only: also run the baseline a second time as a mode of its own "
        f"({NULL_MODE}, no capture), whose loss shows the bench's own noise (an A/A test; "
        "vllm has --control)",
    )
    parser.add_argument(
        "--engine",
        choices=("transformers", "vllm"),
        default="transformers",
        help="vllm: the vLLM plugin, monitor off/up/down, compiled and eager (needs vLLM)",
    )
    parser.add_argument(
        "--execution", choices=("both", "compiled", "eager"), default="both", help="vllm only"
    )
    parser.add_argument(
        "--control",
        action="store_true",
        help="vllm only: a second monitor-off engine, to show the bench's own noise (with "
        "--pairs, also a second plugin-off run per pair)",
    )
    parser.add_argument(
        "--pinning",
        choices=("pinned", "unpinned", "both"),
        default="pinned",
        help="vllm only: pinned (default) puts the engines on one CPU and the sidecar and "
        "capture relays on the others, as when the sidecar has CPUs of its own; unpinned lets "
        "every process run anywhere (the monitor competes with the engine); both measures "
        "the two on the same engines, one after the other",
    )
    parser.add_argument(
        "--same-engine",
        action="store_true",
        help="vllm only: also run the sidecar-up engine with its plugin turned off (mode "
        "up-paused) in every round, and report sidecar-up's loss against it: one process "
        "with and without the monitor, free of the bias between two engines",
    )
    parser.add_argument(
        "--pairs",
        type=int,
        default=0,
        metavar="N",
        help="vllm only, with --same-engine: after the rounds, N pairs of short runs of the "
        "sidecar-up engine alone, its plugin on and off in turn, for a narrower interval of "
        "the same-engine loss (600 take about as long as 60 rounds); with --control one more "
        "run per pair, off again (the A/A)",
    )
    parser.add_argument(
        "--pair-tokens",
        type=int,
        default=None,
        metavar="T",
        help="vllm only: new tokens per request in each run of --pairs (default 16)",
    )
    parser.add_argument(
        "--decompose",
        action="store_true",
        help="vllm only, with --pairs: one more run per pair with the plugin on and the "
        "capture relay stopped during the run: what the plugin alone costs the engine's thread",
    )
    parser.add_argument(
        "--baseline-tree",
        default=None,
        metavar="DIR",
        help="vllm only: also run a sidecar-up engine with the monitor code of another "
        "checkout (e.g. `git worktree add DIR main`), to compare two versions of the plugin "
        "side by side in one run (mode up-baseline)",
    )
    parser.set_defaults(handler=_run_command)


def _linger_list(text: str) -> tuple[float, ...]:
    """`--linger-ms`: one value or a list, each bad value named with its place."""
    from monitor.bench.vllm_overhead import parse_lingers

    try:
        return parse_lingers(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _run_command(args: argparse.Namespace) -> int:
    from monitor.logs import configure_logging

    configure_logging("auto", "warning")
    lingers = args.linger_ms or ()
    if args.engine != "vllm" and len(lingers) > 1:
        print(
            f"--linger-ms {','.join(f'{v:g}' for v in lingers)}: a list is for --engine vllm; "
            "the transformers bench takes one value",
            file=sys.stderr,
        )
        return 2
    if args.engine == "vllm" and args.null:
        print(
            "--null is for the transformers bench; with --engine vllm use --control",
            file=sys.stderr,
        )
        return 2
    vllm_only = args.pairs or args.pair_tokens is not None or args.decompose
    if args.engine != "vllm" and vllm_only:
        print("--pairs, --pair-tokens and --decompose are for --engine vllm", file=sys.stderr)
        return 2
    if args.pairs < 0 or (args.pair_tokens is not None and args.pair_tokens < 4):
        print("--pairs: 0 or more; --pair-tokens: 4 or more", file=sys.stderr)
        return 2
    if args.pairs and not args.same_engine:
        print(
            "--pairs needs --same-engine (it switches the plugin off as that does)", file=sys.stderr
        )
        return 2
    if (args.decompose or args.pair_tokens is not None) and not args.pairs:
        print("--decompose and --pair-tokens are for --pairs: give --pairs N", file=sys.stderr)
        return 2
    if args.engine == "vllm":
        from monitor.bench.vllm_overhead import (
            HIDDEN,
            PAIR_TOKENS,
            bench_model_config,
            format_vllm_table,
            run_vllm_overhead_bench,
        )

        try:
            bench_model_config(HIDDEN if args.hidden is None else args.hidden)
        except ValueError as exc:
            print(f"--{exc}", file=sys.stderr)  # "hidden: a multiple of 128 ..."
            return 2

        eager = {"both": (False, True), "compiled": (False,), "eager": (True,)}[args.execution]
        machine = describe()  # the bench's own process is never pinned: every usable CPU
        result = run_vllm_overhead_bench(
            rounds=args.rounds or 60,
            requests=args.batch,
            new_tokens=args.new_tokens or 128,
            eager_modes=eager,
            control=args.control,
            baseline_tree=args.baseline_tree,
            pinnings=("pinned", "unpinned") if args.pinning == "both" else (args.pinning,),
            same_engine=args.same_engine,
            linger_ms=lingers or None,
            pairs=args.pairs,
            pair_tokens=PAIR_TOKENS if args.pair_tokens is None else args.pair_tokens,
            decompose=args.decompose,
            hidden=HIDDEN if args.hidden is None else args.hidden,
        )
        print(render(result, args.json, format_vllm_table, machine))
        return 0
    # Described before the bench pins this process to one core.
    machine = describe()
    result = run_overhead_bench(
        rounds=args.rounds or 21,
        new_tokens=args.new_tokens or 48,
        batch=args.batch,
        hidden=512 if args.hidden is None else args.hidden,
        layers=args.layers,
        soak_steps=args.soak_steps,
        linger_ms=lingers[0] if lingers else None,
        null=args.null,
    )
    print(render(result, args.json, format_table, machine))
    return 0


def build_bench_model(hidden: int, layers: int, seed: int = 0) -> torch.nn.Module:
    """The bench's model: a Llama of `hidden` x `layers` with an 8192-token vocabulary."""
    from monitor.fixtures import build_tiny_llama

    return build_tiny_llama(
        seed,
        hidden=hidden,
        layers=layers,
        vocab_size=8192,
        intermediate_size=hidden * 11 // 4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=1024,
    )


def run_overhead_bench(
    rounds: int = 21,
    new_tokens: int = 48,
    batch: int = 4,
    hidden: int = 512,
    layers: int = 6,
    prompt_tokens: int = 32,
    soak_steps: int = 0,
    linger_ms: float | None = None,
    hook_timing_runs: int = HOOK_TIMING_RUNS,
    null: bool = False,
) -> dict[str, Any]:
    """Generation throughput of one model without capture and with it (sidecar up, sidecar down,
    local encoding; with `linger_ms`, sidecar up with that relay linger too; with `null`, the
    baseline again as a mode: `NULL_MODE`), in interleaved rounds; per mode the median of
    per-round ratios.
    """
    from monitor.capture import CaptureClient
    from monitor.fixtures import free_port

    threads, cores = torch.get_num_threads(), os.sched_getaffinity(0)
    model = build_bench_model(hidden, layers)
    prompt = torch.randint(
        0, 8192, (batch, prompt_tokens), generator=torch.Generator().manual_seed(1)
    )
    with tempfile.TemporaryDirectory(prefix="safety-monitor-bench-") as tmp:
        pack = _write_pack(Path(tmp), hidden)
        sidecar, port = _start_sidecar(Path(tmp), pack)
        # The model thread gets core 0 to itself; the sidecar process and the capture clients'
        # relay processes (started below, so they inherit this) share the other core, as they
        # would run on spare cores of a serving host. What remains on the model's core is
        # the hooks themselves and contention for Python's GIL.
        _pin_to_last_core()
        clients = {
            "sidecar-up": CaptureClient(f"127.0.0.1:{port}", metrics_registry=None),
            "sidecar-down": CaptureClient(f"127.0.0.1:{free_port()}", metrics_registry=None),
            "local-encode": CaptureClient(
                f"127.0.0.1:{port}", encode_locally=pack, metrics_registry=None
            ),
        }
        if linger_ms is not None:
            clients[LINGER_MODE] = CaptureClient(
                f"127.0.0.1:{port}", metrics_registry=None, linger_ms=linger_ms
            )
        _pin_to_first_core()
        try:
            _wait_connected(clients["sidecar-up"])
            _wait_connected(clients["local-encode"])
            if LINGER_MODE in clients:
                _wait_connected(clients[LINGER_MODE])
            modes = bench_modes(LINGER_MODE in clients, null)
            runs = _interleaved_rounds(model, prompt, new_tokens, rounds, clients, modes)
            for client in clients.values():
                client.flush(30)
            accounting = {m: _accounting(c) for m, c in clients.items()}
            # After the accounting: its messages are not the rounds'.
            hook_cpu = _hook_cpu(model, prompt, new_tokens, clients, hook_timing_runs)
            soak = _soak(model, clients["sidecar-up"], soak_steps) if soak_steps else None
        finally:
            for client in clients.values():
                client.close(timeout=5)
            sidecar.terminate()
            sidecar.wait(30)
            torch.set_num_threads(threads)  # the caller's process as it was
            os.sched_setaffinity(0, cores)
    result = _summarise(runs, new_tokens, accounting, soak, hidden, layers, batch)
    _add_hook_cpu(result, hook_cpu)
    result["linger_ms"] = linger_ms
    return result


def round_orders(modes: tuple[str, ...], rounds: int) -> list[tuple[str, ...]]:
    """The order of the modes in each round: mirrored pairs of rounds, rotating from pair to
    pair (`round_order`). A fixed order runs each mode always in the same place and after
    the same mode, so whatever a place costs (what the previous mode left in the caches and
    the allocator, a drift within the round) lands on one mode every round; here, over every
    2 x len(modes) rounds, each mode runs in each place equally often, and within a pair
    every mode's mean place is the same, so a drift linear over the pair cancels."""
    return [round_order(modes, index) for index in range(rounds)]


def bench_modes(linger: bool, null: bool) -> tuple[str, ...]:
    """The modes of a run: `MODES`, then `LINGER_MODE` and `NULL_MODE` when asked for."""
    return MODES + ((LINGER_MODE,) if linger else ()) + ((NULL_MODE,) if null else ())


def _interleaved_rounds(model, prompt, new_tokens, rounds, clients, modes) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """Every mode once per round, in `round_orders`; per mode and round the wall seconds, the
    model thread's CPU seconds and the process's CPU seconds of one generate(). A mode
    without a client (the baseline, `NULL_MODE`) runs with no hooks."""
    runs: dict[str, Any] = {
        key: {mode: [] for mode in modes}
        for key in ("seconds", "thread_cpu", "process_cpu", "step_median", "step_mean")
    }
    orders = round_orders(modes, rounds)
    runs["orders"] = [list(order) for order in orders]
    _generate(model, prompt, new_tokens)  # warm-up
    for round_index, order in enumerate(orders):
        for mode in order:
            client = clients.get(mode)
            if client is not None:
                client.attach(model, layers=list(HOOK_LAYERS))
            # The model runs on this thread (one torch thread: intra-op work stays on the
            # caller), so this thread's CPU time is the model's plus what the hooks run here.
            # Every mode, the baseline too, runs with the step clock: its cost is the same in
            # all of them, so it cancels out of the paired losses.
            clock = StepClock()
            thread_started, process_started = time.thread_time_ns(), time.process_time_ns()
            started = time.perf_counter()
            _generate_as(model, prompt, new_tokens, client, f"{mode}-{round_index}", clock)
            runs["seconds"][mode].append(time.perf_counter() - started)
            runs["thread_cpu"][mode].append((time.thread_time_ns() - thread_started) / 1e9)
            runs["process_cpu"][mode].append((time.process_time_ns() - process_started) / 1e9)
            step_median, step_mean = decode_step_times(clock.stamps)
            runs["step_median"][mode].append(step_median)
            runs["step_mean"][mode].append(step_mean)
            if client is not None:
                client.detach()
    return runs


class _HookTimer:
    """The model thread's CPU time inside the capture's hooks: a hook put before the
    capture's on the model's forward pre-hooks and on each hooked layer's forward hooks
    starts a clock, one put after them stops it. Only for the hook-timing phase: the timers
    are hooks themselves, so the rounds that measure throughput run without them."""

    def __init__(self, model: torch.nn.Module, layers: list[torch.nn.Module]) -> None:
        self.total_ns = 0
        self._started = 0
        self._handles = [model.register_forward_pre_hook(self._start, prepend=True)]
        self._handles.append(model.register_forward_pre_hook(self._stop))
        for layer in layers:
            self._handles.append(layer.register_forward_hook(self._start, prepend=True))
            self._handles.append(layer.register_forward_hook(self._stop))

    def _start(self, *_: object) -> None:
        self._started = time.thread_time_ns()

    def _stop(self, *_: object) -> None:
        self.total_ns += time.thread_time_ns() - self._started

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _hook_cpu(model, prompt, new_tokens, clients, runs) -> dict[str, list[float]]:  # type: ignore[no-untyped-def]
    """Per mode, per generate(), the model thread's CPU ms per generated step inside the
    capture's hooks; "timers" is the timers alone (no capture), their own floor. Run after
    the rounds, apart from them (`_HookTimer`)."""
    from monitor.capture.layers import select_layers

    layers = list(select_layers(model, list(HOOK_LAYERS)).values())
    modes = ("timers", *clients)
    per_step: dict[str, list[float]] = {mode: [] for mode in modes}
    for index in range(runs):
        for mode in modes:
            client = clients.get(mode)
            if client is not None:
                client.attach(model, layers=list(HOOK_LAYERS))
            # Attached after the capture's hooks: `prepend` puts the start before them.
            timer = _HookTimer(model, layers)
            try:
                _generate_as(model, prompt, new_tokens, client, f"hooks-{mode}-{index}")
            finally:
                timer.remove()
                if client is not None:
                    client.detach()
            per_step[mode].append(timer.total_ns / 1e6 / new_tokens)
    return per_step


def _add_hook_cpu(result: dict[str, Any], hook_cpu: dict[str, list[float]]) -> None:
    """The hook-timing phase into the result: per capture mode `hook_cpu_ms_*` (median over
    runs of the CPU ms per step in the hooks, its interval) and `hook_cpu_pct` (that median
    as % of the baseline's model-thread CPU per step)."""
    floor = hook_cpu.pop("timers", None)
    base = result["modes"]["baseline"]["thread_cpu_ms_per_step"]
    for mode, values in hook_cpu.items():
        row = result["modes"][mode]
        row.update(_rounded(summary(values, "hook_cpu_ms"), 4))
        row["hook_cpu_pct"] = round(100 * row["hook_cpu_ms_median"] / base, 2) if base else None
    if floor:
        result["hook_timer_floor_ms"] = round(statistics.median(floor), 4)
    result["hook_timing_runs"] = len(floor or [])
    result["per_round"]["hook_cpu_ms_per_step"] = {"timers": floor or [], **hook_cpu}


def _generate_as(model, prompt, new_tokens, client, tag: str, clock=None) -> None:  # type: ignore[no-untyped-def]
    """One generate(): without capture when `client` is None, else with each batch row a
    conversation of its own (`<tag>-<row>`); `clock` (a `StepClock`) stamps every step."""
    if client is None:
        _generate(model, prompt, new_tokens, clock)
        return
    with client.conversation([f"{tag}-{row}" for row in range(prompt.shape[0])]):
        _generate(model, prompt, new_tokens, clock)


def _generate(
    model: torch.nn.Module,
    prompt: torch.Tensor,
    new_tokens: int,
    clock: StepClock | None = None,
) -> torch.Tensor:
    from transformers import StoppingCriteriaList

    with torch.no_grad():
        return model.generate(
            prompt,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            stopping_criteria=None if clock is None else StoppingCriteriaList([clock]),
        )


class StepClock:
    """A stopping criterion that never stops: generate() calls it once per generated token,
    after the step's forward and the token's choice, so consecutive stamps bound one decode
    step (the first stamp ends the prefill). Per-step timing without a hook on the model:
    a forward hook would sit among the capture's and time them differently per mode."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: Any, **_: Any) -> torch.Tensor:
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def decode_step_times(stamps: list[float]) -> tuple[float, float]:
    """The median and the mean of the decode steps' wall seconds between consecutive
    `StepClock` stamps; the prefill (before the first stamp) is left out, in every mode alike.
    The median ignores a rare slow step (a GC pause, the other core's burst) whoever caused
    it, so it is tighter but blind to a cost the capture pays on few steps only; the mean
    counts every decode step."""
    if len(stamps) < 2:
        raise ValueError(f"stamps: expected >= 2 (a prefill and a decode step), got {len(stamps)}")
    steps = [later - earlier for earlier, later in itertools.pairwise(stamps)]
    if min(steps) < 0:
        raise ValueError(f"stamps: not in time order at step {steps.index(min(steps)) + 1}")
    return statistics.median(steps), statistics.fmean(steps)


def _soak(model: torch.nn.Module, client: Any, steps: int) -> dict[str, Any]:
    """RSS of this process while `steps` forward passes are captured and streamed."""
    client.attach(model, layers=list(HOOK_LAYERS))
    prompt = torch.randint(0, 8192, (1, 8), generator=torch.Generator().manual_seed(2))
    per_conversation = 50  # a prefill and 49 decode steps
    samples = []
    done = 0
    conversation = 0
    while done < steps:
        with client.conversation(f"soak-{conversation}"):
            _generate(model, prompt, per_conversation)
        client.end_conversation(f"soak-{conversation}")
        conversation += 1
        done += per_conversation
        if conversation % 20 == 0 or done >= steps:
            client.flush(30)
            gc.collect()
            samples.append((done, _rss_mib()))
    client.detach()
    client.flush(30)
    first, last = samples[0][1], samples[-1][1]
    return {
        "steps": done,
        "rss_mib_samples": samples,
        "rss_growth_mib_after_warmup": round(last - first, 1),
        "acked": client.stats.batches_acked,
    }


def _summarise(runs, new_tokens, accounting, soak, hidden, layers, batch) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    seconds, thread_cpu = runs["seconds"], runs["thread_cpu"]
    tokens = batch * new_tokens
    modes = {}
    for mode, values in seconds.items():
        median = statistics.median(values)
        row: dict[str, Any] = {
            "tokens_per_s": round(tokens / median, 1),
            "ms_per_decode_step": round(1000 * median / new_tokens, 2),
            "thread_cpu_ms_per_step": round(
                1000 * statistics.median(thread_cpu[mode]) / new_tokens, 3
            ),
            "process_cpu_ms_per_step": round(
                1000 * statistics.median(runs["process_cpu"][mode]) / new_tokens, 3
            ),
        }
        if mode != "baseline":
            losses = paired_losses(values, seconds["baseline"])
            row["overhead_pct"] = round(statistics.median(losses), 2)
            row.update(_rounded(summary(losses, "loss_pct"), 2))
            for key, cpu in (("thread_cpu", thread_cpu), ("process_cpu", runs["process_cpu"])):
                extra_ms, extra_pct = extra_cpu_per_step(cpu[mode], cpu["baseline"], new_tokens)
                row.update(_rounded(summary(extra_ms, f"{key}_extra_ms"), 4))
                row.update(_rounded(summary(extra_pct, f"{key}_extra_pct"), 2))
            # Per-step estimators beside the headline (whole generate() calls, prefill in):
            # the same paired loss from the median decode step and from the mean one.
            for key, prefix in (("step_median", "step_loss_pct"), ("step_mean", "decode_loss_pct")):
                if runs.get(key):
                    losses = paired_losses(runs[key][mode], runs[key]["baseline"])
                    row.update(_rounded(summary(losses, prefix), 2))
        else:
            row["overhead_pct"] = 0.0
        modes[mode] = {**row, **accounting.get(mode, {})}
    return {
        "model": f"llama hidden={hidden} layers={layers}, batch {batch}, hooks on {HOOK_LAYERS}",
        "new_tokens_per_round": tokens,
        "steps_per_round": new_tokens,
        "rounds": len(seconds["baseline"]),
        "modes": modes,
        "soak": soak,
        # Every round's numbers, in run order, so any other statistic can be computed.
        "per_round": {
            "orders": runs["orders"],
            "seconds": seconds,
            "thread_cpu_s": thread_cpu,
            "process_cpu_s": runs["process_cpu"],
            **{f"{key}_s": runs[key] for key in ("step_median", "step_mean") if runs.get(key)},
        },
    }


def paired_losses(mode: list[float], baseline: list[float]) -> list[float]:
    """Per round, the throughput lost (%) against the same round's baseline: each round's
    modes run back to back, so slow drift of the machine cancels out of each ratio."""
    return [100 * (1 - base / seconds) for seconds, base in zip(mode, baseline, strict=True)]


def extra_cpu_per_step(
    mode: list[float], baseline: list[float], steps: int
) -> tuple[list[float], list[float]]:
    """Per round, the CPU seconds of a mode's generate() over the same round's baseline's, as
    ms per generated step and as % of the baseline's CPU per step."""
    extra_ms = [1000 * (m - b) / steps for m, b in zip(mode, baseline, strict=True)]
    extra_pct = [100 * (m - b) / b for m, b in zip(mode, baseline, strict=True)]
    return extra_ms, extra_pct


def _rounded(values: dict[str, float], digits: int) -> dict[str, float]:
    return {key: round(value, digits) for key, value in values.items()}


def _ci(row: dict[str, Any], prefix: str, digits: int) -> str:
    return f"{row[f'{prefix}_ci_low']:.{digits}f} to {row[f'{prefix}_ci_high']:.{digits}f}"


def format_table(result: dict[str, Any]) -> str:
    """The report as a table: per mode throughput, its loss with the median's 95% interval,
    and the extra CPU on the model's thread per step with its interval."""
    lines = [
        f"capture overhead: {result['model']}; {result['new_tokens_per_round']} new tokens per "
        f"round, {result['rounds']} rounds, modes in mirrored pairs of rounds rotating their "
        "order",
        "loss: median over rounds of the throughput lost against the same round's baseline "
        "(95% bootstrap CI of the median); model CPU: the model thread's CPU per step, and "
        "the median extra against the same round's baseline (its CI; not counted: GIL waits, "
        "preemption, other threads)",
        f"{'mode':<18}{'tokens/s':>9}{'ms/step':>9}{'loss':>8}  {'95% CI':<20}"
        f"{'CPU/step':>9}{'extra CPU/step':>16}  {'95% CI':<20}{'acked':>7}{'dropped':>8}"
        f"{'messages':>9}",
    ]
    for mode, row in result["modes"].items():
        if "loss_pct_median" in row:
            loss = f"{row['loss_pct_median']:>7.2f}%  {'(' + _ci(row, 'loss_pct', 2) + ')':<20}"
            extra_ms, extra_pct = (
                row["thread_cpu_extra_ms_median"],
                row["thread_cpu_extra_pct_median"],
            )
            extra = (
                f"{extra_ms:>+7.3f} ms {extra_pct:>+5.1f}%"
                f"  {'(' + _ci(row, 'thread_cpu_extra_ms', 3) + ' ms)':<20}"
            )
        else:
            loss = f"{'-':>8}  {'':<20}"
            extra = f"{'-':>16}  {'':<20}"
        lines.append(
            f"{mode:<18}{row['tokens_per_s']:>9.1f}{row['ms_per_decode_step']:>9.2f}{loss}"
            f"{row['thread_cpu_ms_per_step']:>6.3f} ms{extra}{row.get('acked', '-'):>7}"
            f"{row.get('dropped', '-'):>8}{row.get('messages', '-'):>9}"
        )
    stepped = [(m, row) for m, row in result["modes"].items() if "step_loss_pct_median" in row]
    if stepped:
        lines.append(
            "per-step loss (decode steps only, prefill out; paired with the same round's "
            "baseline): median step, and mean step (95% CI):"
        )
        for mode, row in stepped:
            lines.append(
                f"  {mode:<18}median step {row['step_loss_pct_median']:>6.2f}% "
                f"({_ci(row, 'step_loss_pct', 2)}), mean step "
                f"{row['decode_loss_pct_median']:>6.2f}% ({_ci(row, 'decode_loss_pct', 2)})"
            )
    hooked = [(mode, row) for mode, row in result["modes"].items() if "hook_cpu_ms_median" in row]
    if hooked:
        lines.append(
            "CPU on the model's thread inside the capture's hooks per step (median of "
            f"{result['hook_timing_runs']} generate() per mode after the rounds, timed by hooks "
            f"around the capture's; the timers alone: {result.get('hook_timer_floor_ms', 0):.4f}"
            " ms):"
        )
        for mode, row in hooked:
            lines.append(
                f"  {mode:<18}{row['hook_cpu_ms_median']:.3f} ms (95% CI "
                f"{_ci(row, 'hook_cpu_ms', 3)}), {row['hook_cpu_pct']:.2f}% of the baseline's "
                "CPU per step"
            )
    if result["soak"]:
        soak = result["soak"]
        lines.append(
            f"soak: {soak['steps']} steps captured, {soak['acked']} acked; RSS growth after "
            f"warm-up {soak['rss_growth_mib_after_warmup']} MiB "
            f"(samples {[s[1] for s in soak['rss_mib_samples']]})"
        )
    return "\n".join(lines)


def _accounting(client: Any) -> dict[str, int]:
    stats = client.stats
    return {
        "acked": stats.batches_acked,
        "dropped": stats.dropped.total(),
        "messages": stats.messages_sent,
    }


def _write_pack(workdir: Path, hidden: int) -> Path:
    from monitor.features import save_pack
    from monitor.features.build import build_pack_from_sae, load_sae
    from monitor.fixtures import write_layer_sae

    packs = []
    for layer in HOOK_LAYERS:
        sae = load_sae(write_layer_sae(workdir / f"sae-{layer}", hidden, 4096, layer, seed=layer))
        packs.append(build_pack_from_sae(sae, list(range(0, 4096, 16)), name=f"l{layer}"))
    # One pack per hook point; the bench's local-encode mode uses the first layer's pack and
    # the sidecar encodes the other from activations.
    for pack in packs:
        save_pack(pack, workdir / f"{pack.name}.pack.safetensors")
    return workdir / f"{packs[0].name}.pack.safetensors"


def _start_sidecar(workdir: Path, pack: Path) -> tuple[subprocess.Popen[bytes], int]:
    from monitor.fixtures import free_port, start_sidecar

    rules = workdir / "rules.yaml"
    rules.write_text(_bench_rules())
    port = free_port()
    config = {
        "listen": f"127.0.0.1:{port}",
        "metrics_port": 0,
        "packs": sorted(str(p) for p in workdir.glob("*.pack.safetensors")),
        "rules": [str(rules)],
        "log_format": "json",
        "log_level": "warning",
    }
    sidecar = start_sidecar(config, workdir, preexec_fn=_pin_to_last_core)
    return sidecar.process, sidecar.port


def _bench_rules() -> str:
    """20 rules over features of both hook points, about half of them temporal."""
    lines = ["features:"]
    for layer in HOOK_LAYERS:
        lines += [f"  a{layer}_{i}: l{layer}/{16 * i}" for i in range(10)]
    lines.append("rules:")
    for layer in HOOK_LAYERS:
        for i in range(10):
            condition = (
                f"a{layer}_{i} > 1000" if i % 2 else f"rolling_mean(a{layer}_{i}, 16) > 1000"
            )
            lines += [
                f"  - rule: bench-{layer}-{i}",
                "    severity: info",
                f"    condition: {condition}",
            ]
    return "\n".join(lines) + "\n"


def _wait_connected(client: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not client.connected and time.monotonic() < deadline:
        time.sleep(0.02)


_CORES = sorted(os.sched_getaffinity(0))  # read once: pinning changes what it returns


def _pin_to_first_core() -> None:
    torch.set_num_threads(1)
    if len(_CORES) >= 2:
        os.sched_setaffinity(0, {_CORES[0]})  # this thread: the one that runs the model


def _pin_to_last_core() -> None:
    if len(_CORES) >= 2:
        os.sched_setaffinity(0, {_CORES[-1]})


def _rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * resource.getpagesize() / 2**20
