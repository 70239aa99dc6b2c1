"""The audit recorder: turns each step's slices and firings into durable audit records.

Runs in two threads:
- the sidecar's pipeline thread calls `record_batch(step)`. It keeps a bounded recent window of
  every tracked conversation in memory (raw text never leaves this process unredacted), decides
  what to write for flagged conversations, redacts it, and hands one write job per step to
- a writer thread, which owns the database connection, commits each job as one transaction,
  retries with backoff and reconnects when the database fails, and purges old records.

`record_batch` waits for its own job to commit (up to `write_timeout`) so the sidecar can ack
an alert only once it is durable. When the database is slow or down, jobs wait in a bounded
buffer; when the buffer is full the `on_backpressure` policy decides: `block` waits for room
(the stream slows down, the client's own fail-open/closed policy applies), `drop` discards the
step's audit data at once (counted). While the writer is failing, `drop` also stops waiting
for commits so a dead database cannot stall the stream.

Redaction and token fragments: redaction runs over the joined text of the conversation's
pending tokens plus the tail of what was already written, and is mapped back onto the tokens
(see redaction.py). Redacting each token on its own would miss an address that arrives as
"alice", "@", "example.com" in three decode steps. So the last `redaction_holdback_chars`
characters of a flagged conversation are held in memory until more text follows (or the
conversation ends, the recorder closes or the conversation is evicted): a value split across
steps is then seen whole before any of it is written. Alerts are never held back.
"""

from __future__ import annotations

import contextlib
import queue
import sqlite3
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from monitor.audit.redaction import Redactor
from monitor.audit.store import (
    AlertRecord,
    AuditStore,
    ConversationWrite,
    TokenRecord,
    open_store,
)
from monitor.limits import MAX_CONVERSATIONS

ResultKind = Literal["ok", "error", "dropped"]
MAX_HELD_TOKENS = 512  # redaction holdback never keeps more tokens than this in memory


@dataclass(frozen=True)
class AuditSlice:
    """One sequence's tokens in one step (the wire `Sequence`, with feature values)."""

    conversation_id: str
    request_id: str
    position: int  # 0-based position of the first token within the conversation
    tokens: Sequence[str] = ()  # token texts; may be empty when the client sends none
    role: str = ""
    end: bool = False
    # qualified feature name -> one value per token (list of floats or a 1-D tensor/array)
    features: Mapping[str, Any] = field(default_factory=dict)
    rows: int | None = None  # token count; defaults to len(tokens) or the feature length


@dataclass(frozen=True)
class AuditFiring:
    """A rule firing as the audit trail records it (the sidecar's `firings.py` makes it from a
    `Firing`). Only firings with the `audit` action flag their conversation.
    """

    rule: str
    category: str
    severity: str
    conversation_id: str
    request_id: str
    position: int
    value: float | None
    message: str
    labels: Mapping[str, str] = field(default_factory=dict)
    actions: tuple[str, ...] = ()  # only firings with "audit" flag a conversation
    start: int | None = None  # token span the rule held over (defaults to position)
    end: int | None = None
    feature_values: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class AuditStep:
    """One processed batch as the recorder sees it: the model, the hash of the rules in force, the
    conversation slices with token text and feature values, and the firings.
    """

    model: str
    rule_set_hash: str
    slices: Sequence[AuditSlice]
    firings: Sequence[AuditFiring] = ()
    hook_points: tuple[str, ...] = ()


@dataclass(frozen=True)
class AuditWriteResult:
    """durable: the step's audit data is committed (or it had none): safe to ack its alerts."""

    durable: bool
    status: Literal["nothing", "written", "pending", "dropped"]
    conversations: int = 0


@dataclass(frozen=True)
class RecorderConfig:
    """How much the recorder keeps (the token window before a firing, conversations, tokens per
    conversation), what it redacts, and what it does when the store falls behind.
    """

    window_tokens: int = 64
    max_conversations: int = MAX_CONVERSATIONS
    max_tokens_per_conversation: int = 8192
    redact_patterns: tuple[str, ...] = ()
    redaction_holdback_chars: int = 64
    buffer_batches: int = 256
    on_backpressure: Literal["block", "drop"] = "block"
    write_timeout: float = 5.0
    retention_days: float | None = None
    purge_interval: float = 3600.0
    retry_initial: float = 0.1
    retry_max: float = 5.0


