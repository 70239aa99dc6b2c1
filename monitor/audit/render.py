"""Terminal rendering of audit records: the `audit list` table and the `audit show` view.

`audit show` colours each token's background by how strongly the features behind the
conversation's alerts were active there (ANSI 256 colours, pale yellow to red), puts each alert
inline after the token where it fired, and draws one sparkline per feature.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime

from monitor.audit.store import (
    CORRUPT,
    AlertRecord,
    ConversationRecord,
    ConversationSummary,
    TokenRecord,
)
from monitor.escape import escape_text

# Background colours of the xterm 256-colour cube, weakest to strongest; index 0 is "no colour".
PALETTE = (None, 230, 229, 228, 221, 214, 208, 202, 196)
SPARKS = "▁▂▃▄▅▆▇█"
RESET = "\x1b[0m"
SPARK_WIDTH = 64


def clean(text: str) -> str:
    """Token text, ids and rule output come from clients and models: an escape sequence must
    not drive the reviewer's terminal, a newline must not forge an alert line or a table row,
    and a bidi override or zero-width character must not hide or reorder what is shown."""
    return escape_text(text)


def _fmt_ts(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else CORRUPT


def _fmt_value(value: float | None) -> str:
    return CORRUPT if value is None else f"{value:.3g}"


def render_table(summaries: Sequence[ConversationSummary]) -> str:
    """The `audit list` table of flagged conversations."""
    header = ("CONVERSATION", "MODEL", "ALERTS", "SEVERITY", "RULES", "TOKENS", "ENDED", "UPDATED")
    rows = [
        (
            clean(s.conversation_id),
            clean(s.model),
            str(s.alert_count),
            s.max_severity or "-",
            clean(",".join(s.rules)) or "-",
            str(s.token_count),
            "yes" if s.ended else "no",
            _fmt_ts(s.updated_at),
        )
        for s in summaries
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in [header, *rows]
    ]
    return "\n".join(line.rstrip() for line in lines)


def sparkline(values: Sequence[float | None], width: int = SPARK_WIDTH) -> str:
    """One character per token (or per bucket of tokens, max-pooled, for long conversations)."""
    present = [0.0 if v is None else v for v in values]
    if not present:
        return ""
    size = -(-len(present) // width)  # ceil: bucket size so the line fits in `width`
    pooled = [max(present[i : i + size]) for i in range(0, len(present), size)]
    low, high = min(0.0, *pooled), max(pooled)
    span = high - low
    if span <= 0:
        return SPARKS[0] * len(pooled)
    return "".join(SPARKS[round((v - low) / span * (len(SPARKS) - 1))] for v in pooled)


def rule_features(record: ConversationRecord) -> list[str]:
    """The features behind the alerts, or every recorded feature when alerts name none."""
    names = dict.fromkeys(n for a in record.alerts for n in a.feature_values)
    if not names:
        names = dict.fromkeys(n for t in record.tokens for n in t.features)
    return list(names)


def strengths(tokens: Sequence[TokenRecord], features: Iterable[str]) -> list[float]:
    """Per token, the strongest of `features` relative to that feature's peak (0..1)."""
    features = list(features)
    peaks = {n: max((abs(t.features.get(n) or 0.0) for t in tokens), default=0.0) for n in features}
    out = []
    for t in tokens:
        ratios = [abs(t.features.get(n) or 0.0) / peaks[n] for n in features if peaks[n] > 0.0]
        out.append(min(1.0, max(ratios, default=0.0)))
    return out


def _paint(text: str, strength: float) -> str:
    colour = PALETTE[round(strength * (len(PALETTE) - 1))]
    if colour is None:
        return text
    return f"\x1b[48;5;{colour}m\x1b[38;5;16m{text}{RESET}"


def _alert_line(a: AlertRecord) -> str:
    span = f"{a.start}-{a.end}" if a.start != a.end else str(a.start)
    feats = ", ".join(f"{clean(k)}={_fmt_value(v)}" for k, v in a.feature_values.items())
    line = f"  ▲ [{clean(a.severity)}] {clean(a.rule)} value={_fmt_value(a.value)} tokens {span}"
    line += f" ({feats})" if feats else ""
    return line + f": {clean(a.message)}"


def _header(record: ConversationRecord) -> list[str]:
    s = record.summary
    return [
        f"conversation {clean(s.conversation_id)}   model {clean(s.model)}",
        f"flagged {_fmt_ts(s.first_flagged_at)}   updated {_fmt_ts(s.updated_at)}   "
        f"ended {'yes' if s.ended else 'no'}",
        f"requests {clean(', '.join(record.request_ids)) or '-'}   hook points "
        f"{clean(', '.join(record.hook_points)) or '-'}",
        f"{len(record.tokens)} tokens, {len(record.alerts)} alerts",
        "",
    ]


def _body(record: ConversationRecord, color: bool, features: list[str]) -> list[str]:
    by_position: dict[int, list[AlertRecord]] = {}
    for a in record.alerts:
        by_position.setdefault(a.end, []).append(a)
    strength = strengths(record.tokens, features)
    lines: list[str] = []
    current = ""
    for token, level in zip(record.tokens, strength, strict=True):
        text = CORRUPT if token.text == CORRUPT else clean(token.text or "·")
        current += _paint(text, level) if color else text
        for alert in by_position.pop(token.position, []):
            lines.append(current)
            lines.append(_alert_line(alert))
            current = ""
    if current:
        lines.append(current)
    leftover = [a for alerts in by_position.values() for a in alerts]
    if leftover:
        lines.append("alerts outside the recorded tokens:")
        lines.extend(_alert_line(a) for a in leftover)
    return lines


def _sparklines(record: ConversationRecord, features: list[str]) -> list[str]:
    if not record.tokens or not features:
        return []
    width = max(len(clean(n)) for n in features)
    lines = ["", "features:"]
    for name in features:
        values = [t.features.get(name) for t in record.tokens]
        known = [v for v in values if v is not None]
        peak = f"max {max(known):.3g}" if known else "no values"
        lines.append(f"  {clean(name).ljust(width)}  {sparkline(values)}  {peak}")
    return lines


def render_conversation(record: ConversationRecord, *, color: bool) -> str:
    """The `audit show` view of one conversation: header, alerts, token text (shaded by feature
    strength with `color`) and a sparkline per feature the rules used.
    """
    features = rule_features(record)
    lines = _header(record) + _body(record, color, features) + _sparklines(record, features)
    if color and features:
        legend = "".join(_paint("  ", i / (len(PALETTE) - 1)) for i in range(1, len(PALETTE)))
        lines.append(f"  strength  {legend}  (relative to each feature's peak)")
    return "\n".join(lines)
