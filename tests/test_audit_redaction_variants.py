"""Redaction of the variants people, models and attackers write (issue 14, findings 1 and 2).

A table of formats (each must lose every character of its value), formats that must stay
readable, hypothesis properties over generated values, obfuscations and token splits, ids and
the model name, and the cost bounds of redaction measured by counting the characters scanned.
"""

from __future__ import annotations

import itertools
import re
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monitor.audit.recorder import (
    MAX_HELD_CHARS,
    AuditFiring,
    AuditRecorder,
    AuditSlice,
    AuditStep,
    RecorderConfig,
)
from monitor.audit.redaction import Redactor, luhn_valid, redact_identifier
from monitor.audit.store import open_store

ZW = "\u200b"
# (text as written, placeholder expected where the value was).
FORMATS = [
    # e-mail: plain, internationalised, confusable and fullwidth, spaces and invisibles at @
    ("alice@example.com", "[EMAIL]"),
    ("alice.smith+tag@mail.example.co.uk", "[EMAIL]"),
    ("josé.garcía@exämple.es", "[EMAIL]"),
    ("почта@пример.рф", "[EMAIL]"),
    ("用户@例子.中国", "[EMAIL]"),
    ("user@xn--bcher-kva.example", "[EMAIL]"),
    ("ａｌｉｃｅ＠ｅｘａｍｐｌｅ．ｃｏｍ", "[EMAIL]"),
    ("alice＠example.com", "[EMAIL]"),
    ("alice﹫example.com", "[EMAIL]"),
    ("alice @ example.com", "[EMAIL]"),
    ("alice\u00a0@\u00a0example.com", "[EMAIL]"),
    (f"alice{ZW}@{ZW}example.com", "[EMAIL]"),
    ("al\u200dice@exa\u2060mple.com", "[EMAIL]"),
    ("alice@example\u3002com", "[EMAIL]"),
    ("\U0001d41a\U0001d425\U0001d422\U0001d41c\U0001d41e@example.com", "[EMAIL]"),
    ("аlicе@ехаmple.com", "[EMAIL]"),  # Cyrillic а, е, х
    ("ALICE@EXAMPLE.COM", "[EMAIL]"),
    ("x" * 90 + "@example.com", "[EMAIL]"),  # local part longer than 64
    # e-mail: obfuscations
    ("alice[at]example[dot]com", "[EMAIL]"),
    ("alice [at] example [dot] com", "[EMAIL]"),
    ("alice(at)example(dot)com", "[EMAIL]"),
    ("alice {at} example {dot} com", "[EMAIL]"),
    ("alice <at> example <dot> com", "[EMAIL]"),
    ("alice[AT]example[DOT]com", "[EMAIL]"),
    ("alice at example dot com", "[EMAIL]"),
    ("alice AT example DOT co DOT uk", "[EMAIL]"),
    ("alice%40example.com", "[EMAIL]"),
    ("alice%40example%2Ecom", "[EMAIL]"),
    ("alice&#64;example.com", "[EMAIL]"),
    ("alice&#x40;example&#x2e;com", "[EMAIL]"),
    ("alice&commat;example&period;com", "[EMAIL]"),
    ("alice=40example.com", "[EMAIL]"),
    ("alice=\n@example.com", "[EMAIL]"),  # quoted-printable soft line break
    # card numbers: separators
    ("4111111111111111", "[CARD]"),
    ("4111 1111 1111 1111", "[CARD]"),
    ("4111-1111-1111-1111", "[CARD]"),
    ("4111.1111.1111.1111", "[CARD]"),
    ("4111/1111/1111/1111", "[CARD]"),
    ("4111_1111_1111_1111", "[CARD]"),
    ("4111,1111,1111,1111", "[CARD]"),
    ("4111 - 1111 - 1111 - 1111", "[CARD]"),
    ("4111\u20131111\u20141111\u20121111", "[CARD]"),  # en, em, figure dash
    ("4111\u22121111\u22121111\u22121111", "[CARD]"),  # minus sign
    ("4111\u00a01111\u20091111\u30001111", "[CARD]"),  # no-break, thin, ideographic space
    (f"4111{ZW}1111{ZW}1111{ZW}1111", "[CARD]"),
    ("4111\u00ad1111\u00ad1111\u00ad1111", "[CARD]"),  # soft hyphen
    ("４１１１ １１１１ １１１１ １１１１", "[CARD]"),  # fullwidth digits
    ("٤١١١ ١١١١ ١١١١ ١١١١", "[CARD]"),  # Arabic-Indic digits
    ("5555 5555 5555 4444", "[CARD]"),
    ("3782 822463 10005", "[CARD]"),  # Amex grouping
    ("4111%201111%201111%201111", "[CARD]"),
    ("4111&#32;1111&#32;1111&#32;1111", "[CARD]"),
    # phone numbers: separators, followed by letters
    ("+1 415 555 2671", "[PHONE]"),
    ("(415) 555-2671", "[PHONE]"),
    ("415.555.2671", "[PHONE]"),
    ("415/555/2671", "[PHONE]"),
    ("415_555_2671", "[PHONE]"),
    ("415 - 555 - 2671", "[PHONE]"),
    ("415\u2013555\u20132671", "[PHONE]"),
    ("415\u00b7555\u00b72671", "[PHONE]"),  # middle dot
    (f"415{ZW}555{ZW}2671", "[PHONE]"),
    ("+44 (0)20 7946 0958", "[PHONE]"),
    ("+49-30-901820", "[PHONE]"),
    ("＋１ ４１５ ５５５ ２６７１", "[PHONE]"),
    ("%2B1%20415%20555%202671", "[PHONE]"),
    ("+1&#32;415&#32;555&#32;2671", "[PHONE]"),
    ("+1=20415=20555=202671", "[PHONE]"),
    # IP addresses
    ("192.168.1.20", "[IP]"),
    ("2001:db8::8a2e:370:7334", "[IP]"),
    ("１９２．１６８．１．２０", "[IP]"),
]
FOLLOWED_BY_LETTERS = [
    ("(415) 555-2671ext", "[PHONE]ext"),
    ("415-555-2671abc", "[PHONE]abc"),
    ("+1 415 555 2671x12", "[PHONE]x12"),
    ("call 4155552671now", "call [PHONE]now"),
]
KEPT = [
    "at 12:30:45 on 2024-01-01 in 2024",
    "tokens 120-135 scored 2.84",
    "version 1.2.3",
    "1,234,567 people and 2.500.000 euros",
    "pi is 3.14159265",
    "look at this dot product",
    "a = b + c; x = 40",
    "see section 4.2 and page 17",
    "4111111111111112",  # fails the Luhn check
    "the @ sign and a.b.c",
    "&amp; &lt; %zz =ZZ",
]


