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

Redaction cost is linear in the text and bounded per step: the held-back text is scanned only
when it can be released (it is short, at most a few times the holdback) or has grown by half
since the last scan that released nothing (a long run without spaces: geometric, so each
character is scanned a bounded number of times), and a run longer than `MAX_HELD_CHARS` is
released in parts. One scan per release serves both the release decision and the redaction.

When an alert commits, the held-back tokens of its conversation are written with it, without
their text (positions, roles, features): a sidecar killed before the text could be released
leaves those last characters without text, never unredacted. The text follows, in place,
with the next release.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import itertools
import queue
import sqlite3
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import structlog

from monitor.audit import spool
from monitor.audit.redaction import Redactor, Span, cut_tokens, redact_identifier
from monitor.audit.store import (
    AlertRecord,
    AuditStore,
    ConversationWrite,
    TokenRecord,
    open_store,
    sqlite_path,
)
from monitor.limits import MAX_CONVERSATIONS


class _SafeLog:
    """The writer thread logs through this: a failing log stream (closed, full disk) must
    never end the thread that holds the audit records. The logger is looked up per call (only
    errors and state changes are logged), so it follows the process's current log set-up."""

    def __getattr__(self, level: str) -> Callable[..., None]:
        method = getattr(structlog.get_logger(__name__), level)

        def emit(*args: Any, **kwargs: Any) -> None:
            with contextlib.suppress(Exception):
                method(*args, **kwargs)

        return emit


log = _SafeLog()

ResultKind = Literal["ok", "error", "dropped"]
MAX_HELD_TOKENS = 512  # redaction holdback never keeps more tokens than this in memory
# ... nor more characters than this: a longer run without spaces is released in parts, the
# oldest first, down to half of it (a value longer than the rest is then redacted in parts).
MAX_HELD_CHARS = 4096


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
    health_probe_seconds: float = 1.0  # idle probe of the store, so health is honest
    # Where records go that the store could not take before shutdown. None: beside a SQLite
    # store (`<file>.spool.jsonl`), `safety-monitor-audit.spool.jsonl` in the working directory
    # for PostgreSQL, and no spool for a store given as a function (tests).
    spool_path: str | None = None