@dataclass(frozen=True)
class AuditCounts:
    """Store writes so far: committed, failed, dropped, waiting, and conversations purged."""

    ok: int
    error: int
    dropped: int
    pending: int
    purged: int


@dataclass
class _Token:
    position: int
    text: str | None
    role: str
    request_id: str
    features: dict[str, float | None]


@dataclass
class _Conversation:
    model: str = ""
    window: deque[_Token] = field(default_factory=deque)
    flagged: bool = False
    held: list[_Token] = field(default_factory=list)  # flagged, not yet written
    context: str = ""  # raw tail of written text, only for matching across the boundary
    accepted: int = 0  # tokens accepted for writing, against max_tokens_per_conversation


@dataclass
class _Job:
    writes: list[ConversationWrite]
    done: threading.Event = field(default_factory=threading.Event)
    failed: bool = False  # set with `done` when the job can never be written
    attempts: int = 0


class AuditRecorder:
    """Use from one thread (the pipeline's); `healthy`, `counts` and `close` from any."""

    def __init__(
        self,
        store: str | Callable[[], AuditStore],
        config: RecorderConfig | None = None,
        on_result: Callable[[ResultKind], None] | None = None,
    ) -> None:
        self.config = config or RecorderConfig()
        self._redactor = Redactor(self.config.redact_patterns)
        self._conversations: OrderedDict[str, _Conversation] = OrderedDict()
        open_fn = (lambda: open_store(store)) if isinstance(store, str) else store
        self._writer = _Writer(open_fn, self.config, on_result)
        self._writer.start()

    # --- public API ------------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        """The store commits and the write queue has room."""
        return self._writer.healthy

    def counts(self) -> AuditCounts:
        """The writer's counters (see AuditCounts)."""
        return self._writer.counts()

    def tracked_conversations(self) -> int:
        """Conversations whose recent tokens are kept in memory now."""
        return len(self._conversations)

    def record_batch(self, step: AuditStep) -> AuditWriteResult:
        """Collect what the step adds to flagged conversations and hand it to the writer; the result
        says whether it is durable, i.e. whether the step's `audit` alerts may be sent.
        """
        writes = self._collect(step, datetime.now(UTC))
        if not writes:
            return AuditWriteResult(True, "nothing")
        return self._writer.submit(writes)

    def close(self, timeout: float = 10.0) -> bool:
        """Write held-back tokens, drain the buffer, stop the writer. True if all committed."""
        now = datetime.now(UTC)
        writes = []
        for cid, conv in self._conversations.items():
            tokens = self._release(conv, final=True)
            if tokens:
                writes.append(ConversationWrite(cid, conv.model, now, tokens=tuple(tokens)))
        self._conversations.clear()
        if writes:
            self._writer.submit(writes)
        return self._writer.stop(timeout)

    # --- per-step bookkeeping (pipeline thread) ---------------------------------------------
    def _collect(self, step: AuditStep, now: datetime) -> list[ConversationWrite]:
        fired = _audit_firings(step.firings)
        out: dict[str, _WriteBuilder] = {}

        def builder(cid: str) -> _WriteBuilder:
            return out.setdefault(cid, _WriteBuilder())

        for sl in step.slices:
            conv = self._track(sl.conversation_id, out, step.model)
            firings = fired.get(sl.conversation_id)
            self._accept(conv, _tokens_of(sl, self._first_kept_row(conv, sl, firings)))
            if firings and not conv.flagged:
                self._flag(conv, min(f.position for f in firings))
            if conv.flagged:
                builder(sl.conversation_id).add(self._release(conv, final=sl.end), sl.end)
            if sl.end:
                del self._conversations[sl.conversation_id]
            elif not conv.flagged:
                _trim(conv.window, self.config.window_tokens)
        for cid, firings in fired.items():
            conv = self._conversations.get(cid)
            if conv is not None and not conv.flagged:  # fired on a slice not in this step
                self._flag(conv, min(f.position for f in firings))
            builder(cid).alerts.extend(self._alert(f, step.rule_set_hash, now) for f in firings)
        return [b.build(cid, step, now) for cid, b in out.items()]

    def _track(self, cid: str, out: dict[str, _WriteBuilder], model: str) -> _Conversation:
        conv = self._conversations.get(cid)
        if conv is not None:
            self._conversations.move_to_end(cid)
            return conv
        conv = self._conversations[cid] = _Conversation(model=model)
        while len(self._conversations) > self.config.max_conversations:
            # LRU eviction bounds memory; an evicted flagged conversation's held tokens are
            # written now, and later tokens of it are no longer recorded.
            old_id, old = self._conversations.popitem(last=False)
            if old.flagged:
                out.setdefault(old_id, _WriteBuilder()).add(self._release(old, final=True), False)
        return conv

    def _first_kept_row(
        self, conv: _Conversation, sl: AuditSlice, firings: list[AuditFiring] | None
    ) -> int:
        """Rows of an unflagged conversation older than the window are dropped anyway; not
        building them keeps a long unflagged prefill cheap."""
        if conv.flagged:
            return 0
        rows = sl.rows if sl.rows is not None else len(sl.tokens)
        keep_from = sl.position + rows - self.config.window_tokens
        if firings:
            keep_from = min(keep_from, min(f.position for f in firings) - self.config.window_tokens)
        return max(0, keep_from - sl.position)

    def _accept(self, conv: _Conversation, tokens: list[_Token]) -> None:
        if not conv.flagged:
            conv.window.extend(tokens)
            return
        room = max(0, self.config.max_tokens_per_conversation - conv.accepted)
        conv.held.extend(tokens[:room])
        conv.accepted += min(room, len(tokens))

    def _flag(self, conv: _Conversation, first_position: int) -> None:
        """First audit firing: the window before it (and the rest of this slice) is kept."""
        conv.flagged = True
        earliest = first_position - self.config.window_tokens
        kept = [t for t in conv.window if t.position >= earliest]
        kept = kept[: self.config.max_tokens_per_conversation]
        conv.window.clear()
        conv.held.extend(kept)
        conv.accepted = len(kept)

    def _release(self, conv: _Conversation, final: bool) -> list[TokenRecord]:
        """Redact and hand over the held tokens that can no longer be part of a longer match."""
        if not conv.held:
            return []
        texts = [t.text or "" for t in conv.held]
        count = len(texts) if final else self._releasable(conv, texts)
        if count == 0:
            return []
        redacted = self._redactor.redact_tokens(texts, context=conv.context)
        released, conv.held = conv.held[:count], conv.held[count:]
        keep = 2 * self.config.redaction_holdback_chars
        conv.context = (conv.context + "".join(texts[:count]))[-keep:] if keep else ""
        return [
            TokenRecord(
                t.position, None if t.text is None else text, t.role, t.request_id, t.features
            )
            for t, text in zip(released, redacted, strict=False)
        ]

    def _releasable(self, conv: _Conversation, texts: list[str]) -> int:
        holdback = self.config.redaction_holdback_chars
        total = sum(map(len, texts))
        if holdback <= 0 or total == 0:
            return len(texts)
        ends, offset = [], 0
        for text in texts:
            offset += len(text)
            ends.append(offset)
        count = sum(1 for end in ends if end <= total - holdback)
        # Never cut through a run of non-space characters: an e-mail address only matches once
        # its domain has arrived, so its first fragments must wait for the rest of the run.
        joined = "".join(texts)
        while 0 < count < len(texts) and _inside_word(joined, ends[count - 1]):
            count -= 1
        # Never cut through a match: release only up to the token where it starts.
        base = len(conv.context)
        boundary = base + (ends[count - 1] if count else 0)
        for span in self._redactor.spans(conv.context + "".join(texts)):
            if span.start >= base and span.start < boundary < span.end:
                count = min(count, _token_index(ends, span.start - base))
        # Memory bound (a very long run without spaces): release the oldest beyond the cap.
        return max(count, len(texts) - MAX_HELD_TOKENS)

    def _alert(self, f: AuditFiring, rule_set_hash: str, now: datetime) -> AlertRecord:
        return AlertRecord(
            conversation_id=f.conversation_id,
            request_id=f.request_id,
            rule=f.rule,
            rule_set_hash=rule_set_hash,
            category=f.category,
            severity=f.severity,
            value=None if f.value is None else float(f.value),
            position=int(f.position),
            start=int(f.position if f.start is None else f.start),
            end=int(f.position if f.end is None else f.end),
            feature_values={k: float(v) for k, v in f.feature_values.items()},
            message=self._redactor.redact(f.message),
            labels=dict(f.labels),
            created_at=now,
        )


