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
    """Register build, fit, calibrate, inspect and search under ``safety-monitor pack``."""
    _add_build(pack_subparsers)
    _add_fit(pack_subparsers)
    _add_calibrate(pack_subparsers)
    _add_inspect(pack_subparsers)
    _add_search(pack_subparsers)


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
    p.add_argument(
        "--explanations",
        nargs="+",
        type=Path,
        metavar="EXPORT",
        help="Neuronpedia explanation exports (batch-N.jsonl.gz files or their directory): "
        "record each feature's descriptions and Neuronpedia id in the pack",
    )
    p.add_argument(
        "--neuronpedia-source",
        metavar="MODEL/SOURCE",
        help="which of the export's sources the SAE is, e.g. gemma-2-2b/12-gemmascope-res-16k",
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
    if args.explanations:
        pack = _with_explanations(pack, args)
    digest = save_pack(pack, args.out)
    hook_points = ", ".join(pack.hook_points)
    print(f"wrote {args.out}: pack {pack.name!r}, {pack.feature_count} features at {hook_points}")
    print(f"sha256 {digest}")
    return 0


def _with_explanations(pack: Any, args: argparse.Namespace) -> Any:
    """The pack with each SAE feature's export descriptions and Neuronpedia id recorded."""
    import dataclasses

    from monitor.features.build.neuronpedia import describe, read_explanations

    sae_features = [f for f in pack.features() if f.sae_index is not None]
    found = describe(
        read_explanations(args.explanations),
        [f.sae_index for f in sae_features],
        args.neuronpedia_source,
    )
    updated = {}
    for info in sae_features:
        entry = found.get(info.sae_index)
        if entry is None:
            note(f"feature {info.name} (index {info.sae_index}) has no explanation in the export")
            continue
        updated[info.name] = dataclasses.replace(
            info,
            description=" | ".join(dict.fromkeys(entry.descriptions)),
            neuronpedia_id=info.neuronpedia_id or entry.neuronpedia_id,
            label=info.label or entry.descriptions[0][:80],
        )
    return pack.with_features(updated)


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

    p = sub.add_parser(
        "fit",
        help="fit per-token probes on labeled conversations, with held-out metrics",
        description="Fits a logistic probe on the per-token activations of the labeled roles' "
        "tokens (what the sidecar serves), chooses the rolling-mean window on the held-out "
        "split, sets the alert threshold there for --fpr and records both in the pack.",
    )
    p.add_argument("--model", type=Path, help="local transformers model dir (default: MiniLM)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="labeled conversations (JSONL)")
    source.add_argument(
        "--dataset",
        help="shipped sets: misuse, deception or bias; several (misuse,deception,bias) fit "
        "one feature each into one pack",
    )
    p.add_argument("--layers", required=True, help="layer indices, e.g. 3 or 2,3,4")
    p.add_argument(
        "--window",
        default="auto",
        help="rolling-mean window of the aggregation (max of rolling means), or auto: "
        "the best held-out AUROC among 1,4,8,16,32 and, trained through, a role-masked "
        "whole-turn mean (the labeled role's last 512 tokens, for: 4|8|16|32 tokens guard; "
        "served with window_roles) and the turn mean (that mean at each labeled turn's last "
        "token: mean pooling, served with at: turn_end)",
    )
    p.add_argument("--fpr", type=float, default=0.01, help="alert threshold's held-out FPR")
    p.add_argument(
        "--pooling",
        choices=POOLINGS,
        help="legacy: fit on one pooled vector per text instead of per token (not what the "
        "sidecar serves)",
    )
    p.add_argument("--method", choices=METHODS, default="logistic", help="with --pooling")
    p.add_argument("--l2", type=float, default=1e-2, help="L2 penalty (logistic)")
    p.add_argument(
        "--no-train-aggregation",
        dest="train_aggregation",
        action="store_false",
        help="keep the per-token fit instead of training the probe through the rule's "
        "max-of-rolling-means pooling (the default)",
    )
    p.add_argument("--name", default="probes", help="pack name (rules say <name>/<feature>)")
    p.add_argument(
        "--feature-name",
        help="feature name in rule files (default: the --dataset name, else probe); with "
        "several layers the best held-out layer gets this name, the others <name>.layers.<i>",
    )
    p.add_argument("--category", default="")
    p.add_argument("--description", default="")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: 5x faster than 2 on this 2-core machine; 0: torch's "
        "default)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--out", required=True, type=Path)
    p.set_defaults(handler=_guarded(_fit))


def _fit(args: argparse.Namespace) -> int:
    import torch

    from monitor.features.build.labeled import fit_and_heldout, load_dataset, read_conversations
    from monitor.features.pack import save_pack

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    layers = _int_list(args.layers, "--layers")
    if not layers:
        return fail("--layers: give at least one layer index")
    if args.dataset is not None and "," in args.dataset:
        return _fit_datasets(args, layers)
    if args.dataset is not None:
        conversations = load_dataset(args.dataset)
        data_name = f"dataset:{args.dataset}"
    else:
        conversations = read_conversations(args.data)
        data_name = f"file:{args.data.name}"
    feature_name = args.feature_name or args.dataset or "probe"
    model, tokenizer = _load_model(args.model)
    if args.pooling is not None:
        return _fit_pooled(args, conversations, model, tokenizer, layers, feature_name)
    fit, heldout = fit_and_heldout(conversations)
    windows = _windows(args.window)
    from monitor.features.build.token_probes import fit_token_probe_pack

    pack, report = fit_token_probe_pack(
        model,
        tokenizer,
        fit,
        heldout,
        layers,
        name=args.name,
        feature_name=feature_name,
        fpr=args.fpr,
        windows=windows,
        guards=_guards(args.window),
        turn_mean=args.window == "auto",
        l2=args.l2,
        train_aggregation=args.train_aggregation,
        category=args.category,
        description=args.description,
        data_name=data_name,
    )
    digest = save_pack(pack, args.out)
    _print_fit(_fit_rows(pack, report), report, args, digest)
    return 0


def _fit_datasets(args: argparse.Namespace, layers: list[int]) -> int:
    """One pack, one feature per shipped set (named after it): the default packs."""
    from monitor.features.build.labeled import fit_and_heldout, load_dataset
    from monitor.features.build.token_probes import FitReport, fit_token_probe_pack
    from monitor.features.pack import FeaturePack, save_pack

    if args.feature_name or args.pooling:
        raise ValueError("several --dataset names: each feature is named after its set")
    model, tokenizer = _load_model(args.model)
    entries, provenance, rows = [], {}, []
    seconds, fitted, held = 0.0, 0, 0
    for name in [n.strip() for n in args.dataset.split(",") if n.strip()]:
        fit, heldout = fit_and_heldout(load_dataset(name))
        pack, report = fit_token_probe_pack(
            model, tokenizer, fit, heldout, layers, name=args.name, feature_name=name,
            fpr=args.fpr, windows=_windows(args.window), l2=args.l2, category=name,
            guards=_guards(args.window),
            turn_mean=args.window == "auto",
            train_aggregation=args.train_aggregation,
            data_name=f"dataset:{name}",
        )  # fmt: skip
        entries.extend(pack.hook_points.values())
        provenance[name] = pack.provenance
        rows.extend(_fit_rows(pack, report))
        seconds += report.fit_seconds
        fitted += report.fit_conversations
        held += report.heldout_conversations
    from monitor.features.build.builder import assemble_pack

    merged: FeaturePack = assemble_pack(args.name, entries)
    # Overlap checks read every set's fit digests.
    digests = sorted({d for p in provenance.values() for d in p["fit"]["digests"]})
    merged.provenance = {"fit": {"digests": digests}, "datasets": {
        name: {k: v for k, v in p.items() if k != "fit"} | {
            "fit": {k: v for k, v in p["fit"].items() if k != "digests"}
        }
        for name, p in provenance.items()
    }}  # fmt: skip
    digest = save_pack(merged, args.out)
    _print_fit(rows, FitReport([], "", fitted, held, seconds), args, digest)
    return 0


def _guards(text: str) -> tuple[int, ...]:
    """The whole-turn candidates' guards: only when the window is chosen (``auto``)."""
    from monitor.features.build.token_probes import GUARDS

    return GUARDS if text == "auto" else ()


def _windows(text: str) -> tuple[int, ...]:
    from monitor.features.build.token_probes import WINDOWS

    if text == "auto":
        return WINDOWS
    windows = tuple(_int_list(text, "--window"))
    if not windows or any(not 1 <= w <= 4096 for w in windows):
        raise ValueError(f"--window: expected auto or integers in 1..4096, got {text!r}")
    return windows


def _fit_rows(pack: Any, report: Any) -> list[dict[str, Any]]:
    """One row per feature of a pack fitted from one data set (one feature per layer)."""
    return [
        {
            "feature": f"{pack.name}/{info.name}",
            "hook_point": info.hook_point,
            "aggregation": info.aggregation,
            "alert_threshold": info.alert_threshold,
            **result.heldout,
        }
        for result in report.layers
        for info in pack.hook_points[result.hook_point].features
    ]


def _print_fit(
    rows: list[dict[str, Any]], report: Any, args: argparse.Namespace, digest: str
) -> None:
    if args.json:
        document = {
            "pack": str(args.out),
            "sha256": digest,
            "fit_conversations": report.fit_conversations,
            "heldout_conversations": report.heldout_conversations,
            "fit_seconds": round(report.fit_seconds, 2),
            "features": rows,
        }
        print(json.dumps(document, indent=2))
        return
    print(
        f"fitted on {report.fit_conversations} conversations in {report.fit_seconds:.1f} s; "
        f"held-out ({report.heldout_conversations} conversations, the calibrate split; "
        f"it also chose the window and threshold):"
    )
    print(
        f"  {'feature':<28} {'aggregation':<20} {'AUROC':>6} {'recall':>7} {'FPR':>6} "
        f"{'FPR<=95%':>8} threshold"
    )
    for row in rows:
        # FPR<=95%: one-sided 95% upper bound of the rate on new data from the same source.
        upper = row.get("fpr_upper_95")
        print(
            f"  {row['feature']:<28} {row['aggregation']:<20} {row['auroc']:>6.3f} "
            f"{row['recall']:>7.3f} {row['fpr']:>6.3f} "
            f"{'-' if upper is None else f'{upper:.3f}':>8} {row['alert_threshold']:.4g}"
        )
    for row in rows:
        if row.get("threshold_at_max_negative"):
            note(
                f"{row['feature']}: {row['negatives']:.0f} held-out negatives cannot resolve "
                f"FPR {args.fpr:g}; its threshold is their highest score (0 of them above it)"
            )
    print(f"wrote {args.out}: sha256 {digest}")


def _fit_pooled(
    args: argparse.Namespace,
    conversations: list[Any],
    model: Any,
    tokenizer: Any,
    layers: list[int],
    feature_name: str,
) -> int:
    """The older text-level fit: one pooled vector per conversation's labeled text."""
    from monitor.features.build.labeled import fit_and_heldout
    from monitor.features.build.probes import LabeledExample, fit_probes
    from monitor.features.build.token_probes import labeled_roles
    from monitor.features.pack import save_pack

    note(
        f"--pooling {args.pooling}: fitted on one pooled vector per text; the sidecar serves a "
        "value per token, so served recall can be far lower (omit --pooling to fit per token)"
    )
    fit, _ = fit_and_heldout(conversations)
    examples = [
        LabeledExample(
            "\n\n".join(t.text for t in c.turns if t.role in c.labeled_roles), None, c.label
        )
        for c in fit
    ]
    pack = fit_probes(
        model,
        tokenizer,
        examples,
        layers,
        name=args.name,
        feature_name=feature_name,
        method=args.method,
        pooling=args.pooling,
        l2=args.l2,
        category=args.category,
        description=args.description,
        labeled_roles=labeled_roles(fit),
    )
    digest = save_pack(pack, args.out)
    for info in pack.features():
        print(f"{pack.name}/{info.name} at {info.hook_point}: {info.description}")
    print(f"wrote {args.out}: sha256 {digest}")
    return 0


def _load_model(path: Path | None) -> tuple[Any, Any]:
    from monitor.features.build.conversations import load_model

    return load_model(path)


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
    p.add_argument(
        "--data",
        type=Path,
        help="benign conversations (JSONL; label 0 used; its calibrate split if it names splits)",
    )
    p.add_argument("--dataset", help="a shipped set's calibrate split (its label-0 items)")
    p.add_argument(
        "--pooling",
        choices=POOLINGS,
        help="over a conversation's tokens (default: each feature's recorded aggregation, "
        "else max: what a per-token rule sees)",
    )
    p.add_argument("--topk-sae", type=Path, help="report approx-vs-exact TopK disagreement")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--out", type=Path, help="write here (default: update the pack in place)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(handler=_guarded(_calibrate))


def _calibrate(args: argparse.Namespace) -> int:
    import torch

    from monitor.features.build.probes import calibrate_pack
    from monitor.features.pack import load_pack, save_pack

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    pack = load_pack(args.pack)
    report: dict[str, Any] = {"pack": pack.name}
    if args.topk_sae is not None:
        report["topk"] = _topk_report(pack, args)
    if args.fpr is not None:
        scores, pooling = _benign_scores(pack, args)
        pack = calibrate_pack(pack, scores, args.fpr, pooling)
        out = args.out or args.pack
        report["wrote"] = str(out)
        report["sha256"] = save_pack(pack, out)
        report["thresholds"] = {
            f.name: f.alert_threshold for f in pack.features() if f.alert_threshold is not None
        }
        report["pooling"] = pooling
        report["calibration"] = _calibration_rates(pack, scores, args.fpr)
    elif args.topk_sae is None:
        return fail("nothing to do: give --fpr (with benign samples) and/or --topk-sae")
    _print_report(report, args.json)
    return 0


def _calibration_rates(pack: Any, scores: dict[str, Any], fpr: float) -> dict[str, Any]:
    """Per feature: how many benign samples fire at its new threshold, that rate, the
    one-sided 95% upper bound of the rate on new data from the same source, and the fewest
    samples ``fpr`` needs (`monitor.conformal`)."""
    from monitor.conformal import fpr_upper_bound, minimum_negatives

    rates = {}
    for hp, values in scores.items():
        n = int(values.shape[0])
        for column, info in enumerate(pack.hook_points[hp].features):
            fired = int((values[:, column] > info.alert_threshold).sum())
            rates[info.name] = {
                "samples": n,
                "fired": fired,
                "rate": fired / n,
                "upper_95": fpr_upper_bound(fired, n),
                "minimum_samples": minimum_negatives(fpr),
            }
    return rates


def _benign_scores(pack: Any, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, str]]:
    """Benign scores ``[n, k]`` per hook point, and the pooling used for each feature."""
    import torch

    from monitor.features.build.conversations import replay, text_digest
    from monitor.features.build.labeled import load_dataset, read_conversations, select_split
    from monitor.features.build.scoring import conversation_score
    from monitor.features.build.token_probes import fit_digests
    from monitor.features.build.topk import load_activations

    if args.activations is not None:
        # Rows are samples already: no pooling applies.
        scores = {
            hp: pack.encode(hp, load_activations(args.activations, hp)) for hp in pack.hook_points
        }
        return scores, {f.name: "row" for f in pack.features()}
    if args.dataset is not None:
        conversations = load_dataset(args.dataset, split="calibrate")
        where = f"dataset {args.dataset} (calibrate split)"
    elif args.model is not None or args.data is not None:
        if args.data is None:
            raise ValueError("--model needs --data FILE (or use --dataset NAME)")
        conversations, chosen = select_split(read_conversations(args.data), "calibrate", args.data)
        if chosen is not None:
            from monitor.escape import escape_text

            note(escape_text(chosen))  # it names the user's file
        where = str(args.data)
    else:
        raise ValueError(
            "--fpr needs benign samples: --activations FILE, --data FILE or --dataset NAME"
        )
    benign = [c for c in conversations if c.label == 0]
    if not benign:
        raise FeatureError("no benign (label 0) conversations", where=where)
    overlap = fit_digests(pack) & {text_digest(c) for c in benign}
    if overlap:
        note(
            f"{len(overlap)} of {len(benign)} calibration conversations were in the data the "
            "probes were fitted on: the threshold will be too low and the real false-positive "
            "rate higher than --fpr (calibrate on data disjoint from the fit data)"
        )
    model, tokenizer = _load_model(args.model)
    layers = [int(hp.split(".")[1]) for hp in pack.hook_points]
    tokens = replay(model, tokenizer, benign, layers)
    pooling = {f.name: args.pooling or f.aggregation or "max" for f in pack.features()}
    scores = {}
    for hp, entry in pack.hook_points.items():
        columns = []
        for column, info in enumerate(entry.features):
            values = [pack.encode(hp, t.activations[hp])[:, column] for t in tokens]
            columns.append(
                [
                    conversation_score(
                        v, t.labeled, _as_aggregation(pooling[info.name]), t.turn_ends
                    )
                    for v, t in zip(values, tokens, strict=True)
                ]
            )
        scores[hp] = torch.tensor(columns, dtype=torch.float64).T.float()
    return scores, pooling