@dataclass(frozen=True)
class AuditCounts:
    """Store writes so far: committed, failed, dropped, waiting, and conversations purged."""

    ok: int
    error: int
    dropped: int
    pending: int
    purged: int
    spooled: int = 0  # write jobs put in the spool at shutdown


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
    held_chars: int = 0  # characters of text in `held`
    next_scan_at: int = 0  # scan `held` for release once it holds this many characters
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
        # Ids and the model name are client text too: stored and shown only redacted. Cached,
        # as they repeat on every step.
        self._safe_id = functools.lru_cache(maxsize=4096)(
            functools.partial(redact_identifier, self._redactor)
        )
        self._safe_text = functools.lru_cache(maxsize=256)(self._redactor.redact)
        self._conversations: OrderedDict[str, _Conversation] = OrderedDict()
        open_fn = (lambda: open_store(store)) if isinstance(store, str) else store
        self._writer = _Writer(open_fn, self.config, on_result, _spool_path(store, self.config))
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
                writes.append(
                    ConversationWrite(
                        self._safe_id(cid), self._safe_text(conv.model), now, tokens=tuple(tokens)
                    )
                )
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
            first_row = self._first_kept_row(conv, sl, firings)
            self._accept(conv, _tokens_of(sl, first_row, self._safe_id(sl.request_id)))
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
            if conv is not None and conv.held:
                builder(cid).tokens.extend(self._provisional(conv))
        model = self._safe_text(step.model)
        return [b.build(self._safe_id(cid), model, step, now) for cid, b in out.items()]

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
        _hold(conv, tokens[:room])
        conv.accepted += min(room, len(tokens))

    def _flag(self, conv: _Conversation, first_position: int) -> None:
        """First audit firing: the window before it (and the rest of this slice) is kept."""
        conv.flagged = True
        earliest = first_position - self.config.window_tokens
        kept = [t for t in conv.window if t.position >= earliest]
        kept = kept[: self.config.max_tokens_per_conversation]
        conv.window.clear()
        _hold(conv, kept)
        conv.accepted = len(kept)

    def _release(self, conv: _Conversation, final: bool) -> list[TokenRecord]:
        """Redact and hand over the held tokens that can no longer be part of a longer match."""
        if not conv.held or (not final and conv.held_chars < conv.next_scan_at):
            return []
        texts = [t.text or "" for t in conv.held]
        joined = conv.context + "".join(texts)
        spans = self._redactor.spans(joined)
        count = len(texts) if final else self._releasable(conv, texts, joined, spans)
        if count == 0:
            # Nothing could go (a run without spaces): look again once it has grown by half.
            conv.next_scan_at = conv.held_chars + max(1, conv.held_chars // 2)
            return []
        lengths = [len(t) for t in texts[:count]]
        redacted = cut_tokens(joined, spans, len(conv.context), lengths)
        released, conv.held = conv.held[:count], conv.held[count:]
        released_chars = sum(lengths)
        conv.held_chars -= released_chars
        keep = 2 * self.config.redaction_holdback_chars
        end = len(conv.context) + released_chars
        conv.context = joined[max(0, end - keep) : end] if keep else ""
        # Short held text is looked at every step (bounded work); a long one geometrically.
        small = 4 * self.config.redaction_holdback_chars
        conv.next_scan_at = 0 if conv.held_chars <= small else conv.held_chars * 3 // 2
        return [
            TokenRecord(
                t.position, None if t.text is None else text, t.role, t.request_id, t.features
            )
            for t, text in zip(released, redacted, strict=False)
        ]

    def _releasable(
        self, conv: _Conversation, texts: list[str], joined: str, spans: list[Span]
    ) -> int:
        holdback = self.config.redaction_holdback_chars
        total = conv.held_chars
        if holdback <= 0 or total == 0:
            return len(texts)
        ends = list(itertools.accumulate(map(len, texts)))
        base = len(conv.context)
        count = bisect.bisect_right(ends, total - holdback)
        # Never cut through a run of non-space characters: an e-mail address only matches once
        # its domain has arrived, so its first fragments must wait for the rest of the run.
        while 0 < count < len(texts) and _inside_word(joined, base + ends[count - 1]):
            count -= 1
        # Never cut through a match: release only up to the token where it starts.
        boundary = base + (ends[count - 1] if count else 0)
        for span in spans:
            if span.start >= base and span.start < boundary < span.end:
                count = min(count, _token_index(ends, span.start - base))
        # Memory bounds (a very long run without spaces): release the oldest beyond the caps.
        forced = len(texts) - MAX_HELD_TOKENS
        if total > MAX_HELD_CHARS:
            forced = max(forced, bisect.bisect_left(ends, total - MAX_HELD_CHARS // 2) + 1)
        return min(len(texts), max(count, forced))

    def _provisional(self, conv: _Conversation) -> list[TokenRecord]:
        """The held tokens without their text, written with an alert (see the module doc)."""
        return [TokenRecord(t.position, None, t.role, t.request_id, t.features) for t in conv.held]

    def _alert(self, f: AuditFiring, rule_set_hash: str, now: datetime) -> AlertRecord:
        return AlertRecord(
            conversation_id=self._safe_id(f.conversation_id),
            request_id=self._safe_id(f.request_id),
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

    def build(self, cid: str, model: str, step: AuditStep, now: datetime) -> ConversationWrite:
        return ConversationWrite(
            conversation_id=cid,
            model=model,
            at=now,
            hook_points=tuple(step.hook_points),
            ended=self.ended,
            tokens=tuple(self.tokens),
            alerts=tuple(self.alerts),
        )


PERMANENT_ERROR_ATTEMPTS = 3
ERROR_LOG_INTERVAL_S = 30.0  # while the store stays down, one error line per interval
DEFAULT_PG_SPOOL = "safety-monitor-audit.spool.jsonl"


def _spool_path(store: object, config: RecorderConfig) -> Path | None:
    if config.spool_path:
        return Path(config.spool_path)
    if not isinstance(store, str):
        return None
    path = sqlite_path(store)
    return Path(path + ".spool.jsonl") if path is not None else Path(DEFAULT_PG_SPOOL)


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


def _tokens_of(sl: AuditSlice, first_row: int, request_id: str) -> list[_Token]:
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
            request_id=request_id,
            features={
                n: v[i - first_row] if i - first_row < len(v) else None for n, v in features.items()
            },
        )
        for i in range(first_row, rows)
    ]


def _hold(conv: _Conversation, tokens: list[_Token]) -> None:
    conv.held.extend(tokens)
    conv.held_chars += sum(len(t.text or "") for t in tokens)


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
    """Owns the store; commits jobs in order, retrying each until it commits or we stop.

    While idle it probes the store every `health_probe_seconds`, so `healthy` also turns false
    (and back) when no write happens. At stop, what could not be committed within the timeout
    goes to the spool file (see spool.py), with an error in the log, never silently away.
    """

    def __init__(
        self,
        open_fn: Callable[[], AuditStore],
        config: RecorderConfig,
        on_result: Callable[[ResultKind], None] | None,
        spool_path: Path | None,
    ) -> None:
        super().__init__(name="audit-writer", daemon=True)
        self._open_fn = open_fn
        self._config = config
        self._on_result = on_result
        self._spool_path = spool_path
        self._queue: queue.Queue[_Job] = queue.Queue(maxsize=max(1, config.buffer_batches))
        self._stop_event = threading.Event()
        self._stop_deadline = float("inf")
        self._lock = threading.Lock()
        self._counts = {"ok": 0, "error": 0, "dropped": 0, "purged": 0, "spooled": 0}
        self._store: AuditStore | None = None
        self._failing = False
        self._failing_since: float | None = None
        self._last_error_log = 0.0
        self._next_purge = 0.0
        self._next_probe = 0.0
        self._current: _Job | None = None  # the job being written (for the spool at stop)
        self._spool_lock = threading.Lock()
        self._spooled = False
        self._abandoned = 0  # jobs given up at close(): close() then reports failure

    # --- called from the pipeline thread ---------------------------------------------------
    @property
    def healthy(self) -> bool:
        return self._store is not None and not self._failing and not self._queue.full()

    def counts(self) -> AuditCounts:
        with self._lock:
            c = dict(self._counts)
        return AuditCounts(
            c["ok"], c["error"], c["dropped"], self._queue.qsize(), c["purged"], c["spooled"]
        )

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
            log.error("audit buffer full: step's audit records dropped", conversations=n)
            return AuditWriteResult(False, "dropped", n)
        if self._failing:
            # The store is known to be down: waiting for this commit would stall the pipeline
            # (and every other stream with it) for write_timeout per step. The job stays
            # queued and commits when the store is back; its alerts are withheld now.
            return AuditWriteResult(False, "pending", n)
        if job.done.wait(max(0.0, deadline - time.monotonic())):
            if job.failed:
                return AuditWriteResult(False, "dropped", n)
            return AuditWriteResult(True, "written", n)
        return AuditWriteResult(False, "pending", n)

    def stop(self, timeout: float) -> bool:
        """Commit what is queued within `timeout`, spool the rest. True if all committed."""
        self._stop_deadline = time.monotonic() + timeout
        self._stop_event.set()
        self.join(timeout + 1.0)
        if self.is_alive():
            # Stuck in a database call (a connect or statement timeout longer than the grace
            # period): spool from here. Writes are idempotent, so should that call still
            # commit, the replay stores nothing twice.
            self._spool_remaining()
        return self._abandoned == 0 and not self.is_alive()

    # --- writer thread -----------------------------------------------------------------------
    def _count(self, kind: str, amount: int = 1) -> None:
        with self._lock:
            self._counts[kind] += amount
        if self._on_result is not None and kind not in ("purged", "spooled"):
            self._on_result(kind)  # type: ignore[arg-type]

    def run(self) -> None:
        self._ensure_store()
        while not (self._stop_event.is_set() and self._queue.empty()):
            if time.monotonic() > self._stop_deadline:
                break
            self._maybe_purge()
            try:
                job = self._queue.get(timeout=min(0.2, self._config.health_probe_seconds))
            except queue.Empty:
                self._maybe_probe()
                continue
            self._commit(job)
        self._spool_remaining()
        if self._store is not None:
            with contextlib.suppress(Exception):
                self._store.close()

    def _commit(self, job: _Job) -> None:
        self._current = job
        delay = self._config.retry_initial
        while time.monotonic() <= self._stop_deadline:  # retries end at close() at the latest
            if self._ensure_store() and self._try_write(job):
                self._current = None
                return
            if job.failed:
                self._current = None
                return
            time.sleep(min(delay, max(0.0, self._stop_deadline - time.monotonic())))
            delay = min(delay * 2, self._config.retry_max)
        # Stopping, and the store is still down: the job stays `_current` for the spool.

    def _try_write(self, job: _Job) -> bool:
        assert self._store is not None
        try:
            self._store.write(job.writes)
        except Exception as exc:
            job.attempts += 1
            if not _is_data_error(exc):
                self._failed(exc, "write")
                return False
            # The store answered (and rolled back): it is up, this job's data is the problem.
            log.warning("audit write refused", error=str(exc)[:1000], attempt=job.attempts)
            if job.attempts >= PERMANENT_ERROR_ATTEMPTS:
                # The data itself cannot be stored (not the store being down): set the job
                # aside instead of blocking every later write behind it.
                job.failed = True
                self._abandoned += 1
                self._count("dropped")
                log.error("audit records dropped: the store refuses their data", error=str(exc))
                job.done.set()
            return False
        self._recovered()
        job.done.set()
        self._count("ok")
        return True

    def _ensure_store(self) -> bool:
        if self._store is not None:
            return True
        try:
            self._store = self._open_fn()
        except Exception as exc:
            self._failed(exc, "open")
            return False
        return self._spool_path is None or self._replay_spool()

    def _replay_spool(self) -> bool:
        """Write the jobs a previous run spooled, before any new one; False if the store
        failed meanwhile (the spool is kept)."""
        assert self._spool_path is not None and self._store is not None
        try:
            jobs = spool.load(self._spool_path)
        except (OSError, ValueError) as exc:
            log.error("audit spool unreadable; kept", path=str(self._spool_path), error=str(exc))
            self._spool_path = None  # do not append to a damaged spool either
            return True
        if not jobs:
            return True
        try:
            for writes in jobs:
                self._store.write(writes)
        except Exception as exc:
            self._failed(exc, "spool replay")
            return False
        self._spool_path.unlink(missing_ok=True)
        log.info("audit spool replayed", jobs=len(jobs), path=str(self._spool_path))
        return True

    def _failed(self, exc: BaseException | None, during: str) -> None:
        # Reconnect on the next attempt: after a PostgreSQL restart the old connection is dead.
        now = time.monotonic()
        if not self._failing or now - self._last_error_log >= ERROR_LOG_INTERVAL_S:
            # The first failure, then one line per interval: the cause is in the log, not only
            # healthy=false, and a long outage does not flood it.
            self._last_error_log = now
            log.error(
                "audit store failed",
                during=during,
                error_type=type(exc).__name__ if exc else None,
                error=str(exc).strip()[:1000] if exc else None,
                failing_for_s=round(now - self._failing_since, 1) if self._failing_since else 0.0,
                queued=self._queue.qsize(),
            )
        if not self._failing:
            self._failing_since = now
        self._failing = True
        self._count("error")
        store, self._store = self._store, None
        if store is not None:
            with contextlib.suppress(Exception):
                store.close()

    def _recovered(self) -> None:
        self._next_probe = time.monotonic() + self._config.health_probe_seconds
        if self._failing:
            since = self._failing_since or time.monotonic()
            log.info("audit store recovered", failed_for_s=round(time.monotonic() - since, 1))
        self._failing = False
        self._failing_since = None

    def _maybe_probe(self) -> None:
        """Idle: check the store is still there (or back), so health is honest without writes."""
        now = time.monotonic()
        if now < self._next_probe or self._stop_event.is_set():
            return
        self._next_probe = now + self._config.health_probe_seconds
        if not self._ensure_store():
            return
        assert self._store is not None
        try:
            self._store.ping()
        except Exception as exc:
            self._failed(exc, "probe")
            return
        self._recovered()

    def _maybe_purge(self) -> None:
        days = self._config.retention_days
        now = time.monotonic()
        if days is None or now < self._next_purge or not self._ensure_store():
            return
        self._next_purge = now + self._config.purge_interval
        assert self._store is not None
        try:
            purged = self._store.purge(datetime.now(UTC) - timedelta(days=days))
        except Exception as exc:
            self._failed(exc, "purge")
            return
        self._count("purged", purged)

    def _spool_remaining(self) -> None:
        """At stop: the job in flight and every queued job go to the spool (or, without one,
        or when it cannot be written, are counted dropped), with an error in the log."""
        with self._spool_lock:
            if self._spooled:
                return
            self._spooled = True
            jobs = [] if self._current is None else [self._current]
            while True:
                try:
                    jobs.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if not jobs:
                return
            self._abandoned += len(jobs)
            path = self._spool_path
            try:
                if path is None:
                    raise OSError("no spool path configured")
                spool.append(path, [job.writes for job in jobs])
            except (OSError, ValueError, TypeError) as exc:
                self._count("dropped", len(jobs))
                log.critical(
                    "audit records LOST at shutdown: the store was down and the spool failed",
                    jobs=len(jobs),
                    alerts=sum(len(w.alerts) for job in jobs for w in job.writes),
                    spool=str(path),
                    error=str(exc),
                )
                return
            self._count("spooled", len(jobs))
            log.error(
                "audit store down at shutdown: records spooled, written at the next start",
                jobs=len(jobs),
                alerts=sum(len(w.alerts) for job in jobs for w in job.writes),
                spool=str(path),
            )
