"""The recorder's per-step flow against real stores: windows, caps, redaction, faults."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from monitor.audit.recorder import (
    AuditFiring,
    AuditRecorder,
    AuditSlice,
    AuditStep,
    RecorderConfig,
)
from monitor.audit.store import AuditStore, open_store
from monitor.fixtures import wait_for

FEATURE = "probes/deception"


def step(
    cid: str,
    position: int,
    texts: list[str],
    *,
    end: bool = False,
    fire_at: int | None = None,
    actions: tuple[str, ...] = ("alert", "audit"),
    message: str = "deception high",
) -> AuditStep:
    values = [float(position + i) for i in range(len(texts))]
    firings = []
    if fire_at is not None:
        firings.append(
            AuditFiring(
                rule="sustained-deception",
                category="deception",
                severity="critical",
                conversation_id=cid,
                request_id="req-1",
                position=fire_at,
                value=3.5,
                message=message,
                labels={"team": "ts"},
                actions=actions,
                start=fire_at - 2,
                end=fire_at,
                feature_values={FEATURE: 3.5},
            )
        )
    sl = AuditSlice(cid, "req-1", position, texts, "assistant", end, {FEATURE: values})
    return AuditStep("gemma", "hash1", [sl], firings, ("layers.12",))


@pytest.fixture
def db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'audit.db'}"


@pytest.fixture
def make_recorder() -> Iterator[Callable[..., AuditRecorder]]:
    made: list[AuditRecorder] = []

    def make(url: str | Callable[[], AuditStore], **config: object) -> AuditRecorder:
        recorder = AuditRecorder(url, RecorderConfig(**config))  # type: ignore[arg-type]
        made.append(recorder)
        return recorder

    yield make
    for recorder in made:
        recorder.close(timeout=1)


def read(url: str, cid: str):
    store = open_store(url)
    try:
        return store.get_conversation(cid)
    finally:
        store.close()


def test_window_before_first_alert_and_tokens_until_end(db: str, make_recorder) -> None:
    rec = make_recorder(db, window_tokens=4, redaction_holdback_chars=0)
    for pos in range(10):  # decode steps, one token each; fires at token 7
        result = rec.record_batch(step("c1", pos, [f" w{pos}"], fire_at=7 if pos == 7 else None))
        assert result.durable
        assert result.status == ("nothing" if pos < 7 else "written")
    record = read(db, "c1")
    assert [t.position for t in record.tokens] == [3, 4, 5, 6, 7, 8, 9]  # 4 before the firing
    assert record.tokens[0].features == {FEATURE: 3.0}
    assert [a.rule for a in record.alerts] == ["sustained-deception"]
    rec.record_batch(step("c1", 10, [" last"], end=True))
    record = read(db, "c1")
    assert record.summary.ended and record.tokens[-1].text == " last"
    assert rec.tracked_conversations() == 0  # ended conversations are forgotten


def test_prefill_firing_keeps_window_inside_the_slice(db: str, make_recorder) -> None:
    rec = make_recorder(db, window_tokens=3, redaction_holdback_chars=0)
    rec.record_batch(step("c1", 0, [f" t{i}" for i in range(20)], fire_at=12))
    assert [t.position for t in read(db, "c1").tokens] == list(range(9, 20))


def test_cap_per_conversation(db: str, make_recorder) -> None:
    rec = make_recorder(
        db, window_tokens=2, max_tokens_per_conversation=5, redaction_holdback_chars=0
    )
    rec.record_batch(step("c1", 0, ["a", "b", "c"], fire_at=2))
    for pos in range(3, 10):
        rec.record_batch(step("c1", pos, ["x"], fire_at=pos if pos == 8 else None))
    record = read(db, "c1")
    assert [t.position for t in record.tokens] == [0, 1, 2, 3, 4]
    assert len(record.alerts) == 2  # alerts are always written, past the cap too


def test_unflagged_and_alert_only_conversations_are_not_written(db: str, make_recorder) -> None:
    rec = make_recorder(db)
    for pos in range(5):
        assert rec.record_batch(step("quiet", pos, ["hello"])).status == "nothing"
    # fired, but the rule's actions do not include audit
    assert rec.record_batch(step("alerted", 0, ["x"], fire_at=0, actions=("alert",))).durable
    store = open_store(db)
    assert store.list_conversations() == []
    store.close()


def test_tensor_features_and_memory_bound(db: str, make_recorder) -> None:
    rec = make_recorder(db, max_conversations=3, redaction_holdback_chars=0)
    for i in range(10):
        rec.record_batch(step(f"c{i}", 0, ["a"]))
    assert rec.tracked_conversations() == 3
    sl = AuditSlice("t", "r", 0, ["a", "b"], "user", False, {FEATURE: torch.tensor([0.5, 1.5])})
    firing = AuditFiring("r", "misuse", "warning", "t", "r", 1, 1.5, "m", actions=("audit",))
    assert rec.record_batch(AuditStep("gemma", "h", [sl], [firing])).durable
    assert [t.features[FEATURE] for t in read(db, "t").tokens] == [0.5, 1.5]


RAW = [
    "alice@example.com",
    "bob.jones@corp.example.org",
    "+1 415-555-0100",
    "4111 1111 1111 1111",
    "10.1.2.3",
    "EMP-654321",
]


def _files_bytes(tmp_path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(tmp_path.glob("audit.db*")))


def test_raw_personal_data_never_reaches_the_database_files(tmp_path: Path, make_recorder) -> None:
    db = f"sqlite:///{tmp_path / 'audit.db'}"
    rec = make_recorder(db, window_tokens=16, redact_patterns=(r"EMP-\d{6}",))
    # flagged early; each value then arrives whole in one token, or split over decode steps
    pieces = [
        " mail",
        " alice@example.com",
        " or",
        " bob",
        ".jones",
        "@",
        "corp",
        ".example",
        ".org",
        " phone",
        " +1 415",
        "-555",
        "-0100",
        " card",
        " 4111 1111",
        " 1111 1111",
        " ip",
        " 10.1.2.3",
        " id",
        " EMP-654321",
        " thanks",
    ]
    for pos, piece in enumerate(pieces):
        message = "saw alice@example.com" if pos == 1 else "deception"
        result = rec.record_batch(
            step("c1", pos, [piece], fire_at=pos if pos in (1, 8) else None, message=message)
        )
        assert result.durable
        data = _files_bytes(tmp_path)  # WAL included, while the writer is live
        for raw in RAW:
            assert raw.encode() not in data
            assert raw.replace(" ", "").encode() not in data
    rec.record_batch(step("c1", len(pieces), [" bye"], end=True))
    record = read(db, "c1")
    text = "".join(t.text for t in record.tokens)
    assert "[EMAIL]" in text and "[PHONE]" in text and "[CARD]" in text and "[IP]" in text
    assert "[REDACTED]" in text and text.endswith(" thanks bye")
    assert record.alerts[0].message == "saw [EMAIL]"
    assert len(record.tokens) == len(pieces) + 1  # positions stay aligned with features
    data = _files_bytes(tmp_path)
    for raw in RAW:
        assert raw.encode() not in data


def test_store_down_at_start_then_recovers(tmp_path: Path, make_recorder) -> None:
    missing = tmp_path / "not-yet"
    db = f"sqlite:///{missing / 'audit.db'}"
    rec = make_recorder(db, on_backpressure="drop", retry_initial=0.05, retry_max=0.1)
    wait_for(lambda: rec.counts().error > 0)
    assert not rec.healthy
    result = rec.record_batch(step("c1", 0, ["x"], fire_at=0))
    assert (result.durable, result.status) == (False, "pending")
    missing.mkdir()  # the database becomes reachable
    wait_for(lambda: rec.healthy and rec.counts().ok == 1)
    assert [a.rule for a in read(db, "c1").alerts] == ["sustained-deception"]


def test_full_buffer_drops_with_drop_policy(tmp_path: Path, make_recorder) -> None:
    db = f"sqlite:///{tmp_path / 'missing' / 'audit.db'}"
    results: list[str] = []
    rec = AuditRecorder(
        db, RecorderConfig(on_backpressure="drop", buffer_batches=2), results.append
    )
    wait_for(lambda: rec.counts().error > 0)
    statuses = [rec.record_batch(step(f"c{i}", 0, ["x"], fire_at=0)).status for i in range(5)]
    assert statuses.count("dropped") >= 2 and "written" not in statuses
    assert rec.counts().dropped >= 2 and "dropped" in results and "error" in results
    assert not rec.close(timeout=0.5)  # nothing could be written


def test_block_policy_waits_for_the_commit_then_gives_up(tmp_path: Path, make_recorder) -> None:
    """A store that is not known to be down (here: locked, the write waits for the lock): the
    step waits up to write_timeout for its commit."""
    path = tmp_path / "audit.db"
    rec = make_recorder(f"sqlite:///{path}", on_backpressure="block", write_timeout=0.3)
    wait_for(lambda: rec.healthy)
    locker = sqlite3.connect(path, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        started = time.monotonic()
        result = rec.record_batch(step("c1", 0, ["x"], fire_at=0))
        assert not result.durable and time.monotonic() - started >= 0.25
    finally:
        locker.execute("COMMIT")
        locker.close()


def test_a_store_known_to_be_down_is_not_waited_for(tmp_path: Path, make_recorder) -> None:
    db = f"sqlite:///{tmp_path / 'missing' / 'audit.db'}"
    rec = make_recorder(db, on_backpressure="block", write_timeout=20.0)
    wait_for(lambda: rec.counts().error > 0)
    started = time.monotonic()
    result = rec.record_batch(step("c1", 0, ["x"], fire_at=0))
    assert (result.durable, result.status) == (False, "pending")
    # The pipeline is not held for write_timeout (20 s; far apart even on a loaded machine).
    assert time.monotonic() - started < 5.0


def test_retention_purge(db: str, make_recorder) -> None:
    rec = make_recorder(db, retention_days=0.0, purge_interval=0.1, redaction_holdback_chars=0)
    rec.record_batch(
        step(
            "c1",
            0,
            ["x"],
            fire_at=0,
        )
    )
    wait_for(lambda: rec.counts().purged >= 1)
    assert read(db, "c1") is None


def test_postgres_flow(pg_url: str, make_recorder) -> None:
    rec = make_recorder(pg_url, window_tokens=2, redaction_holdback_chars=0)
    for pos in range(5):
        assert rec.record_batch(
            step("pg-1", pos, [f" {pos}"], fire_at=3 if pos == 3 else None, end=pos == 4)
        ).durable
    record = read(pg_url, "pg-1")
    assert [t.position for t in record.tokens] == [1, 2, 3, 4] and record.summary.ended


def test_a_step_that_can_never_be_written_does_not_block_later_ones(tmp_path: Path) -> None:
    """A value the store cannot hold (a position past 64 bits) is a permanent error: the job
    is set aside after a few attempts and the next conversation's step is written."""
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    recorder = AuditRecorder(url, RecorderConfig(write_timeout=20.0, retry_initial=0.01))
    try:
        started = time.monotonic()
        bad = recorder.record_batch(step("huge", 2**63, ["x"], fire_at=2**63))
        assert (bad.durable, bad.status) == (False, "dropped")
        assert time.monotonic() - started < 10.0  # not the full write_timeout (20 s) per batch
        good = recorder.record_batch(step("fine", 0, ["a", "b"], fire_at=1))
        assert (good.durable, good.status) == (True, "written")
        assert recorder.counts().dropped == 1
    finally:
        recorder.close()
    store = open_store(url)
    try:
        assert store.get_conversation("fine") is not None
    finally:
        store.close()


