"""Redaction of personal data in token text before anything reaches the audit store.

Kinds: e-mail addresses, payment card numbers (13-19 digits passing the Luhn check), IPv4 and
IPv6 addresses, phone numbers, plus configurable extra regular expressions. Matching errs on
the side of redacting: a false positive costs a reviewer a few characters of context, a false
negative leaks personal data into a store that is kept for months.

Tokens are fragments ("alice", "@", "example", ".com"), so redaction runs over the *joined*
text of several tokens and the result is mapped back onto the tokens: every character inside a
match is removed from its token and the placeholder goes into the token where the match starts.
Token count and positions stay aligned with the per-token feature values.

Normalisation before matching. The built-in kinds are matched on two views of the text, each
mapped back character by character onto the original, so a match always removes the original
characters it came from:
- the *character view*: NFKC (fullwidth and small-form `＠ ﹫`, fullwidth and other-script
  digits, mathematical letters), invisible characters removed (zero-width, bidi controls, soft
  hyphen, combining marks, variation selectors), every Unicode space as a space, every dash as
  `-`, dot and slash look-alikes as `.` and `/`;
- the *decoded view*: the character view plus the obfuscations people and models write:
  percent-encoding and quoted-printable of the characters addresses and numbers are made of
  (`%40`, `=40`, `%2E`), HTML entities (`&#64;`, `&#x40;`, `&commat;`), `[at]`, `(dot)`,
  `{at}`, `<dot>`, and `alice at example dot com` when it ends in a common top-level domain.
Separators between the digits of card and phone numbers: spaces, `. - / _ ,` (with up to two
spaces around them). Extra patterns from the config are matched on the original text only.

Cost: every pattern has bounded repetition, so a scan is linear in the text (no pattern can
backtrack over an unbounded run), and `scanned_chars` counts the characters scanned.
What is not covered is listed in the README (audit trail, redaction).
"""

from __future__ import annotations

import bisect
import hashlib
import html
import ipaddress
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

# Digit separators: one of . - / _ , with up to two spaces around it, or one or two spaces.
_SEP = r"(?:[ \t]{0,2}[./_,-][ \t]{0,2}|[ \t]{1,2})"
_EMAIL = re.compile(
    r"[\w.%+'!#$&*=?^`{|}~/-]{1,64}"  # local part (Unicode letters and digits included)
    r"[ \t]{0,3}@[ \t]{0,3}"  # spaces around @ (also what `[at]` decodes to)
    r"(?:[\w-]{1,63}[ \t]{0,3}\.[ \t]{0,3}){1,8}"  # domain labels
    r"(?:[^\W\d_]{2,63}|xn--[\w-]{1,59})"  # top-level domain: letters, or punycode
)
_EMAIL_LOCAL = re.compile(r"[\w.%+'!#$&*=?^`{|}~/-]")
_CARD = re.compile(rf"(?<!\d)\d(?:{_SEP}?\d){{12,18}}(?!\d)")
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?!\d|\.\d)")
_IPV6 = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{0,4}|\d{1,3}(?:\.\d{1,3}){3})(?![\w:])"
)
# A letter right after the number does not protect it ("(415) 555-2671ext").
_PHONE = re.compile(
    rf"(?<![\d+])(?:\+[ \t]?\d{{1,3}}{_SEP}?)?(?:\([ \t]?\d{{1,4}}[ \t]?\){_SEP}?)?"
    rf"\d{{1,4}}(?:{_SEP}?\d{{1,4}}){{1,5}}(?!\d)"
)
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_GROUPED_NUMBER = re.compile(r"\d{1,3}(?:([.,])\d{3})(?:\1\d{3})*(?:[.,]\d{1,2})?")
_DECIMAL = re.compile(r"\d+\.\d+")

