"""`safety-monitor bench sidecar`: the sidecar end to end over loopback gRPC.

A real `safety-monitor serve` process with a reference-shape pack (d_model 2304, 256 features
sliced from a 16,384-latent SAE) and 20 rules (about half temporal). Two measurements in one
run, from a raw gRPC client streaming BF16 StepBatches:

  throughput  prefill-sized messages (512 rows) as fast as acks come back, a bounded window in
              flight: sustained tokens/s.
  latency     64-sequence decode steps (64 rows, one per conversation) paced at a fixed
              load, by default 25,000 tokens/s (half the 50,000 tokens/s budget; the budget
              asks for p99 <= 10 ms there): send-to-ack p50/p99 in ms. `--latency-load half`
              paces at half the throughput just measured instead.
  decode saturation
              the same decode steps back to back, 64 in flight: tokens/s.

Beside each: the sidecar process's own CPU time per message (from /proc), in all and by thread
(the pipeline worker, the event loop, gRPC's C threads, the rest), and the bound it is
compared with, measured in the same run: the pack's encode-only rate for 512-row and for
64-row inputs. With two or more cores (the default `--pin`), the sidecar runs alone on the
last core with one torch thread and this load client on the others, so the numbers are the
sidecar's and not the client's. `stages.py` then splits a message's sidecar CPU into parse,
validation, encode, rules and events, with the encode's GFLOP/s beside the machine's GEMM.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import torch

from monitor.bench.machine import describe, render
from monitor.wire import encode_tensor, pb, pb_grpc
from monitor.wire.acks import acked, ask_for_acks, offers_acks
from monitor.wire.columns import COLUMNS, SEQUENCE_FORMATS, ColumnarEncoder

PIN_MODES = ("client", "both", "none")
# What the reference rules read: their 20 columns, or every column of the pack (`_rules`).
RULES_READ = ("rules", "all")
D_MODEL = 2304
D_SAE = 16384
FEATURES = 256
HOOK_LAYER = 12


def add_bench_sidecar_command(bench_subparsers: Any) -> None:
    """Register ``sidecar`` under ``safety-monitor bench``."""
    parser = bench_subparsers.add_parser(
        "sidecar", help="end-to-end tokens/s and send-to-ack latency over loopback gRPC"
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    parser.add_argument("--prefill-rows", type=int, default=512)
    parser.add_argument("--conversations", type=int, default=64)
    parser.add_argument(
        "--latency-load",
        type=_load,
        default=25_000.0,
        help="tokens/s of the decode-step phase, or 'half' (of the measured throughput)",
    )
    parser.add_argument(
        "--pin",
        choices=PIN_MODES,
        default="client",
        help="client: this load client alone on the first core (the sidecar may use them all); "
        "both: also the sidecar alone on the last core, with one torch thread; none",
    )
    parser.add_argument(
        "--saturation",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure back-to-back decode steps, the encode-only bounds and stage costs",
    )
    parser.add_argument(
        "--sequence-format",
        choices=SEQUENCE_FORMATS,
        default=COLUMNS,
        help="how decode steps carry their sequences: columns (what the capture relay sends to "
        "a sidecar that offers it) or sequences (one Sequence message each)",
    )
    parser.add_argument(
        "--light",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"also the light-load point: {LIGHT_ROWS}-row steps (one row per conversation) "
        f"at {LIGHT_STEPS_PER_S:g} steps/s, the sidecar's CPU per message",
    )
    parser.add_argument(
        "--baseline-tree",
        metavar="PATH",
        help="another checkout of this project (e.g. a detached worktree of main): its sidecar "
        "runs beside this one and takes every phase right after it, reported side by side",
    )
    parser.add_argument(
        "--rules-read",
        choices=RULES_READ,
        default="rules",
        help="rules: the 20 rules read 20 of the pack's 256 columns (the sidecar encodes only "
        "those); all: the 10 non-temporal rules also read the other 236 (max of theirs), so "
        "the sidecar runs the pack's full encode, the shape of the encode-only bound",
    )
    parser.add_argument(
        "--sidecar-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a sidecar config key for this checkout's sidecar (repeatable; VALUE is YAML, "
        "a dotted KEY sets a section's key: limits.max_streams=8), validated like a config "
        "file; with --baseline-tree set to this same checkout, the two differ only by it",
    )
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(handler=_run_command)


def _run_command(args: argparse.Namespace) -> int:
    from monitor.logs import configure_logging
    from monitor.sidecar.config import ConfigError

    configure_logging("auto", "warning")
    try:
        settings = sidecar_settings(args.sidecar_set)
    except ConfigError as exc:
        print(f"safety-monitor bench sidecar: {exc}", file=sys.stderr)
        return 2
    machine = describe()
    result = run_sidecar_bench(
        args.seconds,
        args.prefill_rows,
        args.conversations,
        args.latency_load,
        pin=args.pin,
        saturation=args.saturation,
        sequence_format=args.sequence_format,
        light=args.light,
        baseline_tree=args.baseline_tree,
        rules_read=args.rules_read,
        sidecar_set=settings,
    )
    print(render(result, args.json, format_table, machine))
    return 0


# The bench owns these: the sidecar must serve its pack and rules on its port.
_BENCH_KEYS = frozenset({"listen", "metrics_port", "packs", "rules"})


def sidecar_settings(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs (``--sidecar-set``) as a config mapping, validated by the
    sidecar's own config loader; a dotted key sets a section's key. ConfigError on a
    malformed pair, a key the bench sets itself, or anything the loader rejects."""
    import yaml

    from monitor.sidecar.config import ConfigError, parse_config

    settings: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--sidecar-set {pair!r}: expected KEY=VALUE")
        path = key.strip().split(".")
        if path[0] in _BENCH_KEYS:
            raise ConfigError(f"--sidecar-set {key}: set by the bench itself")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--sidecar-set {key}: invalid YAML value {text!r}") from exc
        section = settings
        for part in path[:-1]:
            section = section.setdefault(part, {})
            if not isinstance(section, dict):
                raise ConfigError(f"--sidecar-set {key}: {part} is not a section")
        section[path[-1]] = value
    # The loader needs an existing pack path; the bench's own pack is written later, so
    # this module's file stands in (only its existence is checked here).
    parse_config({**settings, "packs": [__file__]}, Path("."), "--sidecar-set")
    return settings


