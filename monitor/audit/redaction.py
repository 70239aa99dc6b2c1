"""Redaction of personal data in token text before anything reaches the audit store.

Kinds: e-mail addresses, payment card numbers (13-19 digits passing the Luhn check), IPv4 and
IPv6 addresses, phone numbers, plus configurable extra regular expressions. Matching errs on
the side of redacting: a false positive costs a reviewer a few characters of context, a false
negative leaks personal data into a store that is kept for months.

Tokens are fragments ("alice", "@", "example", ".com"), so redaction runs over the *joined*
text of several tokens and the result is mapped back onto the tokens: every character inside a
match is removed from its token and the placeholder goes into the token where the match starts.
Token count and positions stay aligned with the per-token feature values.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
_CARD = re.compile(r"(?<!\d)(?:\d[ -]?){12,18}\d(?!\d)")
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?!\d|\.\d)")
_IPV6 = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{0,4}|\d{1,3}(?:\.\d{1,3}){3})(?![\w:])"
)
_PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{1,4}\)[\s.-]?)?\d{2,4}(?:[\s.-]?\d{2,4}){1,4}(?!\w)"
)
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum every payment card number satisfies (and 9 in 10 random numbers fail)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _digits(text: str) -> str:
    return "".join(ch for ch in text if ch.isdigit())


def _is_card(text: str) -> bool:
    digits = _digits(text)
    return 13 <= len(digits) <= 19 and luhn_valid(digits)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return sum(ch.isalnum() for ch in text) >= 2  # "::" alone is valid but not personal data


def _is_phone(text: str) -> bool:
    # 7-15 digits (E.164 allows at most 15); ISO dates have the same shape, keep them readable.
    return 7 <= len(_digits(text)) <= 15 and not _ISO_DATE.fullmatch(text)


def _always(_text: str) -> bool:
    return True


@dataclass(frozen=True)
class Span:
    """A matched stretch ``[start, end)`` of text and the placeholder that replaces it."""

    start: int
    end: int
    placeholder: str


@dataclass(frozen=True)
class _Kind:
    pattern: re.Pattern[str]
    placeholder: str
    valid: Callable[[str], bool]


# Order is priority: an earlier kind wins where matches overlap (a card number also looks
# like a phone number, an IPv4 address like a dotted phone number).
_BUILTIN = (
    _Kind(_EMAIL, "[EMAIL]", _always),
    _Kind(_CARD, "[CARD]", _is_card),
    _Kind(_IPV4, "[IP]", _is_ip),
    _Kind(_IPV6, "[IP]", _is_ip),
    _Kind(_PHONE, "[PHONE]", _is_phone),
)


class Redactor:
    """Finds personal data in text; `redact_tokens` maps redaction of joined text onto tokens."""

    def __init__(self, extra_patterns: Sequence[str] = (), placeholder: str = "[REDACTED]"):
        kinds = list(_BUILTIN)
        for source in extra_patterns:
            try:
                compiled = re.compile(source)
            except re.error as exc:
                raise ValueError(f"bad redaction pattern {source!r}: {exc}") from exc
            kinds.append(_Kind(compiled, placeholder, _always))
        self._kinds = tuple(kinds)

    def spans(self, text: str) -> list[Span]:
        """Non-overlapping matches sorted by start; earlier kinds win overlaps."""
        chosen: list[Span] = []
        for kind in self._kinds:
            for match in kind.pattern.finditer(text):
                if match.end() == match.start() or not kind.valid(match.group()):
                    continue
                span = Span(match.start(), match.end(), kind.placeholder)
                if not any(s.start < span.end and span.start < s.end for s in chosen):
                    chosen.append(span)
        return sorted(chosen, key=lambda s: s.start)

    def redact(self, text: str) -> str:
        """One text, redacted."""
        return self.redact_tokens([text])[0]

    def redact_tokens(self, texts: Sequence[str], context: str = "") -> list[str]:
        """Redact `texts` as one joined string, preceded by already-redacted `context`.

        `context` is raw text that came before (already written, redacted, elsewhere): it lets a
        match that started there be recognised so its continuation in `texts` is removed; no
        placeholder is emitted for a match that starts inside the context.
        """
        joined = context + "".join(texts)
        spans = self.spans(joined)
        out: list[str] = []
        offset = len(context)
        for text in texts:
            out.append(_cut(joined, spans, offset, offset + len(text)))
            offset += len(text)
        return out


def _cut(joined: str, spans: Sequence[Span], start: int, end: int) -> str:
    """The part [start, end) of `joined` with matched characters replaced by placeholders."""
    pieces: list[str] = []
    cursor = start
    for span in spans:
        if span.end <= start or span.start >= end:
            continue
        low = max(span.start, start)
        pieces.append(joined[cursor:low])
        if span.start >= start:
            pieces.append(span.placeholder)
        cursor = min(span.end, end)
    pieces.append(joined[cursor:end])
    return "".join(pieces)