_TLDS = "com|org|net|edu|gov|mil|int|io|co|ai|app|dev|info|biz|me|us|uk|de|fr|nl|es|it|ch|se"
_TLDS += "|no|dk|fi|pl|at|be|ie|pt|ru|cn|jp|kr|in|au|ca|br|mx"
# "alice at example dot com": only when the words end in a common top-level domain, so that
# "look at this dot product" stays text.
_WORD_DOT_CHAIN = rf"(?:[\w-]{{1,63}}[ \t]{{1,3}}dot[ \t]{{1,3}}){{0,6}}(?:{_TLDS})\b"
_WORD_AT = re.compile(
    rf"(?i:[ \t]{{1,3}}at[ \t]{{1,3}}"
    rf"(?=[\w.-]{{1,63}}[ \t]{{1,3}}dot[ \t]{{1,3}}{_WORD_DOT_CHAIN}))"
)
_WORD_DOT = re.compile(rf"(?i:(?<=\w)[ \t]{{1,3}}dot[ \t]{{1,3}}(?={_WORD_DOT_CHAIN}))")
# Obfuscations decoded in the decoded view (each becomes one character).
_DECODE = re.compile(
    r"%[0-9A-Fa-f]{2}"  # percent-encoding
    r"|=[0-9A-F]{2}"  # quoted-printable
    r"|=\r?\n"  # quoted-printable soft line break: nothing
    r"|&#[0-9]{1,7};?|&#[xX][0-9A-Fa-f]{1,6};?|&[A-Za-z][A-Za-z0-9]{1,31};"  # HTML entities
    r"|[ \t]{0,2}[\[({<][ \t]{0,2}(?i:at|dot|period|punkt)[ \t]{0,2}[\])}>][ \t]{0,2}"
)
# Characters an encoded byte may decode to: those addresses and numbers are made of. Decoding
# anything else ("=41" in "tel=4155552671") would only break up matches.
_DECODABLE = frozenset("@.-+_()/:, 0123456789")
_BRACKET_WORDS = {"at": "@", "dot": ".", "period": ".", "punkt": "."}

_DOTS = frozenset("\u2024\u2027\u3002\uff0e\uff61\ufe52\u00b7\u2219\u22c5\u30fb")
_SLASHES = frozenset("\u2215\u2044\u29f8\uff0f")
_DASHES = frozenset("\u2212\u2043\u02d7\ufe63\uff0d\u2796")
_INVISIBLE = frozenset("\u115f\u1160\u3164\uffa0\u034f")
_FOLD_KEEPS = frozenset("@.-+_/:,() ")


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
    return "".join(ch for ch in text if "0" <= ch <= "9")


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
    # 7-15 digits (E.164 allows at most 15). ISO dates, numbers grouped in thousands (1,234,567)
    # and decimals (3.14159265) have the same shape; keep them readable.
    if not 7 <= len(_digits(text)) <= 15:
        return False
    plain = text.strip()
    return not (
        _ISO_DATE.fullmatch(plain) or _GROUPED_NUMBER.fullmatch(plain) or _DECIMAL.fullmatch(plain)
    )


def _always(_text: str) -> bool:
    return True


@dataclass(frozen=True)
class Span:
    """A match in original-text coordinates: [start, end) is replaced by `placeholder`."""

    start: int
    end: int
    placeholder: str


@dataclass(frozen=True)
class _Kind:
    pattern: re.Pattern[str]
    placeholder: str
    valid: Callable[[str], bool]
    needs: str = ""  # a character the normalised text must contain for a match (a fast skip)


# Order is priority: an earlier kind wins where matches overlap (a card number also looks
# like a phone number, an IPv4 address like a dotted phone number).
_BUILTIN = (
    _Kind(_EMAIL, "[EMAIL]", _always, "@"),
    _Kind(_CARD, "[CARD]", _is_card),
    _Kind(_IPV4, "[IP]", _is_ip, "."),
    _Kind(_IPV6, "[IP]", _is_ip, ":"),
    _Kind(_PHONE, "[PHONE]", _is_phone),
)
_NON_ASCII_OR_SPECIAL = re.compile(r"[^\x00-\x7f]")


