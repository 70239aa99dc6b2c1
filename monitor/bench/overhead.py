"""`safety-monitor bench overhead`: what capture costs the serving model.

Generation throughput of a randomly initialised transformers causal LM (sized so one decode
step takes several milliseconds on one CPU core), measured side by side in one run, rounds
interleaved so drift hits every mode alike:

  baseline       no hooks
  sidecar-up     capture on 2 layers, streaming to a real sidecar process
  sidecar-down   capture on 2 layers, nothing listening (fail-open: steps dropped)
  local-encode   capture encoding the pack in-process, sending only feature values
  sidecar-up+linger  (with `--linger-ms N`) sidecar-up with the relay's linger at N ms

The model runs on core 0 with one torch thread; the sidecar process is pinned to the other
core, as it would run in its own container. Optionally a soak: memory of the serving process
over N captured forward passes with the sidecar up.
"""

from __future__ import annotations

import argparse
import gc
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

from monitor.bench.machine import describe, render

MODES = ("baseline", "sidecar-up", "sidecar-down", "local-encode")
LINGER_MODE = "sidecar-up+linger"
HOOK_LAYERS = (2, 4)


def add_bench_overhead_command(bench_subparsers: Any) -> None:
    """Register ``overhead`` under ``safety-monitor bench``."""
    parser = bench_subparsers.add_parser(
        "overhead", help="generation throughput with and without capture, side by side"
    )
    # Per-round noise is about ±1.5 points here; the median of 21 rounds is stable to ±0.5.
    # vllm: the rounds are the smaller part of a run, which starts its engines first
    # (2026-12-02, shared machine: 60 rounds took 68 s of 150), and 60 rather than 20 halved
    # the 95% intervals of the median losses (the median of five: 6.5 points over all 60
    # rounds of that run, 13.1 over its first 20; README, Serving with vLLM).
    parser.add_argument("--rounds", type=int, default=None, help="default 21 (vllm: 60)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 48 (vllm: 128)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
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
        help="vllm only: a second monitor-off engine, to show the bench's own noise",
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
    if args.engine == "vllm":
        from monitor.bench.vllm_overhead import format_vllm_table, run_vllm_overhead_bench

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
        )
        print(render(result, args.json, format_vllm_table, machine))
        return 0
    # Described before the bench pins this process to one core.
    machine = describe()
    result = run_overhead_bench(
        rounds=args.rounds or 21,
        new_tokens=args.new_tokens or 48,
        batch=args.batch,
        hidden=args.hidden,
        layers=args.layers,
        soak_steps=args.soak_steps,
        linger_ms=lingers[0] if lingers else None,
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
) -> dict[str, Any]:
    """Generation throughput of one model without capture and with it (sidecar up, sidecar down,
    local encoding; with `linger_ms`, sidecar up with that relay linger too), in interleaved
    rounds; per mode the median of per-round ratios.
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
            seconds = _interleaved_rounds(model, prompt, new_tokens, rounds, clients)
            for client in clients.values():
                client.flush(30)
            accounting = {m: _accounting(c) for m, c in clients.items()}
            soak = _soak(model, clients["sidecar-up"], soak_steps) if soak_steps else None
        finally:
            for client in clients.values():
                client.close(timeout=5)
            sidecar.terminate()
            sidecar.wait(30)
            torch.set_num_threads(threads)  # the caller's process as it was
            os.sched_setaffinity(0, cores)
    result = _summarise(seconds, batch * new_tokens, accounting, soak, hidden, layers, batch)
    result["linger_ms"] = linger_ms
    return result


def _interleaved_rounds(model, prompt, new_tokens, rounds, clients) -> dict[str, list[float]]:  # type: ignore[no-untyped-def]
    modes = MODES + ((LINGER_MODE,) if LINGER_MODE in clients else ())
    seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    _generate(model, prompt, new_tokens)  # warm-up
    for round_index in range(rounds):
        for mode in modes:
            client = clients.get(mode)
            if client is not None:
                client.attach(model, layers=list(HOOK_LAYERS))
            started = time.perf_counter()
            if client is None:
                _generate(model, prompt, new_tokens)
            else:
                ids = [f"{mode}-{round_index}-{row}" for row in range(prompt.shape[0])]
                with client.conversation(ids):
                    _generate(model, prompt, new_tokens)
            seconds[mode].append(time.perf_counter() - started)
            if client is not None:
                client.detach()
    return seconds


def _generate(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(
            prompt,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )


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


def _summarise(seconds, tokens, accounting, soak, hidden, layers, batch) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    medians = {mode: statistics.median(values) for mode, values in seconds.items()}
    modes = {
        mode: {
            "tokens_per_s": round(tokens / median, 1),
            "ms_per_decode_step": round(1000 * median / (tokens / batch), 2),
            "overhead_pct": _paired_overhead(seconds[mode], seconds["baseline"]),
            **accounting.get(mode, {}),
        }
        for mode, median in medians.items()
    }
    return {
        "model": f"llama hidden={hidden} layers={layers}, batch {batch}, hooks on {HOOK_LAYERS}",
        "new_tokens_per_round": tokens,
        "rounds": len(seconds["baseline"]),
        "modes": modes,
        "soak": soak,
    }


def _paired_overhead(mode: list[float], baseline: list[float]) -> float:
    """Median over rounds of the throughput lost against the same round's baseline: each
    round's modes run back to back, so slow drift of the machine cancels out of each ratio."""
    losses = [1 - base / seconds for seconds, base in zip(mode, baseline, strict=True)]
    return round(100 * statistics.median(losses), 2)


def format_table(result: dict[str, Any]) -> str:
    """The report as a table."""
    lines = [
        f"capture overhead: {result['model']}; {result['new_tokens_per_round']} new tokens per "
        f"round, {result['rounds']} interleaved rounds (overhead: median of per-round ratios)",
        f"{'mode':<18}{'tokens/s':>10}{'ms/step':>10}{'overhead':>10}{'acked':>8}"
        f"{'dropped':>9}{'messages':>10}",
    ]
    for mode, row in result["modes"].items():
        lines.append(
            f"{mode:<18}{row['tokens_per_s']:>10.1f}{row['ms_per_decode_step']:>10.2f}"
            f"{row['overhead_pct']:>9.2f}%{row.get('acked', '-'):>8}{row.get('dropped', '-'):>9}"
            f"{row.get('messages', '-'):>10}"
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