@dataclass
class _WriteBuilder:
    tokens: list[TokenRecord] = field(default_factory=list)
    alerts: list[AlertRecord] = field(default_factory=list)
    ended: bool = False

    def add(self, tokens: Iterable[TokenRecord], ended: bool) -> None:
        self.tokens.extend(tokens)
        self.ended = self.ended or ended

    def build(self, cid: str, step: AuditStep, now: datetime) -> ConversationWrite:
        return ConversationWrite(
            conversation_id=cid,
            model=step.model,
            at=now,
            hook_points=tuple(step.hook_points),
            ended=self.ended,
            tokens=tuple(self.tokens),
            alerts=tuple(self.alerts),
        )


PERMANENT_ERROR_ATTEMPTS = 3


def _is_data_error(exc: BaseException) -> bool:
    """Errors about the values written (out of range, invalid text), which a retry cannot fix,
    as opposed to the store being unreachable, locked or full."""
    if isinstance(exc, OverflowError | ValueError | UnicodeError | sqlite3.DataError):
        return True
    if isinstance(exc, sqlite3.IntegrityError | sqlite3.InterfaceError):
        return True
    name = type(exc).__name__  # psycopg's classes, without importing psycopg here
    return name in {"DataError", "IntegrityError", "ProgrammingError", "NumericValueOutOfRange"}