@pytest.fixture(scope="module")
def redactor() -> Redactor:
    return Redactor()


def test_table_has_at_least_60_formats() -> None:
    assert len(FORMATS) + len(FOLLOWED_BY_LETTERS) >= 60


@pytest.mark.parametrize(("value", "placeholder"), FORMATS, ids=range(len(FORMATS)))
def test_every_format_is_redacted_whole(redactor: Redactor, value: str, placeholder: str) -> None:
    assert redactor.redact(f"write to {value} today") == f"write to {placeholder} today"


@pytest.mark.parametrize(("text", "expected"), FOLLOWED_BY_LETTERS)
def test_a_phone_number_followed_by_letters_loses_all_its_digits(
    redactor: Redactor, text: str, expected: str
) -> None:
    assert redactor.redact(text) == expected


@pytest.mark.parametrize("text", KEPT)
def test_text_that_is_not_personal_data_is_kept(redactor: Redactor, text: str) -> None:
    assert redactor.redact(text) == text


# --- properties -------------------------------------------------------------------------------
LETTERS = st.characters(whitelist_categories=("Ll", "Lu", "Lo"), max_codepoint=0x9FFF)
LABEL = st.text(LETTERS, min_size=3, max_size=12)
AT_FORMS = ["@", "＠", "﹫", " @ ", "[at]", " (at) ", "%40", "&#64;", "&commat;", "=40", f"{ZW}@"]
DOT_FORMS = [".", "．", "。", "[dot]", " (dot) ", "%2E", "&#46;", "&period;"]
SEPARATORS = [" ", "-", ".", "/", "_", ",", "\u2013", "\u00a0", "\u2009", ZW, " - ", "%20"]


