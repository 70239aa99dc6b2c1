"""`safety-monitor pack build | fit | calibrate | inspect`.

Wired into the main CLI by ``add_pack_commands(pack_subparsers)``. Handlers return exit codes;
bad input is one line on stderr (``safety-monitor: error: ...``) and exit 2. Packs are only
ever written complete (``save_pack`` writes a temporary file and renames it).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from monitor.features.errors import FeatureError

EXIT_USAGE = 2
Handler = Callable[[argparse.Namespace], int]


def add_pack_commands(pack_subparsers: Any) -> None:
    """Register build, fit, calibrate and inspect under ``safety-monitor pack``."""
    _add_build(pack_subparsers)
    _add_fit(pack_subparsers)
    _add_calibrate(pack_subparsers)
    _add_inspect(pack_subparsers)


def _guarded(handler: Handler) -> Handler:
    """Turn the typed errors of bad input into the CLI's one-line error and exit code 2."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except (FeatureError, ValueError, OSError) as exc:
            return fail(str(exc))

    return run


def fail(message: str) -> int:
    """Print a one-line error to stderr; returns the usage exit code."""
    print(f"safety-monitor: error: {' '.join(message.splitlines())}", file=sys.stderr)
    return EXIT_USAGE


def note(message: str) -> None:
    """Print a note to stderr."""
    print(f"safety-monitor: note: {message}", file=sys.stderr)


def _int_list(text: str, option: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{option}: expected comma-separated integers, got {text!r}") from None


# --- build --------------------------------------------------------------------------------


def _add_build(sub: Any) -> None:
    from monitor.features.build.sae import FORMATS, TOPK_MODES

    p = sub.add_parser("build", help="compile a pack from SAE features (and existing packs)")
    p.add_argument("--sae", type=Path, help="SAE directory or weights file")
    p.add_argument("--features", help="SAE indices, e.g. 3,17,42")
    p.add_argument("--format", choices=FORMATS, help="SAE format (default: auto-detect)")
    p.add_argument("--selection", type=Path, help="YAML selection file (several SAEs/packs)")
    p.add_argument("--name", help="pack name used in rule files (default: the SAE dir name)")
    p.add_argument("--hook-point", help="override the SAE's hook point, e.g. layers.12")
    p.add_argument("--topk-mode", choices=TOPK_MODES, help="TopK SAEs: exact or approx")
    p.add_argument(
        "--calibration-activations",
        type=Path,
        help="approx TopK: sample activations (.safetensors/.npy) to fit per-feature thresholds",
    )
    p.add_argument("--out", required=True, type=Path, help="pack file to write")
    p.set_defaults(handler=_guarded(_build))


def _build(args: argparse.Namespace) -> int:
    from monitor.features.pack import save_pack

    if args.selection is not None:
        if args.sae is not None or args.features is not None:
            return fail("--selection replaces --sae/--features: give one or the other")
        from monitor.features.build.selection import build_from_selection, load_selection

        pack = build_from_selection(load_selection(args.selection), args.name)
    elif args.sae is None or args.features is None:
        return fail("give --sae DIR --features 1,2,3, or --selection FILE")
    else:
        pack = _build_from_sae(args)
    digest = save_pack(pack, args.out)
    hook_points = ", ".join(pack.hook_points)
    print(f"wrote {args.out}: pack {pack.name!r}, {pack.feature_count} features at {hook_points}")
    print(f"sha256 {digest}")
    return 0


def _build_from_sae(args: argparse.Namespace) -> Any:
    from monitor.features.build.builder import build_pack_from_sae
    from monitor.features.build.sae import load_sae

    indices = _int_list(args.features, "--features")
    sae = load_sae(args.sae, args.format)
    name = args.name or args.sae.resolve().name
    thresholds = None
    if sae.is_topk:
        thresholds = _topk_thresholds(args, sae, indices)
    pack = build_pack_from_sae(sae, indices, name, args.hook_point, args.topk_mode, thresholds)
    return pack


def _topk_thresholds(args: argparse.Namespace, sae: Any, indices: list[int]) -> Any:
    from monitor.features.build.topk import fit_topk_thresholds, load_activations, topk_disagreement

    if args.topk_mode is None:
        raise ValueError(
            f"{args.sae}: TopK SAE (k={sae.k}): restricted TopK is not exact; pass --topk-mode "
            "exact (keeps the full encoder: exact, full-SAE cost) or approx (sliced, "
            "per-feature thresholds; see `pack calibrate`)"
        )
    if args.topk_mode == "exact":
        note("TopK exact mode: the pack holds the full encoder and costs a full-SAE encode")
        return None
    note("TopK approx mode is not exact: features fire on their own threshold, not the top k")
    if args.calibration_activations is None:
        note("no --calibration-activations: thresholds are 0 (fires more than exact TopK)")
        return None
    x = load_activations(args.calibration_activations, args.hook_point or sae.hook_point)
    thresholds = fit_topk_thresholds(sae, indices, x)
    report = topk_disagreement(sae, indices, x, thresholds)
    note(
        f"approx vs exact on {report.rows} calibration rows: "
        f"{report.disagreement_rate:.2%} of feature values disagree"
    )
    return thresholds


# --- fit ----------------------------------------------------------------------------------


def _add_fit(sub: Any) -> None:
    from monitor.features.build.probes import METHODS, POOLINGS

    p = sub.add_parser("fit", help="fit supervised linear probes from labeled JSONL")
    p.add_argument("--model", required=True, type=Path, help="local transformers model dir")
    p.add_argument("--data", required=True, type=Path, help="JSONL of {text|messages, label}")
    p.add_argument("--layers", required=True, help="decoder layer indices, e.g. 6,12")
    p.add_argument("--method", choices=METHODS, default="logistic")
    p.add_argument("--pooling", choices=POOLINGS, default="mean")
    p.add_argument("--l2", type=float, default=1e-2, help="L2 penalty (logistic)")
    p.add_argument("--name", required=True, help="pack name")
    p.add_argument("--feature-name", default="probe", help="feature name in rule files")
    p.add_argument("--category", default="")
    p.add_argument("--description", default="")
    p.add_argument("--out", required=True, type=Path)
    p.set_defaults(handler=_guarded(_fit))


def _fit(args: argparse.Namespace) -> int:
    from monitor.features.build.probes import fit_probes, load_labeled_jsonl
    from monitor.features.pack import save_pack

    layers = _int_list(args.layers, "--layers")
    examples = load_labeled_jsonl(args.data)
    model, tokenizer = _load_model(args.model)
    pack = fit_probes(
        model,
        tokenizer,
        examples,
        layers,
        name=args.name,
        feature_name=args.feature_name,
        method=args.method,
        pooling=args.pooling,
        l2=args.l2,
        category=args.category,
        description=args.description,
    )
    digest = save_pack(pack, args.out)
    for info in pack.features():
        print(f"{pack.name}/{info.name} at {info.hook_point}: {info.description}")
    print(f"wrote {args.out}: sha256 {digest}")
    return 0


def _load_model(path: Path) -> tuple[Any, Any]:
    if not path.is_dir():
        raise FeatureError("not a directory (expected a local transformers model)", where=path)
    from transformers import AutoModel, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path).eval()
    except (OSError, ValueError, KeyError) as exc:
        raise FeatureError(f"cannot load model ({exc})", where=path) from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


