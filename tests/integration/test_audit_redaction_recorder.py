"""Redaction through the recorder into the database file (issue 14, findings 1 and 2).

Values split over decode steps (hypothesis), personal data in ids and the model name, and the
cost bounds of redaction measured by counting the characters scanned (not by timing).
"""

from __future__ import annotations

import itertools
import tempfile
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
from monitor.audit.redaction import Redactor, redact_identifier
from monitor.audit.store import open_store

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
