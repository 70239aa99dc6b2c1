"""How `safety-monitor eval` shows its results: a terminal table, JSON, ROC curves as a PNG."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from monitor.evaluation.evaluate import EvalReport


def as_json(report: EvalReport) -> dict[str, Any]:
    """The report as JSON-able data (NaN becomes null; ROC points are left out)."""
    document = dataclasses.asdict(report)
    for feature in document["features"]:
        feature.pop("roc", None)
        feature["at_fpr"] = {
            str(fpr): {"threshold": t, "recall": r, "fpr": f}
            for fpr, (t, r, f) in feature["at_fpr"].items()
        }
        if feature["pack_threshold"] is not None:
            t, r, f = feature["pack_threshold"]
            feature["pack_threshold"] = {"threshold": t, "recall": r, "fpr": f}
    return _no_nan(document)


def _no_nan(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_no_nan(v) for v in value]
    return value


def table(report: EvalReport) -> str:
    """The terminal table: one line per rule, one per feature."""
    lines = [
        f"{report.conversations} conversations ({report.positives} positive, "
        f"{report.negatives} negative) through capture -> sidecar -> rules in "
        f"{report.seconds:.1f} s",
        "",
        f"{'rule':<30} {'recall':>7} {'FPR':>7} {'precision':>9} {'TP':>5} {'FP':>5} "
        f"{'tokens to 1st alert (median / p90)':>36}",
    ]
    for r in report.rules:
        lines.append(
            f"{_clip(r.rule, 30):<30} {_f(r.recall):>7} {_f(r.fpr):>7} {_f(r.precision):>9} "
            f"{r.true_positives:>5} {r.false_positives:>5} "
            f"{_f(r.tokens_to_first_alert_median, 0):>27} / {_f(r.tokens_to_first_alert_p90, 0)}"
        )
    if not report.rules:
        lines.append("(no rules loaded)")
    fprs = sorted({fpr for f in report.features for fpr in f.at_fpr})
    # The aggregation names the served pooling (`max_rolling_mean:4096,roles,turn_end`, the
    # longest, is 36 characters): clipping it would hide what the rule must do to serve it.
    header = f"{'feature':<30} {'aggregation':<36} {'AUROC':>6}"
    header += "".join(f" {'recall@' + _pct(fpr):>12}" for fpr in fprs)
    header += f" {'at pack threshold (recall / FPR)':>34}"
    lines += ["", header]
    for f in report.features:
        row = f"{_clip(f.feature, 30):<30} {_clip(f.aggregation, 36):<36} {_f(f.auroc):>6}"
        row += "".join(f" {_f(f.at_fpr[fpr][1]) if fpr in f.at_fpr else '-':>12}" for fpr in fprs)
        if f.pack_threshold is not None:
            _, recall, fpr = f.pack_threshold
            row += f" {_f(recall) + ' / ' + _f(fpr):>34}"
        else:
            row += f" {'-':>34}"
        lines.append(row)
    return "\n".join(lines)


def _clip(text: str, width: int) -> str:
    # Names come from files the user gave: printable, and never wider than the column.
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return text if len(text) <= width else text[: width - 1] + "~"


def _f(value: float, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _pct(fpr: float) -> str:
    return f"{fpr * 100:g}%FPR"


def plot_roc(report: EvalReport, path: Path) -> Path:
    """ROC curves of every feature's pooled score, with the rules' and the packs'
    operating points marked."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'safety-monitor[eval]'") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figure, (full, zoom) = plt.subplots(1, 2, figsize=(12, 5.5))
    for axis, limit in ((full, 1.0), (zoom, 0.1)):
        for feature in report.features:
            fprs, tprs = feature.roc
            (line,) = axis.plot(
                fprs, tprs, label=f"{feature.feature} (AUROC {feature.auroc:.3f})", lw=1.5
            )
            if feature.pack_threshold is not None:
                _, recall, fpr = feature.pack_threshold
                axis.plot([fpr], [recall], "o", color=line.get_color(), ms=7)
        for rule in report.rules:
            if not math.isnan(rule.fpr) and not math.isnan(rule.recall):
                axis.plot([rule.fpr], [rule.recall], "k^", ms=7)
                axis.annotate(
                    rule.rule, (rule.fpr, rule.recall), fontsize=7, xytext=(4, -10),
                    textcoords="offset points",
                )  # fmt: skip
        axis.set_xlim(0, limit)
        axis.set_ylim(0, 1.01)
        axis.set_xlabel("false-positive rate (conversations)")
        axis.set_ylabel("recall")
        axis.grid(alpha=0.3)
    full.plot([0, 1], [0, 1], ":", color="grey")
    full.set_title("ROC of pooled feature scores (o: pack threshold, ^: rules)")
    zoom.set_title("the same, FPR up to 10%")
    full.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