def _load(text: str) -> float | None:
    if text == "half":
        return None
    try:
        load = float(text)
    except ValueError:
        load = 0.0
    if load <= 0:
        raise argparse.ArgumentTypeError(f"expected tokens/s > 0 or 'half', got {text!r}")
    return load


def run_sidecar_bench(
    seconds: float = 10.0,
    prefill_rows: int = 512,
    conversations: int = 64,
    latency_tokens_per_s: float | None = 25_000.0,
    pin: str = "client",
    saturation: bool = True,
    sequence_format: str = COLUMNS,
    light: bool = True,
    baseline_tree: str | None = None,
    rules_read: str = "rules",
    sidecar_set: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`latency_tokens_per_s=None`: pace the decode steps at half the measured throughput.
    `pin` (needs two cores or more, else nothing is pinned): "client" puts this load client
    alone on the first core; "both" also puts the sidecar alone on the last core.
    `sequence_format`: how the decode steps carry their sequences ("columns" or
    "sequences"); the stage costs measure both. `light`: also the light-load point
    (`LIGHT_ROWS`-row steps at `LIGHT_STEPS_PER_S`). `baseline_tree`: another checkout of
    this project whose sidecar runs beside this one's and takes every phase right after it,
    in the same run (`result["baseline"]`), so the two compare on the same machine state.
    `rules_read`: "rules" (the 20 rules' 20 columns) or "all" (every column; `_rules`).
    `sidecar_set`: config keys for this checkout's sidecar (`sidecar_settings`), reported as
    ``result["sidecar_set"]``; the baseline's sidecar runs without them."""
    if rules_read not in RULES_READ:
        raise ValueError(f"rules_read must be one of {RULES_READ}, got {rules_read!r}")
    if sequence_format not in SEQUENCE_FORMATS:
        raise ValueError(f"sequence_format must be one of {SEQUENCE_FORMATS}")
    if pin not in PIN_MODES:
        raise ValueError(f"pin must be one of {PIN_MODES}, got {pin!r}")
    tree = _checkout(baseline_tree) if baseline_tree is not None else None
    cores = sorted(os.sched_getaffinity(0))
    pinned = pin != "none" and len(cores) >= 2
    client_cores = {cores[0]} if pinned else set(cores)
    sidecar_core = cores[-1] if pinned and pin == "both" else None
    with tempfile.TemporaryDirectory(prefix="safety-monitor-bench-sidecar-") as tmp:
        workdir = Path(tmp)
        pack, ruleset = reference_setup(workdir, rules_read)
        sidecars = {"this": _start(workdir, "this", sidecar_core, settings=sidecar_set)}
        result: dict[str, Any] = {
            "shape": f"d_model {D_MODEL}, {FEATURES} of {D_SAE} latents, BF16, 20 rules",
            "rules_read": len(ruleset.required_features),
            "pin": pin if pinned else "none",
            "sidecar_core": sidecar_core,
            "client_cores": sorted(client_cores),
            "sequence_format": sequence_format,
            "sidecar_set": dict(sidecar_set or {}),
        }
        try:
            if tree is not None:
                sidecars["baseline"] = _start(workdir, "baseline", sidecar_core, tree)
                result["baseline"] = {"tree": str(tree)}
            os.sched_setaffinity(0, client_cores)
            runs = {name: {} for name in sidecars}
            runs["this"] = result

            order = list(sidecars)
            if tree is not None:  # neither sidecar's first phase pays for its warm-up
                for _, port in sidecars.values():
                    _warm_up(f"127.0.0.1:{port}", prefill_rows, conversations, sequence_format)

            def each(name: str, phase: Any, *args: Any) -> None:
                # Both sidecars back to back, the same machine state; which goes first
                # alternates from phase to phase, so neither always follows the other.
                for which in order:
                    process, port = sidecars[which]
                    target = f"127.0.0.1:{port}"
                    runs[which][name] = _measured(process, phase, target, *args)
                order.reverse()

            each("throughput", _throughput, seconds, prefill_rows)
            load = latency_tokens_per_s or result["throughput"]["tokens_per_s"] / 2
            rate = load / conversations  # decode steps per second
            each("latency", _latency, seconds, conversations, rate, sequence_format)
            if light:
                each(
                    "light",
                    _latency,
                    seconds,
                    LIGHT_ROWS,
                    LIGHT_STEPS_PER_S,
                    sequence_format,
                )
            if saturation:
                each(
                    "decode_saturation", _decode_saturation, seconds, conversations, sequence_format
                )
            if tree is not None:
                result["baseline"].update(runs["baseline"])
        finally:
            os.sched_setaffinity(0, set(cores))
            for process, _ in sidecars.values():
                process.terminate()
                process.wait(30)
        if saturation:
            result.update(_bounds(pack, ruleset, prefill_rows, conversations, sidecar_core))
    return result


def _warm_up(target: str, prefill_rows: int, conversations: int, sequence_format: str) -> None:
    """A few messages of each phase's kind, unmeasured: first-call costs (allocator growth,
    torch's first kernels, gRPC's buffers) then fall on no phase."""
    _Stream(target, window=4).run(
        itertools.islice((_prefill(i + 1, prefill_rows, i * prefill_rows) for i in range(8)), 8)
    )
    _Stream(target, window=64).run(
        itertools.islice(_decode_steps(conversations, sequence_format), 64)
    )


# The light-load point: what a lightly loaded engine sends (vLLM's bench overhead: a few
# requests, one row each per engine step, a step every ~8 ms).
LIGHT_ROWS = 4
LIGHT_STEPS_PER_S = 125.0


def _checkout(path: str) -> Path:
    """`path` as a checkout of this project (for `--baseline-tree`), or ValueError."""
    tree = Path(path).resolve()
    if not (tree / "monitor" / "sidecar" / "process.py").is_file():
        raise ValueError(f"--baseline-tree {path}: not a checkout of this project")
    return tree


def _bounds(
    pack: Any, ruleset: Any, prefill_rows: int, conversations: int, core: int | None
) -> dict[str, Any]:
    """Encode-only rates and stage costs, measured here on the sidecar's core (now idle) with
    the sidecar's thread count, so they are comparable with what it reached."""
    from monitor.bench.stages import encode_only_rows_per_s

    cores, threads = os.sched_getaffinity(0), torch.get_num_threads()
    hook_point = f"layers.{HOOK_LAYER}"
    try:
        if core is not None:
            os.sched_setaffinity(0, {core})
            torch.set_num_threads(1)
        return {
            "encode_only_rows_per_s": {
                str(prefill_rows): round(encode_only_rows_per_s(pack, hook_point, prefill_rows, 2)),
                str(conversations): round(
                    encode_only_rows_per_s(pack, hook_point, conversations, 2)
                ),
            },
            "stages": all_stage_costs(pack, ruleset, prefill_rows, conversations),
        }
    finally:
        os.sched_setaffinity(0, cores)
        torch.set_num_threads(threads)


def stage_messages(prefill_rows: int, conversations: int) -> dict[str, list[bytes]]:
    """Serialised messages of one stream per case: 64 decode steps with `Sequence` messages
    (``decode``), the same steps in the columnar format (``decode-col``, the first defining
    the slots) and 8 prefill messages (``prefill``)."""
    decode_steps = [_batch(step + 1, 1, conversations, step) for step in range(64)]
    encoder = ColumnarEncoder(conversations)  # one stream: slots defined by the first step
    return {
        "decode": [step.SerializeToString() for step in decode_steps],
        "decode-col": [encoder.encode(step).SerializeToString() for step in decode_steps],
        "prefill": [
            _prefill(i + 1, prefill_rows, i * prefill_rows).SerializeToString() for i in range(8)
        ],
    }


def all_stage_costs(
    pack: Any, ruleset: Any, prefill_rows: int, conversations: int, rounds: int = 3
) -> dict[str, Any]:
    """``stages.stage_costs`` of each case of ``stage_messages``."""
    from monitor.bench.stages import stage_costs

    hook_point = f"layers.{HOOK_LAYER}"
    return {
        name: stage_costs(pack, ruleset, messages, hook_point, rounds)
        for name, messages in stage_messages(prefill_rows, conversations).items()
    }


def stage_lines(stages: dict[str, Any]) -> list[str]:
    """The stage costs as table lines."""
    lines = [f"{'':<10}" + "".join(f"{stage:>11}" for stage in STAGE_COLUMNS)]
    for name, row in stages.items():
        cpu = row["cpu_ms"]
        lines.append(
            f"{name:<10}"
            + "".join(f"{cpu[stage]:>11.3f}" for stage in STAGE_COLUMNS[:-2])
            + f"{row['total_cpu_ms']:>11.3f}{row['all_but_encode_cpu_ms']:>11.3f}"
        )
    for name, row in stages.items():
        lines.append(
            f"{name} encode ({row.get('encoded_columns', '?')} columns): "
            f"{row['encode_gflops']:.1f} GFLOP/s, "
            f"{row['encode_fraction_of_gemm']:.0%} of the machine's fp32 GEMM "
            f"({row['machine_gemm_gflops']:.1f} GFLOP/s, same run)"
        )
    return lines


def _measured(process: Any, phase: Any, *args: Any) -> dict[str, Any]:
    """Run a phase; add the sidecar process's CPU ms per message it acked meanwhile, in all
    and by thread (`THREAD_GROUPS`)."""
    before, threads_before = _cpu_seconds(process.pid), _thread_cpu_seconds(process.pid)
    result = phase(*args)
    spent = _cpu_seconds(process.pid) - before
    threads_after = _thread_cpu_seconds(process.pid)
    by_group = dict.fromkeys(THREAD_GROUPS, 0.0)
    for tid, (group, seconds) in threads_after.items():
        by_group[group] += seconds - threads_before.get(tid, (group, 0.0))[1]
    messages = result.get("messages") or result.get("decode_steps") or 0
    result["sidecar_cpu_ms_per_message"] = round(1000 * spent / messages, 3) if messages else None
    result["sidecar_cpu_ms_per_message_by_thread"] = (
        {group: round(1000 * seconds / messages, 3) for group, seconds in by_group.items()}
        if messages
        else None
    )
    result["sidecar_cpu_cores"] = round(spent / result["seconds"], 2) if result["seconds"] else None
    return result


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


THREAD_GROUPS = ("pipeline", "event loop", "grpc core", "other")
"""The sidecar's threads, by what they do: ``pipeline`` the worker thread (validation,
encode, rules, events: what ``bench stages`` measures), ``event loop`` the main thread (the
asyncio loop: gRPC reads and writes, parsing, decoding the activations, hand-offs to the
worker), ``grpc core`` gRPC's own C threads (sockets, HTTP/2 framing), ``other`` the rest
(gRPC's completion-queue poller, the large-message parser, metrics, audit). torch's OpenMP
workers carry the name of the thread that started them: the pipeline thread's count under
``pipeline``, the event loop's (an inline step's encode on two threads) under ``other``."""


def _thread_cpu_seconds(pid: int) -> dict[int, tuple[str, float]]:
    """CPU seconds of each of a process's threads, with its `THREAD_GROUPS` group (from the
    thread's OS name, which the sidecar sets for its worker)."""
    from monitor.sidecar.streams import PIPELINE_THREAD

    ticks = os.sysconf("SC_CLK_TCK")
    threads: dict[int, tuple[str, float]] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return threads
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as stat:
                text = stat.read()
        except OSError:  # the thread has ended
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        if int(tid) == pid:
            group = "event loop"
        elif name == PIPELINE_THREAD:
            group = "pipeline"
        elif name.startswith(("event_engine", "grpc")):
            group = "grpc core"
        else:
            group = "other"
        threads[int(tid)] = (group, (int(fields[11]) + int(fields[12])) / ticks)
    return threads


def _by_thread(phase: dict[str, Any]) -> str:
    """A phase's CPU per message by thread group, for the table."""
    split = phase.get("sidecar_cpu_ms_per_message_by_thread")
    if not split:
        return ""
    return " (" + ", ".join(f"{group} {ms}" for group, ms in split.items()) + ")"


def _start(  # type: ignore[no-untyped-def]
    workdir: Path,
    name: str,
    core: int | None,
    tree: Path | None = None,
    settings: dict[str, Any] | None = None,
    environment: dict[str, str] | None = None,
):
    """A sidecar process serving the pack and rules `reference_setup` wrote to `workdir`
    (on `core` alone, one torch thread, when given), and its port. `tree`: run the sidecar
    of that checkout instead of this one (its modules first on the path). `settings`: more
    config keys (`sidecar_settings`). `environment`: more environment variables for the
    sidecar process alone (e.g. gRPC's runtime settings)."""
    from monitor.fixtures import free_port, start_sidecar
    from monitor.sidecar.config import parse_config

    port = free_port()
    config = {
        "listen": f"127.0.0.1:{port}",
        "metrics_port": 0,
        "packs": [str(workdir / "ref.pack.safetensors")],
        "rules": [str(workdir / "rules.yaml")],
        "log_format": "json",
        "log_level": "warning",
        **(settings or {}),
    }
    rundir = workdir / name
    rundir.mkdir()
    parse_config(config, rundir, f"bench sidecar {name}")  # the loader's error, before a start
    extra = environment or {}
    names = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONPATH", *extra)
    saved = {name: os.environ.get(name) for name in names}
    try:
        os.environ.update(extra)
        if core is not None:  # one core: more torch threads would only fight over it
            os.environ.update(dict.fromkeys(names[:2], "1"))  # start_sidecar passes os.environ
        if tree is not None:
            os.environ["PYTHONPATH"] = str(tree)
        pin = (lambda: os.sched_setaffinity(0, {core})) if core is not None else None
        sidecar = start_sidecar(config, rundir, cwd=tree, preexec_fn=pin)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return sidecar.process, port


def reference_setup(workdir: Path, rules_read: str = "rules"):  # type: ignore[no-untyped-def]
    """The reference-shape pack and the bench's 20 rules (10 temporal), written to
    ``workdir`` as ``ref.pack.safetensors`` and ``rules.yaml`` and loaded; ``rules_read``
    "all": the rules read every column of the pack (`_rules`)."""
    from monitor.features import save_pack
    from monitor.features.build import build_pack_from_sae, load_sae
    from monitor.fixtures import write_layer_sae
    from monitor.sidecar.process import load_ruleset

    sae = load_sae(write_layer_sae(workdir / "sae", D_MODEL, D_SAE, HOOK_LAYER, seed=0))
    pack = build_pack_from_sae(sae, list(range(0, D_SAE, D_SAE // FEATURES)), name="ref")
    save_pack(pack, workdir / "ref.pack.safetensors")
    (workdir / "rules.yaml").write_text(_rules("ref", D_SAE // FEATURES, rules_read == "all"))
    return pack, load_ruleset([workdir / "rules.yaml"], [pack])


def _rules(pack: str, stride: int, read_all: bool = False) -> str:
    """20 rules on 20 features, half of them temporal, none firing (thresholds out of reach).
    ``read_all``: the 10 non-temporal rules also read the pack's other columns (the max of
    their share of them), so the rules read every column and the sidecar encodes the full
    block (the old shape, to compare with)."""
    lines = ["features:"]
    lines += [f"  f{i}: {pack}/{stride * i}" for i in range(20)]
    others: dict[int, list[str]] = {i: [] for i in range(1, 20, 2)}
    if read_all:
        # Feature names are SAE latents: column c is latent stride * c; f0-f19 are 0-19.
        for j, column in enumerate(range(20, FEATURES)):
            lines.append(f"  g{j}: {pack}/{stride * column}")
            others[1 + 2 * (j % 10)].append(f"g{j}")
    lines.append("rules:")
    for i in range(20):
        if i % 2 == 0:
            condition = f"rolling_mean(f{i}, 16) > 1000"
        elif others[i]:
            condition = f"max({', '.join([f'f{i}', *others[i]])}) > 1000"
        else:
            condition = f"f{i} > 1000"
        lines += [f"  - rule: bench-{i}", "    severity: info", f"    condition: {condition}"]
    return "\n".join(lines) + "\n"


def _batch(seq_no: int, rows_per_conversation: int, conversations: int, position: int):  # type: ignore[no-untyped-def]
    rows = rows_per_conversation * conversations
    activations = torch.randn(rows, D_MODEL, generator=torch.Generator().manual_seed(seq_no))
    batch = pb.StepBatch(seq_no=seq_no, model="bench")
    batch.layers.append(
        pb.Layer(
            hook_point=f"layers.{HOOK_LAYER}", activations=encode_tensor(activations.bfloat16())
        )
    )
    for c in range(conversations):
        batch.sequences.append(
            pb.Sequence(conversation_id=f"c{c}", rows=rows_per_conversation, position=position)
        )
    return batch


def _decode_steps(conversations: int, sequence_format: str) -> Iterator[pb.StepBatch]:
    """Decode steps of one stream, one row per conversation, positions 0, 1, ...: in the
    columnar format the first step defines the conversation slots and the others only move
    the positions, as the capture relay sends them."""
    template = _batch(0, 1, conversations, 0)
    if sequence_format == COLUMNS:
        first = ColumnarEncoder(conversations).encode(template)
        rest = pb.StepBatch()
        rest.CopyFrom(first)
        rest.columns.ClearField("define")
    step = 0
    while True:
        batch = pb.StepBatch()
        if sequence_format == COLUMNS:
            batch.CopyFrom(first if step == 0 else rest)
            batch.columns.ClearField("position")
            batch.columns.position.extend([step] * conversations)
        else:
            batch.CopyFrom(template)
            for sequence in batch.sequences:
                sequence.position = step
        batch.seq_no = step + 1
        yield batch
        step += 1


def _prefill(seq_no: int, rows: int, position: int):  # type: ignore[no-untyped-def]
    batch = _batch(0, rows, 1, position)
    batch.seq_no = seq_no
    return batch


class _Stream:
    """One Monitor stream with send times per seq_no and a bounded window in flight. Like the
    capture relay, it asks for `Acks` events (a group's acks in one message) when the
    sidecar's GetStatus offers them."""

    def __init__(self, target: str, window: int) -> None:
        self.channel = grpc.insecure_channel(
            target, options=[("grpc.max_send_message_length", 64 << 20)]
        )
        self.window = threading.Semaphore(window)
        self.sent: dict[int, float] = {}
        self.acked_at: dict[int, float] = {}  # when each seq_no's ack was read
        self.latencies: list[float] = []
        self.rows = 0
        self.errors = 0
        self.events = 0

    def run(self, batches: Iterator[pb.StepBatch]) -> None:
        def requests() -> Iterator[pb.StepBatch]:
            for batch in batches:
                self.window.acquire()
                self.sent[batch.seq_no] = time.perf_counter()
                yield batch

        stub = pb_grpc.SafetyMonitorStub(self.channel)
        status = stub.GetStatus(pb.StatusRequest(), timeout=30)
        metadata = ask_for_acks() if offers_acks(status) else ()
        for event in stub.Monitor(requests(), metadata=metadata, timeout=600):
            self.events += 1
            if event.HasField("error"):
                self.errors += 1
                self.window.release()
                continue
            for ack in acked(event):
                now = time.perf_counter()
                self.acked_at[ack.seq_no] = now
                self.latencies.append(now - self.sent.pop(ack.seq_no))
                self.rows += ack.rows
                self.window.release()
        self.channel.close()


def _throughput(target: str, seconds: float, rows: int) -> dict[str, Any]:
    template = _batch(0, rows, 1, 0)
    deadline = time.perf_counter() + seconds

    def batches() -> Iterator[pb.StepBatch]:
        seq_no = 0
        while time.perf_counter() < deadline:
            seq_no += 1
            batch = pb.StepBatch()
            batch.CopyFrom(template)
            batch.seq_no = seq_no
            batch.sequences[0].position = (seq_no - 1) * rows
            yield batch

    stream = _Stream(target, window=4)
    started = time.perf_counter()
    stream.run(batches())
    elapsed = time.perf_counter() - started
    return {
        "rows_per_message": rows,
        "messages": len(stream.latencies),
        "tokens_per_s": round(stream.rows / elapsed),
        "errors": stream.errors,
        "seconds": round(elapsed, 3),
    }


def _latency(
    target: str, seconds: float, conversations: int, rate: float, sequence_format: str
) -> dict[str, Any]:
    """Decode steps paced at `rate` per second. Send-to-ack runs from when gRPC takes a step
    from this client (stamped then) to when its ack is read. Besides it, the schedule's
    lateness (how long after its due time gRPC took each step: this client falling behind,
    or flow control holding the stream while the sidecar is behind) and due-to-ack (both
    together: what an engine sending on schedule would see)."""
    interval = 1.0 / max(rate, 1.0)
    count = max(1, int(seconds / interval))
    due: dict[int, float] = {}
    late: list[float] = []

    def batches() -> Iterator[pb.StepBatch]:
        next_at = time.perf_counter()
        for batch in itertools.islice(_decode_steps(conversations, sequence_format), count):
            next_at += interval
            pause = next_at - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            due[batch.seq_no] = next_at
            late.append(time.perf_counter() - next_at)
            yield batch

    stream = _Stream(target, window=1024)
    started = time.perf_counter()
    stream.run(batches())
    elapsed = time.perf_counter() - started
    ms = sorted(1000 * x for x in stream.latencies)
    late_ms = sorted(1000 * max(x, 0.0) for x in late)
    due_ms = sorted(1000 * (at - due[seq_no]) for seq_no, at in stream.acked_at.items())
    return {
        "seconds": round(elapsed, 3),
        "decode_steps": len(ms),
        "steps_per_s": round(rate, 1),
        "rows_per_step": conversations,
        "tokens_per_s": round(rate * conversations),
        "p50_ms": round(statistics.median(ms), 2),
        "p99_ms": _p99(ms),
        "send_late_p50_ms": round(statistics.median(late_ms), 2),
        "send_late_p99_ms": _p99(late_ms),
        "due_to_ack_p99_ms": _p99(due_ms),
        "errors": stream.errors,
        "events_per_step": round(stream.events / len(ms), 3) if ms else None,
    }


def _p99(ordered: list[float]) -> float:
    """The 99th percentile of sorted values (the value at index floor(0.99 n))."""
    return round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 2)


def _decode_saturation(
    target: str, seconds: float, conversations: int, sequence_format: str
) -> dict[str, Any]:
    """Decode steps back to back, at most 64 in flight: the sidecar's decode-step ceiling."""
    deadline = time.perf_counter() + seconds

    def batches() -> Iterator[pb.StepBatch]:
        for batch in _decode_steps(conversations, sequence_format):
            if time.perf_counter() >= deadline:
                return
            yield batch

    stream = _Stream(target, window=64)
    started = time.perf_counter()
    stream.run(batches())
    elapsed = time.perf_counter() - started
    return {
        "seconds": round(elapsed, 3),
        "decode_steps": len(stream.latencies),
        "tokens_per_s": round(stream.rows / elapsed),
        "errors": stream.errors,
        "events_per_step": (
            round(stream.events / len(stream.latencies), 3) if stream.latencies else None
        ),
    }


def format_table(result: dict[str, Any]) -> str:
    """The report as a table."""
    t, lat = result["throughput"], result["latency"]
    if result.get("sidecar_core") is not None:
        pinning = (
            f"sidecar alone on core {result['sidecar_core']} (1 torch thread), client on "
            f"core(s) {','.join(map(str, result['client_cores']))}"
        )
    elif result.get("pin") == "client":
        pinning = f"client alone on core(s) {','.join(map(str, result['client_cores']))}"
    else:
        pinning = "sidecar and client share the cores"
    settings = result.get("sidecar_set")
    if settings:
        pinning += f"; this sidecar's config also sets {json.dumps(settings)}"
    lines = [
        f"sidecar end to end over loopback gRPC: {result['shape']}; {pinning}",
        f"throughput: {t['tokens_per_s']:,} tokens/s sustained "
        f"({t['messages']} messages of {t['rows_per_message']} rows, {t['errors']} errors); "
        f"sidecar CPU {t['sidecar_cpu_ms_per_message']} ms per message{_by_thread(t)}",
        f"latency at {lat['tokens_per_s']:,} tokens/s ({lat['steps_per_s']} decode steps/s of "
        f"64 rows): send-to-ack p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms "
        f"({lat['decode_steps']} steps, {lat['errors']} errors); "
        f"sidecar CPU {lat['sidecar_cpu_ms_per_message']} ms per step{_by_thread(lat)}",
        f"  sends late on the schedule: p50 {lat.get('send_late_p50_ms', '-')} ms, "
        f"p99 {lat.get('send_late_p99_ms', '-')} ms (this client or flow control); "
        f"due-to-ack p99 {lat.get('due_to_ack_p99_ms', '-')} ms",
    ]
    if "light" in result:
        light = result["light"]
        lines.append(
            f"light load ({light['steps_per_s']:g} steps/s of {light['rows_per_step']} rows): "
            f"send-to-ack p50 {light['p50_ms']} ms, p99 {light['p99_ms']} ms "
            f"({light['decode_steps']} steps, {light['errors']} errors); "
            f"sidecar CPU {light['sidecar_cpu_ms_per_message']} ms per step{_by_thread(light)}"
        )
    if "decode_saturation" in result:
        sat, bound = result["decode_saturation"], result["encode_only_rows_per_s"]
        prefill_bound = bound[str(t["rows_per_message"])]
        decode_bound = next(v for k, v in bound.items() if k != str(t["rows_per_message"]))
        lines += [
            f"decode steps back to back: {sat['tokens_per_s']:,} tokens/s "
            f"({sat['decode_steps']} steps, {sat['errors']} errors); "
            f"sidecar CPU {sat['sidecar_cpu_ms_per_message']} ms per step{_by_thread(sat)}",
            f"encode-only bound (the sidecar's cores and threads): {prefill_bound:,} rows/s "
            f"({t['rows_per_message']}-row inputs), {decode_bound:,} rows/s (decode-step inputs)",
            f"  (the bound is the pack's full encode, all {FEATURES} columns; the sidecar encodes "
            f"only the columns its rules read, here {result.get('rules_read', '?')} of {FEATURES}; "
            "`--rules-read all` makes them read every column, the bound's shape)",
            f"prefill throughput {t['tokens_per_s'] / prefill_bound:.0%} of its bound; "
            f"decode saturation {sat['tokens_per_s'] / decode_bound:.0%} of its bound",
            "sidecar CPU per message by stage (ms), the pipeline run in this process:",
            *stage_lines(result["stages"]),
        ]
    if "baseline" in result:
        lines += side_by_side_lines(result)
    return "\n".join(lines)


def side_by_side_lines(result: dict[str, Any]) -> list[str]:
    """Each phase's numbers for this checkout's sidecar and the baseline's, measured back to
    back in the same run (`--baseline-tree`)."""
    base = result["baseline"]
    lines = [
        f"side by side with the baseline sidecar of {base['tree']} (each phase run on both, "
        "back to back, alternating which goes first):",
        f"{'phase':<18}{'CPU ms/msg':>12}{'baseline':>10}{'ratio':>7}"
        f"{'p99 ms':>9}{'baseline':>10}{'tokens/s':>10}{'baseline':>10}",
    ]
    for phase in ("throughput", "latency", "light", "decode_saturation"):
        if phase not in result or phase not in base:
            continue
        this, other = result[phase], base[phase]
        cpu, cpu_base = this["sidecar_cpu_ms_per_message"], other["sidecar_cpu_ms_per_message"]
        ratio = f"{cpu_base / cpu:.2f}" if cpu and cpu_base else "-"
        lines.append(
            f"{phase:<18}{cpu or '-':>12}{cpu_base or '-':>10}{ratio:>7}"
            f"{this.get('p99_ms', '-'):>9}{other.get('p99_ms', '-'):>10}"
            f"{this['tokens_per_s']:>10}{other['tokens_per_s']:>10}"
        )
    lines.append("ratio: baseline CPU per message / this one's (above 1: this one costs less)")
    return lines


STAGE_COLUMNS = ("parse", "validate", "encode", "rules", "events", "total", "not encode")