@lru_cache(maxsize=65536)
def _normalise_char(ch: str) -> str:
    """What one non-ASCII character is matched as (possibly nothing, or several characters)."""
    category = unicodedata.category(ch)
    if category in ("Cf", "Mn", "Me", "Mc") or ch in _INVISIBLE:
        return ""  # zero-width, bidi controls, soft hyphen, combining marks, selectors
    if category in ("Zs", "Zl", "Zp"):
        return " "
    if category == "Pd" or ch in _DASHES:
        return "-"
    if ch in _DOTS:
        return "."
    if ch in _SLASHES:
        return "/"
    digit = unicodedata.decimal(ch, None)
    if digit is not None:
        return str(digit)
    folded = unicodedata.normalize("NFKC", ch)
    # Only a fold into letters, digits and the characters addresses are made of: "Ŀ" folds
    # into "L·", which would split a domain label that the letter itself belongs to.
    if folded == ch or not all(c.isalnum() or c in _FOLD_KEEPS for c in folded):
        return ch
    return "".join(c if c.isascii() else _normalise_char(c) for c in folded)


class _View:
    """Normalised text plus, per normalised character, the original range it came from."""

    __slots__ = ("ends", "starts", "text")

    def __init__(self, original: str, decode: bool) -> None:
        pieces: list[str] = []
        starts: list[int] = []
        ends: list[int] = []
        special = _DECODE_OR_CHAR if decode else _NON_ASCII_OR_SPECIAL
        cursor = 0
        for match in special.finditer(original):
            low, high = match.span()
            if low > cursor:  # unchanged ASCII run: maps one to one
                pieces.append(original[cursor:low])
                starts.extend(range(cursor, low))
                ends.extend(range(cursor + 1, low + 1))
            replacement = _replacement(match.group(), decode)
            pieces.append(replacement)
            starts.extend([low] * len(replacement))
            ends.extend([high] * len(replacement))
            cursor = high
        if cursor < len(original):
            pieces.append(original[cursor:])
            starts.extend(range(cursor, len(original)))
            ends.extend(range(cursor + 1, len(original) + 1))
        self.text = "".join(pieces)
        self.starts = starts
        self.ends = ends

    def original_span(self, low: int, high: int) -> tuple[int, int]:
        return self.starts[low], self.ends[high - 1]


_DECODE_OR_CHAR = re.compile(
    f"{_DECODE.pattern}|{_WORD_AT.pattern}|{_WORD_DOT.pattern}|[^\\x00-\\x7f]"
)


def _replacement(found: str, decode: bool) -> str:
    if len(found) == 1:
        return found if found.isascii() else _normalise_char(found)
    if found[0] == "%" or (found[0] == "=" and len(found) == 3 and found[1] not in "\r\n"):
        char = chr(int(found[1:], 16))
        return char if char in _DECODABLE else _normalise_text(found)
    if found[0] == "=":
        return ""  # soft line break
    if found[0] == "&":
        decoded = html.unescape(found)
        if decoded == found:
            return found
        return "".join(c if c.isascii() else _normalise_char(c) for c in decoded)
    word = found.strip(" \t[](){}<>").lower()
    return _BRACKET_WORDS.get(word, found)


def _normalise_text(text: str) -> str:
    return "".join(c if c.isascii() else _normalise_char(c) for c in text)