# --- calibrate ----------------------------------------------------------------------------


def _add_calibrate(sub: Any) -> None:
    from monitor.features.build.probes import POOLINGS

    p = sub.add_parser(
        "calibrate", help="set alert thresholds for a false-positive rate; check TopK approx"
    )
    p.add_argument("pack", type=Path)
    p.add_argument("--fpr", type=float, help="target false-positive rate on benign samples")
    p.add_argument("--activations", type=Path, help="benign activations, one row per sample")
    p.add_argument("--model", type=Path, help="model dir, with --data: benign texts")
    p.add_argument("--data", type=Path, help="benign JSONL ({text|messages, label: 0})")
    p.add_argument("--pooling", choices=POOLINGS, default="max", help="over a text's tokens")
    p.add_argument("--topk-sae", type=Path, help="report approx-vs-exact TopK disagreement")
    p.add_argument("--out", type=Path, help="write here (default: update the pack in place)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(handler=_guarded(_calibrate))


def _calibrate(args: argparse.Namespace) -> int:
    from monitor.features.build.probes import calibrate_pack
    from monitor.features.pack import load_pack, save_pack

    pack = load_pack(args.pack)
    report: dict[str, Any] = {"pack": pack.name}
    if args.topk_sae is not None:
        report["topk"] = _topk_report(pack, args)
    if args.fpr is not None:
        scores = _benign_scores(pack, args)
        pack = calibrate_pack(pack, scores, args.fpr)
        out = args.out or args.pack
        report["wrote"] = str(out)
        report["sha256"] = save_pack(pack, out)
        report["thresholds"] = {
            f.name: f.alert_threshold for f in pack.features() if f.alert_threshold is not None
        }
    elif args.topk_sae is None:
        return fail("nothing to do: give --fpr (with benign samples) and/or --topk-sae")
    _print_report(report, args.json)
    return 0


def _benign_scores(pack: Any, args: argparse.Namespace) -> dict[str, Any]:
    from monitor.features.build.probes import (
        load_labeled_jsonl,
        render,
        sample_scores,
        token_activations,
    )
    from monitor.features.build.topk import load_activations

    if args.activations is not None:
        return {
            hp: pack.encode(hp, load_activations(args.activations, hp)) for hp in pack.hook_points
        }
    if args.model is None or args.data is None:
        raise ValueError(
            "--fpr needs benign samples: --activations FILE or --model DIR --data FILE"
        )
    examples = [e for e in load_labeled_jsonl(args.data) if e.label == 0]
    if not examples:
        raise FeatureError("no benign (label 0) examples", where=args.data)
    model, tokenizer = _load_model(args.model)
    texts = [render(e, tokenizer) for e in examples]
    layers = [int(hp.split(".")[1]) for hp in pack.hook_points]
    acts = token_activations(model, tokenizer, texts, layers)
    return {hp: sample_scores(pack, hp, acts[hp], args.pooling) for hp in pack.hook_points}


def _topk_report(pack: Any, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from monitor.features.build.sae import load_sae
    from monitor.features.build.topk import load_activations, topk_disagreement

    if args.activations is None:
        raise ValueError("--topk-sae needs --activations (sample activations)")
    sae = load_sae(args.topk_sae)
    report = {}
    for hp, entry in pack.hook_points.items():
        cols = [f for f in entry.features if f.activation == "topk" and f.sae_index is not None]
        if not cols:
            continue
        thresholds = torch.tensor([f.threshold or 0.0 for f in cols])
        x = load_activations(args.activations, hp)
        result = topk_disagreement(sae, [f.sae_index for f in cols], x, thresholds)
        report[hp] = {
            "rows": result.rows,
            "features": result.features,
            "disagreement_rate": result.disagreement_rate,
            "false_positive_rate": result.false_positive_rate,
            "false_negative_rate": result.false_negative_rate,
        }
    if not report:
        raise FeatureError("no TopK features in this pack", where=args.pack)
    return report


def _print_report(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=2))
        return
    for hp, topk in report.get("topk", {}).items():
        print(
            f"{hp}: TopK approx vs exact on {topk['rows']} rows: "
            f"{topk['disagreement_rate']:.2%} disagree "
            f"(approx-only {topk['false_positive_rate']:.2%}, "
            f"exact-only {topk['false_negative_rate']:.2%})"
        )
    for name, threshold in report.get("thresholds", {}).items():
        print(f"{report['pack']}/{name}: alert threshold {threshold:.6g}")
    if "wrote" in report:
        print(f"wrote {report['wrote']}: sha256 {report['sha256']}")


# --- inspect ------------------------------------------------------------------------------


def _add_inspect(sub: Any) -> None:
    p = sub.add_parser("inspect", help="print what a pack holds")
    p.add_argument("pack", type=Path)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_guarded(_inspect))


