"""Header values the review page parses: digits a client may send are ASCII digits only."""

from __future__ import annotations

import pytest

from monitor.audit.review.app import _ascii_digits


@pytest.mark.parametrize("text", ["0", "17", "1048576"])
def test_ascii_digits_are_a_length(text: str) -> None:
    assert _ascii_digits(text)
    int(text)  # and int() takes what it accepts


@pytest.mark.parametrize("text", ["", "²", "٣", "1²", "-1", "+1", " 1", "1e3", "0x10"])
def test_anything_else_is_not(text: str) -> None:
    # str.isdigit() is True for "²" and "٣", and int("²") raises: the body reader must refuse
    # such a Content-Length, not crash on it.
    assert not _ascii_digits(text)
