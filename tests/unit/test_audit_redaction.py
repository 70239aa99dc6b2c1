"""Redaction of personal data in token text, including values split across tokens."""

from __future__ import annotations

import pytest

from monitor.audit.redaction import Redactor, luhn_valid


@pytest.fixture
def redactor() -> Redactor:
    return Redactor(extra_patterns=[r"EMP-\d{6}"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("write to alice.smith+work@example.co.uk today", "write to [EMAIL] today"),
        ("call +1 415-555-0100 now", "call [PHONE] now"),
        ("or (415) 555 0100.", "or [PHONE]."),
        ("card 4111 1111 1111 1111 ok", "card [CARD] ok"),
        ("card 5555555555554444", "card [CARD]"),
        ("host 192.168.1.20. done", "host [IP]. done"),
        ("v6 2001:db8::8a2e:370:7334 here", "v6 [IP] here"),
        ("badge EMP-123456", "badge [REDACTED]"),
    ],
)
def test_each_kind_is_redacted(redactor: Redactor, text: str, expected: str) -> None:
    assert redactor.redact(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "4111111111111112",  # 16 digits failing the Luhn check: not a card
        "at 12:30:45 on 2024-01-01 in 2024",
        "tokens 120-135 scored 2.84",
        "version 1.2.3",
    ],
)
def test_non_personal_text_is_kept(redactor: Redactor, text: str) -> None:
    assert redactor.redact(text) == text


def test_luhn() -> None:
    assert luhn_valid("4111111111111111")
    assert not luhn_valid("4111111111111112")


def test_tokens_keep_alignment_and_placeholder_goes_to_first_fragment(redactor: Redactor) -> None:
    tokens = ["Mail ", "bob", "@", "example", ".org", " please"]
    assert redactor.redact_tokens(tokens) == ["Mail ", "[EMAIL]", "", "", "", " please"]


def test_continuation_of_a_match_in_context_is_removed(redactor: Redactor) -> None:
    assert redactor.redact_tokens([".org", " bye"], context="Mail bob@example") == ["", " bye"]


def test_bad_extra_pattern_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="bad redaction pattern"):
        Redactor(extra_patterns=["(unclosed"])