def _luhn_complete(prefix: str) -> str:
    return next(prefix + d for d in "0123456789" if luhn_valid(prefix + d))


@settings(max_examples=150, deadline=None)
@given(
    local=LABEL,
    domain=LABEL,
    tld=st.sampled_from(["com", "org", "de", "co", "info", "рф"]),
    at=st.sampled_from(AT_FORMS),
    dot=st.sampled_from(DOT_FORMS),
)
def test_property_emails_in_any_written_form_lose_every_part(
    redactor: Redactor, local: str, domain: str, tld: str, at: str, dot: str
) -> None:
    out = redactor.redact(f"Mail: {local}{at}{domain}{dot}{tld} please")
    assert out == "Mail: [EMAIL] please", out


@settings(max_examples=150, deadline=None)
@given(
    digits=st.text(st.sampled_from("0123456789"), min_size=15, max_size=15),
    separators=st.lists(st.sampled_from(SEPARATORS), min_size=3, max_size=3),
    fullwidth=st.booleans(),
)
def test_property_card_numbers_with_any_separator_lose_every_digit(
    redactor: Redactor, digits: str, separators: list[str], fullwidth: bool
) -> None:
    number = _luhn_complete(digits)
    if fullwidth:  # the digits, not the separators ("%20" stays percent-encoding)
        number = number.translate({ord(d): 0xFF10 + int(d) for d in "0123456789"})
    groups = [number[i : i + 4] for i in range(0, 16, 4)]
    text = groups[0] + "".join(sep + g for sep, g in zip(separators, groups[1:], strict=True))
    out = redactor.redact(f"card {text} ok")
    assert out == "card [CARD] ok", out


@settings(max_examples=150, deadline=None)
@given(
    digits=st.text(st.sampled_from("23456789"), min_size=10, max_size=10),
    separator=st.sampled_from(SEPARATORS),
    plus=st.booleans(),
    tail=st.sampled_from(["", "ext", "x12", "abc", " ok"]),
)
def test_property_phone_numbers_with_any_separator_lose_every_digit(
    redactor: Redactor, digits: str, separator: str, plus: bool, tail: str
) -> None:
    number = separator.join([digits[:3], digits[3:6], digits[6:]])
    out = redactor.redact(f"call {'+1 ' if plus else ''}{number}{tail}")
    assert not re.search(r"\d", out.removesuffix("x12")), out
    assert out.startswith("call [PHONE]") or out.startswith("call [CARD]"), out


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(
        st.sampled_from("ab1234567890 @.-_()+[]%4=\u200b\u00a0\uff20\u2013atdocm"),
        max_size=80,
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=80), max_size=12),
)
def test_property_redacting_tokens_equals_redacting_their_joined_text(
    redactor: Redactor, text: str, cuts: list[int]
) -> None:
    points = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    tokens = [text[a:b] for a, b in itertools.pairwise(points)]
    out = redactor.redact_tokens(tokens)
    assert len(out) == len(tokens)
    assert "".join(out) == redactor.redact(text)