def _audit_firings(firings: Iterable[AuditFiring]) -> dict[str, list[AuditFiring]]:
    out: dict[str, list[AuditFiring]] = {}
    for f in firings:
        if "audit" in f.actions:
            out.setdefault(f.conversation_id, []).append(f)
    return out


def _as_floats(values: Any) -> list[float | None]:
    # Tensors and arrays both have tolist(); this keeps the recorder free of a torch import.
    items = values.tolist() if hasattr(values, "tolist") else list(values)
    return [None if v is None else float(v) for v in items]


def _tokens_of(sl: AuditSlice, first_row: int = 0) -> list[_Token]:
    """The slice's tokens from `first_row` on (rows before it are not kept, so not built)."""
    features = {name: _as_floats(values[first_row:]) for name, values in sl.features.items()}
    rows = sl.rows
    if rows is None:
        rows = len(sl.tokens) or max((len(v) + first_row for v in features.values()), default=0)
    texts = sl.tokens
    return [
        _Token(
            position=sl.position + i,
            # NUL cannot be stored in PostgreSQL text; a byte-level tokenizer can produce it.
            text=texts[i].replace("\x00", "\ufffd") if i < len(texts) else None,
            role=sl.role,
            request_id=sl.request_id,
            features={
                n: v[i - first_row] if i - first_row < len(v) else None for n, v in features.items()
            },
        )
        for i in range(first_row, rows)
    ]


def _trim(window: deque[_Token], size: int) -> None:
    while len(window) > size:
        window.popleft()


def _inside_word(text: str, offset: int) -> bool:
    return 0 < offset < len(text) and not text[offset - 1].isspace() and not text[offset].isspace()


def _token_index(ends: list[int], char_offset: int) -> int:
    for i, end in enumerate(ends):
        if char_offset < end:
            return i
    return len(ends)


