"""Escaping of untrusted text for terminals and spreadsheets.

Conversation ids, request ids, models, token text and rule output come from clients and from
model output. Shown raw, they can drive an operator's terminal (ESC and C1 sequences), forge
lines (a newline followed by a fake alert), reorder what is displayed (bidi overrides such as
U+202E) or hide text (zero-width characters). `escape_text` turns every such character into a
visible escape; `csv_cell` also defuses cells a spreadsheet would evaluate as a formula.

No dependencies: the audit CLI, its renderer and the process-wide log set-up all use it.
"""

from __future__ import annotations

from functools import lru_cache

# Invisible characters that are not in the format (Cf) category: fillers that render as blank.
_INVISIBLE = frozenset("\u115f\u1160\u3164\uffa0\u2800")
# A spreadsheet evaluates a cell starting with one of these as a formula (OWASP CSV injection).
_FORMULA_START = frozenset("=+-@\t\r\n\uff1d\uff0b\uff0d\uff20")


@lru_cache(maxsize=4096)
def _escape_char(ch: str) -> str:
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def needs_escape(ch: str) -> bool:
    """Whether `ch` would act on a terminal or be invisible instead of showing as itself:
    the Unicode categories Other (controls, format characters such as bidi overrides and
    zero-width spaces, surrogates, private use, unassigned) and Separator except the space
    (line and paragraph separators, no-break and other wide spaces), plus blank fillers."""
    return ch in _INVISIBLE or not ch.isprintable()


def escape_text(text: str) -> str:
    """`text` with control, bidi, zero-width and other invisible characters as `\\xNN`/`\\uNNNN`.

    >>> escape_text("ok\\n  \\u25b2 [critical] forged\\u202e")
    'ok\\\\x0a  \\u25b2 [critical] forged\\\\u202e'
    """
    if text.isascii() and text.isprintable():
        return text  # the common case, without a per-character pass
    return "".join(_escape_char(ch) if needs_escape(ch) else ch for ch in text)


def csv_cell(value: object) -> str:
    """A CSV cell safe to open in a spreadsheet: escaped, and a leading formula character
    (`= + - @`, tab, CR, or their fullwidth forms) prefixed with `'` so it stays text."""
    text = escape_text("" if value is None else str(value))
    stripped = text.lstrip(" ")
    if stripped and stripped[0] in _FORMULA_START:
        return "'" + text
    return text
