"""How much of the sidecar's CPU per paced decode step is gRPC's own, per message.

Issue 15: at 25,000 tokens/s of 64-row decode steps the sidecar spends 1.2-2.0 ms of CPU per
step, the stages (`bench stages`: parse, validate, encode, rules, events) about 0.7 of it.
This runs `bench sidecar`'s paced phase (64-row BF16 decode steps, columnar, 390.6 steps/s,
the load client pinned to CPU 0) against three servers in turn, each a fresh process with
the gRPC settings of `safety-monitor serve` (`SIDECAR_GRPC_EXPERIMENTS` and the server
options, `process.server_options`):

  sidecar     `safety-monitor serve` with the bench's reference pack and 20 rules;
  bare+parse  a bare `grpc.aio` server: for each message, `context.read()`, the sidecar's
              own parse of it (`service._parse`: the StepBatch and its activations decoded
              and checked finite), and one Ack written with `context.write()`;
  bare        the same without the parse (the ack's seq_no read from the message's first
              field): what gRPC's asyncio server costs per message and nothing else.

Per step, each server's CPU by thread (`bench sidecar`'s groups: the event loop, gRPC's
completion-queue poller under "other", the sidecar's pipeline thread) and the send-to-ack
p50/p99. The sidecar's event loop minus bare+parse's is its own work beyond gRPC and the
parse (the inline steps' pipeline work and the stream's plumbing: the read-ahead queue,
the idle timers, the byte budget). Run from the repository root with two CPUs:
``python scripts/sidecar_grpc_floor.py`` (about 25 seconds per server and round).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
from pathlib import Path

STEPS_PER_S = 25_000 / 64  # the bench's latency phase: 25,000 tokens/s in 64-row steps
SERVERS = ("sidecar", "bare+parse", "bare")
ROOT = Path(__file__).resolve().parents[1]  # the checkout this script belongs to


async def _serve_bare(port: int, parse: bool) -> None:
    """A Monitor service that acks every message (after the sidecar's parse with `parse`),
    and a GetStatus that offers no event formats, until stdin closes."""
    import grpc

    from monitor.sidecar import service
    from monitor.wire import SERVICE_NAME, pb

    async def monitor(_requests: object, context: grpc.aio.ServicerContext) -> None:
        while True:
            data = await context.read()
            if data is grpc.aio.EOF:
                return
            if parse:
                batch, _ = service._parse(data)
                seq_no = batch.seq_no
            else:
                seq_no = _leading_seq_no(data)
            await context.write(pb.MonitorEvent(ack=pb.Ack(seq_no=seq_no, rows=64)))

    async def status(_request: object, _context: object) -> pb.StatusResponse:
        return pb.StatusResponse()

    handlers = {
        "Monitor": grpc.stream_stream_rpc_method_handler(
            monitor, response_serializer=pb.MonitorEvent.SerializeToString
        ),
        "GetStatus": grpc.unary_unary_rpc_method_handler(
            status,
            request_deserializer=pb.StatusRequest.FromString,
            response_serializer=pb.StatusResponse.SerializeToString,
        ),
    }
    server = grpc.aio.server(options=_options())
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.stop(None)


def _options() -> list[tuple[str, int]]:
    """`serve`'s gRPC server options (message sizes, gRPC's flow control: no bandwidth
    probe, a 4 MiB stream window) for the bench sidecar's limits."""
    from monitor.sidecar.config import Limits
    from monitor.sidecar.process import server_options

    return server_options(Limits().max_message_bytes)


def _leading_seq_no(data: bytes) -> int:
    """`StepBatch.seq_no` where it is the message's first field (tag 0x08, as protobuf
    serializes the bench's steps): a varint."""
    if not data or data[0] != 0x08:
        return 0
    value = shift = 0
    for byte in data[1:11]:
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            break
        shift += 7
    return value


def _start_bare(port: int, parse: bool) -> subprocess.Popen[str]:
    from monitor.cli import SIDECAR_GRPC_EXPERIMENTS

    # This checkout's modules first, as the script's own: not an installed copy elsewhere.
    path = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
    environment = {
        **os.environ,
        "GRPC_EXPERIMENTS": SIDECAR_GRPC_EXPERIMENTS,
        "PYTHONPATH": path,
    }
    process = subprocess.Popen(
        [sys.executable, __file__, "--serve-bare", str(port), *(["--parse"] if parse else [])],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=environment,
    )
    assert process.stdout is not None
    if process.stdout.readline().strip() != "ready":
        process.kill()
        raise RuntimeError("the bare server did not start")
    return process


def measure(workdir: Path, server: str, index: int, seconds: float) -> str:
    """One server's line: start it, warm up, run the paced phase, stop it."""
    from monitor.bench import sidecar as bench
    from monitor.fixtures import free_port

    if server == "sidecar":
        process, port = bench._start(workdir, f"sidecar-{index}", None)
    else:
        port = free_port()
        process = _start_bare(port, parse=server == "bare+parse")
    cores = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(cores)})
        target = f"127.0.0.1:{port}"
        bench._warm_up(target, 512, 64, "columns")
        before = bench._thread_cpu_seconds(process.pid)
        result = bench._latency(target, seconds, 64, STEPS_PER_S, "columns")
        after = bench._thread_cpu_seconds(process.pid)
    finally:
        os.sched_setaffinity(0, cores)
        if server == "sidecar":
            process.terminate()
        elif process.stdin is not None:
            process.stdin.close()  # the bare server stops when its stdin closes
        process.wait(30)
    steps = result["decode_steps"]
    groups: dict[str, float] = {}
    for tid, (group, cpu) in after.items():
        groups[group] = groups.get(group, 0.0) + cpu - before.get(tid, (group, 0.0))[1]
    total = sum(groups.values())
    split = ", ".join(
        f"{group} {1000 * cpu / steps:.3f}" for group, cpu in sorted(groups.items()) if cpu > 0
    )
    return (
        f"{server:<11} CPU/step {1000 * total / steps:.3f} ms ({split}); "
        f"send-to-ack p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms, "
        f"{result['errors']} errors"
    )


def main() -> None:
    """Every server `--rounds` times, alternating (the order turns each round)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--serve-bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--parse", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_bare is not None:
        asyncio.run(_serve_bare(args.serve_bare, args.parse))
        return
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("needs two CPUs: the load client runs alone on the first")
    from monitor.bench import sidecar as bench

    with tempfile.TemporaryDirectory(prefix="grpc-floor-") as directory:
        workdir = Path(directory)
        bench.reference_setup(workdir)
        for round_ in range(args.rounds):
            order = SERVERS if round_ % 2 == 0 else SERVERS[::-1]
            for server in order:
                print(f"round {round_ + 1}: {measure(workdir, server, round_, args.seconds)}")


if __name__ == "__main__":
    main()