class Redactor:
    """Finds personal data in text; `redact_tokens` maps redaction of joined text onto tokens.

    >>> Redactor().redact("mail alice＠example．com or call (415) 555\u20112671ext")
    'mail [EMAIL] or call [PHONE]ext'
    """

    def __init__(self, extra_patterns: Sequence[str] = (), placeholder: str = "[REDACTED]"):
        extra = []
        for source in extra_patterns:
            try:
                compiled = re.compile(source)
            except re.error as exc:
                raise ValueError(f"bad redaction pattern {source!r}: {exc}") from exc
            extra.append(_Kind(compiled, placeholder, _always))
        self._extra = tuple(extra)
        self.scanned_chars = 0  # characters scanned so far (work counter, for bounds tests)

    def spans(self, text: str) -> list[Span]:
        """Non-overlapping matches in `text` (original coordinates) sorted by start; earlier
        kinds win overlaps, and overlapping matches of one kind merge."""
        self.scanned_chars += len(text)
        chosen = _Chosen()
        views = [_View(text, decode=False)]
        if _DECODE_OR_CHAR.search(text) is not None:
            views.insert(0, _View(text, decode=True))
        for kind in _BUILTIN:
            for view in views:
                if kind.needs and kind.needs not in view.text:
                    continue
                for match in kind.pattern.finditer(view.text):
                    if match.end() == match.start() or not kind.valid(match.group()):
                        continue
                    start, end = view.original_span(match.start(), match.end())
                    if kind.placeholder == "[EMAIL]":
                        start = _local_part_start(view.text, match.start(), view, start)
                    chosen.add(Span(start, end, kind.placeholder))
        for kind in self._extra:
            for match in kind.pattern.finditer(text):
                if match.end() > match.start():
                    chosen.add(Span(match.start(), match.end(), kind.placeholder))
        return chosen.spans

    def redact(self, text: str) -> str:
        """`text` with every match replaced by its placeholder."""
        return self.redact_tokens([text])[0]

    def redact_tokens(self, texts: Sequence[str], context: str = "") -> list[str]:
        """Redact `texts` as one joined string, preceded by already-redacted `context`.

        `context` is raw text that came before (already written, redacted, elsewhere): it lets a
        match that started there be recognised so its continuation in `texts` is removed; no
        placeholder is emitted for a match that starts inside the context.
        """
        joined = context + "".join(texts)
        return cut_tokens(joined, self.spans(joined), len(context), [len(t) for t in texts])


def redact_identifier(redactor: Redactor, identifier: str) -> str:
    """An id (conversation, request) with personal data in it, made safe to store and show.

    Ids are keys: two ids that differ only in their personal data must stay two ids, and the
    same id must give the same result in every process and after a restart. So the redacted
    text is followed by `#` and a 12-hex-digit BLAKE2b digest of the original id. The digest is
    not a secret: a short value such as a phone number can be found from it by trying every
    candidate. An id without personal data is kept as it is.

    >>> redact_identifier(Redactor(), "conv:alice@example.com:7")
    'conv:[EMAIL]:7#da996837ffb3'
    """
    spans = redactor.spans(identifier)
    if not spans:
        return identifier
    digest = hashlib.blake2b(identifier.encode("utf-8", "surrogatepass"), digest_size=6)
    return cut_tokens(identifier, spans, 0, [len(identifier)])[0] + "#" + digest.hexdigest()


def cut_tokens(
    joined: str, spans: Sequence[Span], offset: int, lengths: Sequence[int]
) -> list[str]:
    """The tokens of `joined` from `offset` on (of the given lengths), each with the matched
    characters removed and a placeholder in the token where its match starts."""
    out: list[str] = []
    for length in lengths:
        out.append(_cut(joined, spans, offset, offset + length))
        offset += length
    return out


class _Chosen:
    """Non-overlapping spans sorted by start; adding checks only the neighbours (no scan of
    every span so far, which was quadratic in the number of matches)."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self._starts: list[int] = []

    def add(self, span: Span) -> None:
        """Add `span` unless it overlaps a span of another kind (added earlier: it wins);
        spans of the same kind that overlap are merged into one (the two views of the text
        can find the same value with different edges)."""
        i = bisect.bisect_left(self._starts, span.start)
        low = i - 1 if i > 0 and self.spans[i - 1].end > span.start else i
        high = i
        while high < len(self.spans) and self.spans[high].start < span.end:
            high += 1
        overlapping = self.spans[low:high]
        if any(s.placeholder != span.placeholder for s in overlapping):
            return
        if overlapping:
            start = min(span.start, overlapping[0].start)
            end = max(span.end, overlapping[-1].end)
            span = Span(start, end, span.placeholder)
        self.spans[low:high] = [span]
        self._starts[low:high] = [span.start]


def _local_part_start(normalised: str, low: int, view: _View, start: int) -> int:
    """An e-mail's local part longer than the pattern's 64 characters: the whole run goes."""
    while low > 0 and _EMAIL_LOCAL.match(normalised, low - 1):
        low -= 1
    return min(start, view.starts[low]) if low < len(view.starts) else start


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