SECRETS = ["alice@example.com", "4111 1111 1111 1111", "415-555-2671"]


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    cuts=st.lists(st.integers(min_value=1, max_value=70), min_size=1, max_size=25),
    at=st.sampled_from(["@", "＠", "[at]", "%40"]),
    fire_step=st.integers(min_value=0, max_value=3),
)
def test_property_values_split_over_decode_steps_never_reach_the_file(
    cuts: list[int], at: str, fire_step: int
) -> None:
    text = f"mail alice{at}example.com, card 4111 1111 1111 1111 or 415-555-2671 thanks"
    points = sorted({0, len(text), *(c for c in cuts if c < len(text))})
    pieces = [text[a:b] for a, b in itertools.pairwise(points)]
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'audit.db'}"
        rec = AuditRecorder(url, RecorderConfig(window_tokens=64))
        try:
            for pos, piece in enumerate(pieces):
                fire = pos == min(fire_step, len(pieces) - 1)
                assert rec.record_batch(_step("c", pos, [piece], fire=fire)).durable
                _assert_clean(Path(tmp))
            assert rec.record_batch(_step("c", len(pieces), [" bye"], end=True)).durable
        finally:
            rec.close(timeout=5)
        _assert_clean(Path(tmp))
        store = open_store(url)
        record = store.get_conversation("c")
        store.close()
    assert record is not None and len(record.tokens) == len(pieces) + 1
    joined = "".join(t.text or "" for t in record.tokens)
    assert "[EMAIL]" in joined and "[CARD]" in joined and "[PHONE]" in joined


def _assert_clean(directory: Path) -> None:
    data = b"".join(p.read_bytes() for p in sorted(directory.glob("audit.db*")))
    for secret in SECRETS:
        assert secret.encode() not in data
    assert b"alice" not in data and b"555-" not in data and b"1111 1111" not in data


def _step(
    cid: str,
    position: int,
    texts: list[str],
    *,
    fire: bool = False,
    end: bool = False,
    request_id: str = "req-1",
    model: str = "gemma",
) -> AuditStep:
    firings = []
    if fire:
        firings.append(
            AuditFiring(
                "r", "deception", "critical", cid, request_id, position + len(texts) - 1, 1.0,
                "m", actions=("audit",),
            )
        )  # fmt: skip
    sl = AuditSlice(cid, request_id, position, texts, "assistant", end, {"f": [1.0] * len(texts)})
    return AuditStep(model, "h", [sl], firings)


# --- ids and the model name ---------------------------------------------------------------------
def test_personal_data_in_ids_and_model_is_stored_redacted(tmp_path: Path, capsys) -> None:
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    cid, rid, model = "chat:alice@example.com:1", "req 415-555-2671", "ft:bob@corp.example.org"
    rec = AuditRecorder(url, RecorderConfig(redaction_holdback_chars=0))
    assert rec.record_batch(
        _step(cid, 0, [" hi"], fire=True, request_id=rid, model=model, end=True)
    ).durable
    # a second conversation differing only in its personal data stays a second conversation
    other = "chat:carol@example.com:1"
    assert rec.record_batch(_step(other, 0, [" yo"], fire=True, end=True)).durable
    rec.close(timeout=5)
    data = b"".join(p.read_bytes() for p in sorted(tmp_path.glob("audit.db*")))
    for raw in (b"alice@example.com", b"415-555-2671", b"bob@corp", b"carol@"):
        assert raw not in data
    store = open_store(url)
    summaries = store.list_conversations()
    stored_id = redact_identifier(Redactor(), cid)
    assert stored_id.startswith("chat:[EMAIL]:1#")
    assert {s.conversation_id for s in summaries} == {
        stored_id,
        redact_identifier(Redactor(), other),
    }
    record = store.get_conversation(stored_id)
    store.close()
    assert record is not None and record.summary.model == "ft:[EMAIL]"
    assert record.request_ids == ("req [PHONE]#" + redact_identifier(Redactor(), rid)[-12:],)
    assert record.alerts[0].conversation_id == stored_id
    # the reviewer pastes the id from the alert the client received
    from monitor.audit.cli import main

    assert main(["audit", "show", cid, "--store", url]) == 0
    assert "chat:[EMAIL]:1#" in capsys.readouterr().out


