"""safety-monitor command line: serve | demo | pack build."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

import monitor

EXIT_USAGE = 2  # bad config, bad input files: one clear line on stderr


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return EXIT_USAGE
    return args.handler(args)


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
    demo.add_argument("--workdir", type=Path, help="keep the generated SAE, pack and rules here")
    demo.set_defaults(handler=_demo)

    pack = commands.add_parser("pack", help="feature packs").add_subparsers(metavar="ACTION")
    build = pack.add_parser("build", help="compile a pack from SAE features")
    build.add_argument("--sae", required=True, type=Path, help="SAELens SAE directory")
    build.add_argument("--features", required=True, help="SAE indices, e.g. 3,17,42")
    build.add_argument("--name", help="pack name used in rule files (default: the SAE dir name)")
    build.add_argument("--hook-point", help="override the SAE's hook point, e.g. layers.12")
    build.add_argument("--out", required=True, type=Path, help="pack file to write")
    build.set_defaults(handler=_pack_build)
    return parser


def _fail(message: str) -> int:
    print(f"safety-monitor: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _serve(args: argparse.Namespace) -> int:
    from monitor.outputs.logging import configure_logging
    from monitor.sidecar.config import ConfigError, load_config
    from monitor.sidecar.server import StartupError, serve

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

    return run_demo(args.workdir)


def _pack_build(args: argparse.Namespace) -> int:
    from monitor.features import FeatureError, build_pack_from_sae, load_sae, save_pack

    try:
        indices = _parse_indices(args.features)
        sae = load_sae(args.sae)
        name = args.name or args.sae.resolve().name
        pack = build_pack_from_sae(sae, indices, name=name, hook_point=args.hook_point)
        digest = save_pack(pack, args.out)
    except (FeatureError, ValueError) as exc:
        return _fail(str(exc))
    hook_points = ", ".join(pack.hook_points)
    print(f"wrote {args.out}: pack {pack.name!r}, {pack.feature_count} features at {hook_points}")
    print(f"sha256 {digest}")
    return 0


def _parse_indices(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise ValueError(f"--features: expected comma-separated integers, got {text!r}") from exc


if __name__ == "__main__":
    sys.exit(main())