class _Writer(threading.Thread):
    """Owns the store; commits jobs in order, retrying each until it commits or we stop."""

    def __init__(
        self,
        open_fn: Callable[[], AuditStore],
        config: RecorderConfig,
        on_result: Callable[[ResultKind], None] | None,
    ) -> None:
        super().__init__(name="audit-writer", daemon=True)
        self._open_fn = open_fn
        self._config = config
        self._on_result = on_result
        self._queue: queue.Queue[_Job] = queue.Queue(maxsize=max(1, config.buffer_batches))
        self._stop_event = threading.Event()
        self._stop_deadline = float("inf")
        self._lock = threading.Lock()
        self._counts = {"ok": 0, "error": 0, "dropped": 0, "purged": 0}
        self._store: AuditStore | None = None
        self._failing = False
        self._next_purge = 0.0
        self._abandoned = 0  # jobs given up at close(): close() then reports failure

    # --- called from the pipeline thread ---------------------------------------------------
    @property
    def healthy(self) -> bool:
        return self._store is not None and not self._failing and not self._queue.full()

    def counts(self) -> AuditCounts:
        with self._lock:
            c = dict(self._counts)
        return AuditCounts(c["ok"], c["error"], c["dropped"], self._queue.qsize(), c["purged"])

    def submit(self, writes: list[ConversationWrite]) -> AuditWriteResult:
        job = _Job(writes)
        n = len(writes)
        cfg = self._config
        deadline = time.monotonic() + cfg.write_timeout
        try:
            if cfg.on_backpressure == "block":
                self._queue.put(job, timeout=cfg.write_timeout)
            else:
                self._queue.put_nowait(job)
        except queue.Full:
            self._count("dropped")
            return AuditWriteResult(False, "dropped", n)
        if cfg.on_backpressure == "drop" and self._failing:
            return AuditWriteResult(False, "pending", n)
        if job.done.wait(max(0.0, deadline - time.monotonic())):
            if job.failed:
                return AuditWriteResult(False, "dropped", n)
            return AuditWriteResult(True, "written", n)
        return AuditWriteResult(False, "pending", n)

    def stop(self, timeout: float) -> bool:
        self._stop_deadline = time.monotonic() + timeout
        self._stop_event.set()
        self.join(timeout + 1.0)
        return self._abandoned == 0 and not self.is_alive()

    # --- writer thread -----------------------------------------------------------------------
    def _count(self, kind: str, amount: int = 1) -> None:
        with self._lock:
            self._counts[kind] += amount
        if self._on_result is not None and kind != "purged":
            self._on_result(kind)  # type: ignore[arg-type]

    def run(self) -> None:
        self._ensure_store()
        while not (self._stop_event.is_set() and self._queue.empty()):
            if time.monotonic() > self._stop_deadline:
                break
            self._maybe_purge()
            try:
                job = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            self._commit(job)
        self._drop_remaining()
        if self._store is not None:
            self._store.close()

    def _commit(self, job: _Job) -> None:
        delay = self._config.retry_initial
        while time.monotonic() <= self._stop_deadline:  # retries end at close() at the latest
            if self._ensure_store() and self._try_write(job):
                return
            if job.failed:
                return
            time.sleep(min(delay, max(0.0, self._stop_deadline - time.monotonic())))
            delay = min(delay * 2, self._config.retry_max)
        self._abandoned += 1
        self._count("dropped")

    def _try_write(self, job: _Job) -> bool:
        assert self._store is not None
        try:
            self._store.write(job.writes)
        except Exception as exc:
            self._failed()
            job.attempts += 1
            if _is_data_error(exc) and job.attempts >= PERMANENT_ERROR_ATTEMPTS:
                # The data itself cannot be stored (not the store being down): set the job
                # aside instead of blocking every later write behind it.
                job.failed = True
                self._abandoned += 1
                self._count("dropped")
                job.done.set()
            return False
        self._failing = False
        job.done.set()
        self._count("ok")
        return True

    def _ensure_store(self) -> bool:
        if self._store is not None:
            return True
        try:
            self._store = self._open_fn()
        except Exception:
            self._failing = True
            self._count("error")
            return False
        return True

    def _failed(self) -> None:
        # Reconnect on the next attempt: after a PostgreSQL restart the old connection is dead.
        self._failing = True
        self._count("error")
        store, self._store = self._store, None
        if store is not None:
            with contextlib.suppress(Exception):
                store.close()

    def _maybe_purge(self) -> None:
        days = self._config.retention_days
        now = time.monotonic()
        if days is None or now < self._next_purge or not self._ensure_store():
            return
        self._next_purge = now + self._config.purge_interval
        assert self._store is not None
        try:
            purged = self._store.purge(datetime.now(UTC) - timedelta(days=days))
        except Exception:
            self._failed()
            return
        self._count("purged", purged)

    def _drop_remaining(self) -> None:
        for _ in range(self._queue.qsize()):
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
            self._abandoned += 1
            self._count("dropped")