# --- cost bounds (finding 2) ---------------------------------------------------------------------
class _Counting:
    """Counts the characters handed to `Redactor.spans` (works on any version of it)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.chars = 0
        original = Redactor.spans

        def counted(redactor: Redactor, text: str):  # type: ignore[no-untyped-def]
            self.chars += len(text)
            return original(redactor, text)

        monkeypatch.setattr(Redactor, "spans", counted)


def test_short_tokens_without_spaces_are_scanned_a_bounded_number_of_times(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """16 flagged conversations emitting short base64-like tokens for 700 steps (the attack:
    send-to-ack rose from 5.4 ms to 366 ms per step, every step rescanned the held text)."""
    counting = _Counting(monkeypatch)
    rec = AuditRecorder(f"sqlite:///{tmp_path / 'audit.db'}", RecorderConfig())
    alphabet = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo0NTY3ODkrLw"
    sent = 0
    try:
        for pos in range(700):
            token = alphabet[pos % 40 : pos % 40 + 6]
            slices = [
                AuditSlice(f"c{c}", "r", pos, [token], "assistant", False, {"f": [1.0]})
                for c in range(16)
            ]
            firings = [
                AuditFiring("r", "x", "info", f"c{c}", "r", 0, 1.0, "m", actions=("audit",))
                for c in range(16)
                if pos == 0
            ]
            assert rec.record_batch(AuditStep("m", "h", slices, firings)).durable
            sent += 16 * len(token)
    finally:
        rec.close(timeout=10)
    # Linear: each character scanned a bounded number of times (the old code: ~400 times).
    assert counting.chars <= 8 * sent, (counting.chars, sent)


def test_one_40000_character_token_is_scanned_a_bounded_number_of_times(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counting = _Counting(monkeypatch)
    rec = AuditRecorder(f"sqlite:///{tmp_path / 'audit.db'}", RecorderConfig())
    token = ("QUJD" * 10_000) + "alice@example.com"
    try:
        assert rec.record_batch(_step("big", 0, ["x"], fire=True)).durable
        for pos in range(1, 41):  # the long token, then 39 short ones without spaces
            assert rec.record_batch(_step("big", pos, [token if pos == 1 else "QUJD"])).durable
        assert rec.record_batch(_step("big", 41, [" end"], end=True)).durable
    finally:
        rec.close(timeout=10)
    assert counting.chars <= 3 * len(token) + 40 * MAX_HELD_CHARS, counting.chars
    data = b"".join(p.read_bytes() for p in sorted(tmp_path.glob("audit.db*")))
    assert b"alice@example.com" not in data


ADVERSARIAL = {
    "letters": "a",
    "digits": "1",
    "digits and dots": "1.",
    "digits and spaces": "1 ",
    "ats": "a@",
    "colons": "1:",
    "entities": "&#6",
    "percent": "%4",
    "brackets": "[at",
    "words": " at",
    "mixed": "a1.@-_ ",
    "fullwidth": "１．",
}


@pytest.mark.parametrize("unit", ADVERSARIAL.values(), ids=ADVERSARIAL.keys())
def test_a_scan_is_linear_in_the_text_length(redactor: Redactor, unit: str) -> None:
    """Bench, side by side in one run: 10x the text must cost about 10x, not 100x (a pattern
    with unbounded repetition backtracks quadratically on such runs). Best of three."""

    def cost(n: int) -> float:
        text = unit * (n // len(unit))
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            redactor.spans(text)
            best = min(best, time.perf_counter() - started)
        return best

    small, large = cost(10_000), cost(100_000)
    assert large < 40 * small + 0.005, (unit, small, large)
