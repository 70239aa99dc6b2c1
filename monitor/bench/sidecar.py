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
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import torch

from monitor.wire import encode_tensor, pb, pb_grpc

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
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(handler=_run_command)


def _run_command(args: argparse.Namespace) -> int:
    from monitor.logs import configure_logging

    configure_logging("auto", "warning")
    result = run_sidecar_bench(
        args.seconds, args.prefill_rows, args.conversations, args.latency_load
    )
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


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
) -> dict[str, Any]:
    """`latency_tokens_per_s=None`: pace the decode steps at half the measured throughput."""
    with tempfile.TemporaryDirectory(prefix="safety-monitor-bench-sidecar-") as tmp:
        workdir = Path(tmp)
        process, port = _start(workdir)
        try:
            target = f"127.0.0.1:{port}"
            throughput = _throughput(target, seconds, prefill_rows)
            load = latency_tokens_per_s or throughput["tokens_per_s"] / 2
            rate = load / conversations  # decode steps per second
            latency = _latency(target, seconds, conversations, rate)
        finally:
            process.terminate()
            process.wait(30)
    return {
        "shape": f"d_model {D_MODEL}, {FEATURES} of {D_SAE} latents, BF16, 20 rules",
        "throughput": throughput,
        "latency": latency,
    }


def _start(workdir: Path):  # type: ignore[no-untyped-def]
    from monitor.features import save_pack
    from monitor.features.build import build_pack_from_sae, load_sae
    from monitor.fixtures import free_port, start_sidecar, write_layer_sae

    sae = load_sae(write_layer_sae(workdir / "sae", D_MODEL, D_SAE, HOOK_LAYER, seed=0))
    pack = build_pack_from_sae(sae, list(range(0, D_SAE, D_SAE // FEATURES)), name="ref")
    save_pack(pack, workdir / "ref.pack.safetensors")
    (workdir / "rules.yaml").write_text(_rules("ref", D_SAE // FEATURES))
    port = free_port()
    config = {
        "listen": f"127.0.0.1:{port}",
        "metrics_port": 0,
        "packs": [str(workdir / "ref.pack.safetensors")],
        "rules": [str(workdir / "rules.yaml")],
        "log_format": "json",
        "log_level": "warning",
    }
    sidecar = start_sidecar(config, workdir)
    return sidecar.process, port


def _rules(pack: str, stride: int) -> str:
    """20 rules on 20 features, half of them temporal, none firing (thresholds out of reach)."""
    lines = ["features:"]
    lines += [f"  f{i}: {pack}/{stride * i}" for i in range(20)]
    lines.append("rules:")
    for i in range(20):
        condition = f"f{i} > 1000" if i % 2 else f"rolling_mean(f{i}, 16) > 1000"
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


class _Stream:
    """One Monitor stream with send times per seq_no and a bounded window in flight."""

    def __init__(self, target: str, window: int) -> None:
        self.channel = grpc.insecure_channel(
            target, options=[("grpc.max_send_message_length", 64 << 20)]
        )
        self.window = threading.Semaphore(window)
        self.sent: dict[int, float] = {}
        self.latencies: list[float] = []
        self.rows = 0
        self.errors = 0

    def run(self, batches: Iterator[pb.StepBatch]) -> None:
        def requests() -> Iterator[pb.StepBatch]:
            for batch in batches:
                self.window.acquire()
                self.sent[batch.seq_no] = time.perf_counter()
                yield batch

        stub = pb_grpc.SafetyMonitorStub(self.channel)
        for event in stub.Monitor(requests(), timeout=600):
            if event.HasField("ack"):
                self.latencies.append(time.perf_counter() - self.sent.pop(event.ack.seq_no))
                self.rows += event.ack.rows
                self.window.release()
            elif event.HasField("error"):
                self.errors += 1
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
    }


def _latency(target: str, seconds: float, conversations: int, rate: float) -> dict[str, Any]:
    template = _batch(0, 1, conversations, 0)
    interval = 1.0 / max(rate, 1.0)
    count = max(1, int(seconds / interval))

    def batches() -> Iterator[pb.StepBatch]:
        next_at = time.perf_counter()
        for step in range(count):
            next_at += interval
            pause = next_at - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            batch = pb.StepBatch()
            batch.CopyFrom(template)
            batch.seq_no = step + 1
            for sequence in batch.sequences:
                sequence.position = step
            yield batch

    stream = _Stream(target, window=1024)
    stream.run(batches())
    ms = sorted(1000 * x for x in stream.latencies)
    return {
        "decode_steps": len(ms),
        "steps_per_s": round(rate, 1),
        "tokens_per_s": round(rate * conversations),
        "p50_ms": round(statistics.median(ms), 2),
        "p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 2),
        "errors": stream.errors,
    }


def format_table(result: dict[str, Any]) -> str:
    """The report as a table."""
    t, lat = result["throughput"], result["latency"]
    return "\n".join(
        [
            f"sidecar end to end over loopback gRPC: {result['shape']}",
            f"throughput: {t['tokens_per_s']:,} tokens/s sustained "
            f"({t['messages']} messages of {t['rows_per_message']} rows, {t['errors']} errors)",
            f"latency at {lat['tokens_per_s']:,} tokens/s ({lat['steps_per_s']} decode steps/s of "
            f"64 rows): send-to-ack p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms "
            f"({lat['decode_steps']} steps, {lat['errors']} errors)",
        ]
    )
