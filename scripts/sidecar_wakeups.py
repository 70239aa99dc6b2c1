"""Context switches, CPU and p99 per decode step of the sidecar under gRPC runtime settings.

Issue 15: a decode step costs the sidecar about nine thread wake-ups. The relay dropped three
of its own by turning off gRPC's EventEngine client (``GRPC_EXPERIMENTS=-event_engine_client``);
this tries the server-side settings in the sidecar process. `safety-monitor serve` sets
``GRPC_EXPERIMENTS=-event_engine_listener,-event_engine_for_all_other_endpoints`` when the
environment has no ``GRPC_EXPERIMENTS``; any value given (the empty one too) replaces it, so
every variant but ``serve's default`` runs on top of gRPC's own defaults. For each variant (a
set of environment variables given to the sidecar alone, the load client keeps gRPC's) it
starts the reference sidecar of ``safety-monitor bench sidecar``, warms it up, runs the
bench's paced decode-step phase (64-row steps at 390.6 steps/s) and prints, per step, the
sidecar's context switches (voluntary and involuntary, all threads, and by thread name), its
CPU and the send-to-ack p99. Variants alternate for ``--rounds`` rounds. Run from the
repository root with two CPUs (the client is pinned to CPU 0):
``python scripts/sidecar_wakeups.py`` (about 20 seconds per variant and round).
"""

from __future__ import annotations

import argparse
import collections
import os
import tempfile
from pathlib import Path

from monitor.bench import sidecar as bench

STEPS_PER_S = 25_000 / 64  # the bench's latency phase: 25,000 tokens/s in 64-row steps
VARIANTS = (  # (label, environment of the sidecar: `KEY=VALUE;KEY=VALUE`)
    ("gRPC's defaults (GRPC_EXPERIMENTS empty)", "GRPC_EXPERIMENTS="),
    ("serve's default (GRPC_EXPERIMENTS unset)", ""),
    ("gRPC's defaults + -event_engine_callback_cq", "GRPC_EXPERIMENTS=-event_engine_callback_cq"),
    ("gRPC's defaults + tcp_rcv_lowat", "GRPC_EXPERIMENTS=tcp_rcv_lowat"),
    ("gRPC's defaults + GRPC_POLL_STRATEGY=poll", "GRPC_EXPERIMENTS=;GRPC_POLL_STRATEGY=poll"),
)


def switches(pid: int) -> collections.Counter[str]:
    """Context switches so far of each thread name of process `pid`."""
    counts: collections.Counter[str] = collections.Counter()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            lines = (task / "status").read_text().splitlines()
        except OSError:  # the thread ended meanwhile
            continue
        counts[name] += sum(int(line.split()[1]) for line in lines if "ctxt_switches" in line)
    return counts


def measure(workdir: Path, name: str, label: str, variant: str, seconds: float) -> str:
    """One variant's line: start its sidecar, warm up, run the paced phase, stop it."""
    settings = dict(item.split("=", 1) for item in variant.split(";") if item)
    process, port = bench._start(workdir, name, None, environment=settings)
    cores = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(cores)})
        target = f"127.0.0.1:{port}"
        bench._warm_up(target, 512, 64, "columns")
        before, cpu_before = switches(process.pid), bench._cpu_seconds(process.pid)
        result = bench._latency(target, seconds, 64, STEPS_PER_S, "columns")
        after, cpu_after = switches(process.pid), bench._cpu_seconds(process.pid)
    finally:
        os.sched_setaffinity(0, cores)
        process.terminate()
        process.wait(30)
    steps = result["decode_steps"]
    by_name = {k: round((after[k] - before[k]) / steps, 2) for k in after if after[k] > before[k]}
    total = sum(after[k] - before[k] for k in after) / steps
    return (
        f"{label:<48} switches/step {total:5.2f}  CPU/step "
        f"{1000 * (cpu_after - cpu_before) / steps:.3f} ms  p99 {result['p99_ms']} ms  {by_name}"
    )


def main() -> None:
    """Run every variant `--rounds` times, alternating, and print one line each."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sidecar-wakeups-") as tmp:
        workdir = Path(tmp)
        bench.reference_setup(workdir)
        for round_no in range(args.rounds):
            for index, (label, variant) in enumerate(VARIANTS):
                line = measure(workdir, f"r{round_no}v{index}", label, variant, args.seconds)
                print(line, flush=True)


if __name__ == "__main__":
    main()