def test_nul_in_token_text_is_stored_as_a_replacement_character(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    recorder = AuditRecorder(url, RecorderConfig(redaction_holdback_chars=0))
    try:
        result = recorder.record_batch(step("nul", 0, ["a\x00b ", "c "], fire_at=0, end=True))
        assert result.durable
    finally:
        recorder.close()
    store = open_store(url)
    try:
        record = store.get_conversation("nul")
        assert record is not None
        assert "\x00" not in "".join(t.text or "" for t in record.tokens)
    finally:
        store.close()


def test_a_locked_database_withholds_then_writes_once_released(
    tmp_path: Path, make_recorder
) -> None:
    """Another process holding the write lock (a long transaction, a manual purge): the step
    is not acknowledged as written while the lock is held, errors are counted and health
    goes down; once released, the same step is written, nothing lost or written twice."""
    import sqlite3

    url = f"sqlite:///{tmp_path / 'audit.db'}"
    rec = make_recorder(
        url, write_timeout=2.0, retry_initial=0.05, retry_max=0.2, redaction_holdback_chars=0
    )
    assert rec.record_batch(step("before", 0, ["a"], fire_at=0)).durable
    holder = sqlite3.connect(tmp_path / "audit.db", isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        result = rec.record_batch(step("during", 0, ["b", "c"], fire_at=1))
        assert not result.durable and result.status != "written"
        wait_for(lambda: rec.counts().error > 0 and not rec.healthy)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    wait_for(lambda: rec.healthy and rec.counts().ok == 2 and rec.counts().pending == 0)
    record = read(url, "during")
    assert [a.rule for a in record.alerts] == ["sustained-deception"]
    assert [t.position for t in record.tokens] == [0, 1] and rec.counts().dropped == 0