def _as_aggregation(pooling: str) -> str:
    if pooling == "last":
        raise ValueError("--pooling last cannot be served by a rule; use max or mean")
    return pooling


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
        pooling = report.get("pooling", {}).get(name, "")
        rate = report.get("calibration", {}).get(name)
        print(
            f"{report['pack']}/{name}: alert threshold {threshold:.6g}"
            + (f" ({pooling} pooling)" if pooling else "")
            + (
                f"; calibration FPR {rate['rate']:.4f} ({rate['fired']} of {rate['samples']}), "
                f"new data from the same source <= {rate['upper_95']:.4f} (95%, one-sided); "
                f"the target needs >= {rate['minimum_samples']} samples"
                if rate
                else ""
            )
        )
    if "wrote" in report:
        print(f"wrote {report['wrote']}: sha256 {report['sha256']}")


# --- search -------------------------------------------------------------------------------


def _add_search(sub: Any) -> None:
    p = sub.add_parser(
        "search",
        help="find SAE features by meaning in Neuronpedia explanation exports",
        description="Lists the features whose export descriptions contain every word of QUERY "
        "(prefix match, case-insensitive). Exports: Neuronpedia's public "
        "<model>/<source>/explanations/batch-N.jsonl.gz files, downloaded beforehand.",
    )
    p.add_argument("query", help="words the description must contain, e.g. 'deception lie'")
    p.add_argument("--explanations", nargs="+", required=True, type=Path, metavar="EXPORT")
    p.add_argument("--model", help="only this modelId, e.g. gemma-2-2b")
    p.add_argument("--source", help="only this source (layer), e.g. 12-gemmascope-res-16k")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_guarded(_search))


def _search(args: argparse.Namespace) -> int:
    from monitor.features.build.neuronpedia import read_explanations, search

    features = read_explanations(args.explanations)
    hits = search(
        features.values(), args.query, model=args.model, source=args.source, limit=args.limit
    )
    if args.json:
        rows = [
            {
                "neuronpedia_id": h.neuronpedia_id,
                "model": h.model,
                "source": h.source,
                "index": h.index,
                "descriptions": h.descriptions,
            }
            for h in hits
        ]
        print(json.dumps(rows, indent=2))
        return 0
    if not hits:
        print(f"no feature description contains every word of {args.query!r}")
        return 0
    for h in hits:
        print(f"{h.neuronpedia_id:<40} {' | '.join(dict.fromkeys(h.descriptions))}")
    print(
        f"{len(hits)} feature(s); build a pack with them: pack build --sae DIR --features "
        f"{','.join(str(h.index) for h in hits[:5])} --explanations ... --out ..."
    )
    return 0


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