def describe_pack(path: Path) -> dict[str, Any]:
    """What ``pack inspect`` prints, as data."""
    import dataclasses

    from monitor.features.encoder import TopKExactEncoder, segments
    from monitor.features.pack import load_pack

    pack = load_pack(path)
    hook_points = {}
    for hp, entry in pack.hook_points.items():
        parts = [
            {
                "kind": "topk_exact" if isinstance(p, TopKExactEncoder) else "sliced",
                "normalization": p.normalization,
                "columns": p.k,
                "weight": f"float32 {list(p.weight.shape)}",
                **({"top_k": p.top_k} if isinstance(p, TopKExactEncoder) else {}),
            }
            for p in segments(entry.encoder)
        ]
        hook_points[hp] = {
            "d_model": entry.encoder.d_in,
            "features": [dataclasses.asdict(f) for f in entry.features],
            "segments": parts,
        }
    sources = sorted({f.source for f in pack.features() if f.source})
    return {
        "name": pack.name,
        "path": str(path),
        "size_bytes": path.stat().st_size,
        "sha256": pack.sha256,
        "feature_count": pack.feature_count,
        "sources": sources,
        "hook_points": hook_points,
    }


def _inspect(args: argparse.Namespace) -> int:
    info = describe_pack(args.pack)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"pack {info['name']!r}: {info['feature_count']} features, {info['size_bytes']:,} bytes")
    print(f"sha256 {info['sha256']}")
    print("sources: " + ", ".join(info["sources"]))
    for hp, entry in info["hook_points"].items():
        print(f"\n{hp} (d_model {entry['d_model']}, input BF16/FP16/FP32, weights FP32)")
        for seg in entry["segments"]:
            extra = f", k={seg['top_k']}" if "top_k" in seg else ""
            print(
                f"  segment {seg['kind']}: {seg['columns']} columns, {seg['weight']}, "
                f"normalization {seg['normalization']}{extra}"
            )
        print(
            f"  {'name':<24} {'activation':<10} {'index':>7} {'threshold':>10} "
            f"{'alert':>10}  category / label"
        )
        for f in entry["features"]:
            print(
                f"  {f['name']:<24} {f['activation']:<10} {_fmt(f['sae_index']):>7} "
                f"{_fmt(f['threshold']):>10} {_fmt(f['alert_threshold']):>10}  "
                f"{f['category']} {f['label']}".rstrip()
            )
    return 0


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
