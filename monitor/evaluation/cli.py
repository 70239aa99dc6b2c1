"""`safety-monitor eval` and `safety-monitor rules calibrate`.

Bad input (missing files, a malformed data set, rules that do not load) is one line on stderr
and exit code 2, like the other commands.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from monitor.escape import escape_text

EXIT_USAGE = 2


def add_eval_command(commands: Any) -> None:
    """Register ``safety-monitor eval``."""
    p = commands.add_parser(
        "eval",
        help="measure packs and rules on labeled conversations through capture -> sidecar",
        description="Replays labeled conversations through the capture client into a sidecar "
        "on a loopback port and reports per rule conversation-level recall, FPR, precision "
        "and tokens to first alert, and per feature AUROC and recall at fixed FPRs.",
    )
    _model_args(p)
    p.add_argument("--packs", nargs="+", required=True, type=Path, metavar="PACK")
    p.add_argument("--rules", nargs="*", default=[], type=Path, metavar="FILE|DIR")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="labeled conversations (JSONL)")
    source.add_argument("--dataset", help="a shipped set (its --split, default test)")
    p.add_argument(
        "--split",
        default="test",
        help="fit, calibrate or test: of --dataset, or of a --data file whose conversations "
        "name splits (a file that names none is used whole)",
    )
    p.add_argument(
        "--fprs", default="0.01,0.05", help="false-positive rates for the recall columns"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--plot", type=Path, help="write ROC curves (PNG) here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(handler=_guarded(_eval))


def add_rules_calibrate_command(rules_subparsers: Any) -> None:
    """Register ``safety-monitor rules calibrate``."""
    p = rules_subparsers.add_parser(
        "calibrate",
        help="set the rules' named thresholds for a conversation-level false-positive rate",
        description="Replays benign conversations through the real rules engine and writes, "
        "for each number in the rule files' thresholds: sections that enabled rules use, the "
        "value at which new benign conversations from the same source fire at a rate of at "
        "most --fpr (split-conformal rank: n - ceil((n + 1)(1 - fpr)) of the n may fire).",
    )
    _model_args(p)
    p.add_argument("--packs", nargs="+", required=True, type=Path, metavar="PACK")
    p.add_argument("--rules", nargs="+", required=True, type=Path, metavar="FILE|DIR")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--data",
        type=Path,
        help="conversations (JSONL; label 0 used; its calibrate split if it names splits)",
    )
    source.add_argument("--dataset", help="a shipped set's calibrate split (label 0 used)")
    p.add_argument("--fpr", type=float, required=True, help="target conversation-level FPR")
    p.add_argument("--dry-run", action="store_true", help="report, do not write the files")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(handler=_guarded(_calibrate))


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, help="local transformers model dir (default: MiniLM)")
    p.add_argument("--model-name", default="", help="the model name rules' exceptions see")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: 2-4x faster than 2 on this 2-core machine; 0: torch's "
        "default)",
    )


def _guarded(handler: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        from monitor.features.errors import FeatureError
        from monitor.rules import RuleLoadError

        try:
            return handler(args)
        except RuleLoadError as exc:
            return _fail("; ".join(str(issue) for issue in exc.issues))
        except (FeatureError, ValueError, OSError, RuntimeError) as exc:
            return _fail(str(exc))

    return run


def _fail(message: str) -> int:
    print(f"safety-monitor: error: {' '.join(message.splitlines())}", file=sys.stderr)
    return EXIT_USAGE


def _note(message: str) -> None:
    # Notes quote names from files the user was given (rules, packs): escaped, one line.
    print(f"safety-monitor: note: {escape_text(message)}", file=sys.stderr)


def _conversations(args: argparse.Namespace, split: str) -> list[Any]:
    from monitor.features.build.labeled import load_dataset, read_conversations, select_split

    if args.dataset is not None:
        return load_dataset(args.dataset, split=split)
    conversations, note = select_split(read_conversations(args.data), split, args.data)
    if note is not None:
        _note(note)
    return conversations


def _progress(total: int, enabled: bool, what: str) -> Any:
    if not enabled:
        return None, None
    from tqdm import tqdm

    bar = tqdm(total=total, desc=what, unit="conv", file=sys.stderr, leave=False)
    return bar, bar.update


def _eval(args: argparse.Namespace) -> int:
    import torch

    from monitor.evaluation.evaluate import evaluate
    from monitor.evaluation.report import as_json, plot_roc, table
    from monitor.features.build.conversations import load_model
    from monitor.logs import configure_logging

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    fprs = _fprs(args.fprs)
    _note_pooling(args.packs, args.rules)
    conversations = _conversations(args, args.split)
    if not conversations:
        return _fail("no conversations")
    configure_logging("json", "error")  # the embedded sidecar's log lines would mix with ours
    model, tokenizer = load_model(args.model)
    bar, update = _progress(len(conversations), not args.no_progress, "eval")
    try:
        report = evaluate(
            model,
            tokenizer,
            args.packs,
            args.rules,
            conversations,
            model_name=args.model_name,
            fprs=fprs,
            progress=update,
        )
    finally:
        if bar is not None:
            bar.close()
    if args.plot is not None:
        plot_roc(report, args.plot)
    if args.json:
        print(json.dumps(as_json(report), indent=2))
    else:
        print(table(report))
        if args.plot is not None:
            print(f"\nROC curves: {args.plot}")
    return 0


def _note_pooling(pack_paths: list[Path], rule_paths: list[Path]) -> None:
    """Say when a rule pools a probe differently from its pack's recorded aggregation."""
    from monitor.evaluation.engine_replay import pack_features, pooling_notes
    from monitor.features.pack import load_pack
    from monitor.rules import load_rules

    if not rule_paths:
        return
    packs = [load_pack(path) for path in pack_paths]
    for line in pooling_notes(load_rules(rule_paths, pack_features(packs)), packs):
        _note(line)


def _fprs(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"--fprs: expected comma-separated numbers, got {text!r}") from None
    if not values or any(not 0.0 < v < 1.0 for v in values):
        raise ValueError(f"--fprs: each must be in (0, 1), got {text!r}")
    return values


def _calibrate(args: argparse.Namespace) -> int:
    import torch

    from monitor.evaluation.calibrate import calibrate, write_thresholds
    from monitor.evaluation.engine_replay import (
        EngineReplay,
        layers_of,
        pack_features,
        pooling_notes,
    )
    from monitor.features.build.conversations import load_model, replay, text_digest
    from monitor.features.build.token_probes import fit_digests
    from monitor.features.pack import load_pack
    from monitor.rules import load_rules

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    packs = [load_pack(path) for path in args.packs]
    known = pack_features(packs)
    ruleset = load_rules(args.rules, known)  # fail early, before the model runs
    for line in pooling_notes(ruleset, packs):
        _note(line)
    benign = [c for c in _conversations(args, "calibrate") if int(c.label) == 0]
    if not benign:
        return _fail("no benign (label 0) conversations to calibrate on")
    digests = {text_digest(c) for c in benign}
    for pack in packs:
        overlap = fit_digests(pack) & digests
        if overlap:
            _note(
                f"{len(overlap)} of {len(benign)} calibration conversations were in the data "
                f"pack {pack.name!r} was fitted on: thresholds set on them are too low and the "
                "real false-positive rate will be higher than --fpr (use disjoint data)"
            )
    features = ruleset.required_features
    model, tokenizer = load_model(args.model)
    bar, update = _progress(len(benign), not args.json, "replay")
    try:
        tokens = replay(model, tokenizer, benign, layers_of(packs, features), progress=update)
    finally:
        if bar is not None:
            bar.close()
    engine_replay = EngineReplay(tokens, packs, features)
    report = calibrate(engine_replay, args.rules, known, args.fpr)
    written = [] if args.dry_run else write_thresholds(report.thresholds)
    for warning in report.warnings:
        _note(warning)
    if args.json:
        document = {
            "conversations": report.conversations,
            "target_fpr": report.target_fpr,
            "allowed": report.allowed,
            "minimum_conversations": report.minimum_conversations,
            "thresholds": [vars(t) for t in report.thresholds],
            "uncalibrated_rules_fpr": report.uncalibrated,
            "written": written,
        }
        print(json.dumps(document, indent=2))
        return 0
    print(
        f"{report.conversations} benign conversations, target FPR {report.target_fpr:g} on new "
        f"data: at most {report.allowed} may fire (split-conformal rank; the target needs at "
        f"least {report.minimum_conversations}):"
    )
    for t in report.thresholds:
        # The calibration rate, and how high the rate on new conversations from the same
        # source may be (one-sided 95%); under distribution shift neither holds.
        bound = "" if t.fpr_upper_95 is None else f", new data <= {t.fpr_upper_95:.4f} (95%)"
        print(
            f"  {t.name:<24} {t.old:>10.6g} -> {t.new:<10.6g} FPR {t.fpr:.4f}{bound} "
            f"({t.fired} conversations; rules {', '.join(t.rules)}){' ' + t.note if t.note else ''}"
        )
    for rule, fpr in sorted(report.uncalibrated.items()):
        print(f"  rule {rule}: names no threshold, not calibrated (FPR {fpr:.4f})")
    for path in written:
        print(f"wrote {path}")
    if args.dry_run:
        print("dry run: nothing written")
    return 0
