"""From one vLLM forward pass to per-conversation slices, without importing vLLM.

vLLM's V1 model runner flattens every scheduled token of a step into one `[num_tokens, hidden]`
tensor: the requests of the persistent batch in order, each with its scheduled tokens
contiguous (a prefill chunk, a single decode token, or a whole prompt). The scheduler output
says how many tokens each request runs and how many it had computed before (the position of
its first scheduled token). This module turns that layout into `CapturedStep` slices:

- each request's rows go to its conversation at their true positions;
- rows a request computes again (after preemption, vLLM recomputes from its last cached
  block) are skipped, so no token is sent twice;
- a request whose first computed token is past what was sent (prefix caching: cached tokens
  are not recomputed) is sent from its true position; the sidecar sees the gap;
- rows at positions before the request's prompt length carry the prompt's role
  (`sm_prompt_role`, default `user`), the others the output's (`sm_role`, default
  `assistant`). A step computes a request's prompt (in chunks) and then one output token at a
  time, so a slice is normally all prompt or all output; one that spans the prompt's end is
  split into two sequences (they go out in two messages, in order, as the sidecar refuses a
  message naming a conversation twice);
- the slice holding the prompt's last token (the whole prompt, or a chunked prefill's last
  chunk) is marked as ending the prompt's turn (`Sequence.turn_end`). The end of the output
  is learnt only in the next step, once its last row has gone (see the worker's `_finish`).

Kept free of vLLM imports so it is unit-tested in the main environment.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

# Keys read from `SamplingParams.extra_args` (Python) or `vllm_xargs` (the OpenAI server).
CONVERSATION_KEY = "sm_conversation_id"
ROLE_KEY = "sm_role"  # the role of the request's output (generated tokens)
PROMPT_ROLE_KEY = "sm_prompt_role"  # the role of its prompt (the templated input tokens)
ATTRIBUTES_KEY = "sm_attributes"  # a mapping, or a JSON object string (vllm_xargs is flat)
# Set by the plugin in the frontend process: the request id the user gave (vLLM appends a
# random suffix to it internally) and, for `n > 1`, which of the n sequences this is.
REQUEST_KEY = "_sm_request_id"
SEQUENCE_KEY = "_sm_sequence"

DEFAULT_ROLE = "assistant"
DEFAULT_PROMPT_ROLE = "user"
# The sidecar's default limits (`limits:` in its config): a sequence over one of them gets its
# whole message refused, and with it the step of every request sharing that message, so a
# request naming itself past them is served under its own id instead (see NamingError).
# Fixed here, not read from the sidecar (its GetStatus is asked by the relay process, not the
# worker): a sidecar configured with lower limits refuses such a message (README says so).
MAX_ID_CHARS = 256  # conversation and request ids
_MAX_ROLE_CHARS = 64
_MAX_ATTRIBUTES = 16
_MAX_KEY_CHARS = 64
_MAX_VALUE_CHARS = 256
# vLLM makes request ids unique as f"{user_id}-{8 random hex chars}"; children of an n > 1
# request are f"{index}_{that}". Used only when the frontend did not tag the request.
_INTERNAL_SUFFIX = re.compile(r"-[0-9a-f]{8}$")
_CHILD_PREFIX = re.compile(r"^[0-9]+_")


class NamingError(ValueError):
    """A request's extra_args name a conversation in a way the monitor cannot accept."""


@dataclass(frozen=True)
class RequestTag:
    """Who a vLLM request's tokens belong to: `role` is the role of its output tokens,
    `prompt_role` the role of its prompt tokens."""

    conversation_id: str
    request_id: str
    role: str = DEFAULT_ROLE
    attributes: Mapping[str, str] = field(default_factory=dict)
    # Named through extra_args: the conversation may go on in later requests, so it is not
    # ended when this request finishes.
    explicit: bool = False
    prompt_role: str = DEFAULT_PROMPT_ROLE

    def for_prompt(self) -> RequestTag:
        """The tag a slice of prompt rows carries: this one with `role` the prompt's role
        (itself when both roles are the same)."""
        return self if self.prompt_role == self.role else replace(self, role=self.prompt_role)


def tag_request(
    internal_id: str,
    extra_args: Mapping[str, Any] | None,
    ignore_conversation_ids: bool = False,
    ignore_roles_and_attributes: bool = False,
) -> RequestTag:
    """The conversation a request belongs to, from its `extra_args`.

    Without `sm_conversation_id` the request id the user gave is the conversation id. With
    `ignore_conversation_ids` (the operator's switch for deployments whose API users are not
    trusted to name conversations) it is vLLM's internal id: the user's request id plus the
    random suffix vLLM adds, so no client can name, and so join, another request's
    conversation (through `vllm serve`, `X-Request-Id` or the body's `request_id` choose the
    user's request id). With `n > 1` the sequences become `<id>/<j>`, as with the
    transformers client. `sm_prompt_role` names the prompt's role (default `user`), `sm_role`
    the output's (default `assistant`). With `ignore_roles_and_attributes` (the operator's
    second switch) both role keys and `sm_attributes` are ignored: the default roles, no
    attributes.

    >>> tag = tag_request("r-0a1b2c3d", {"sm_conversation_id": "c", "sm_role": "bot"})
    >>> (tag.prompt_role, tag.role)
    ('user', 'bot')
    >>> tag_request("r-0a1b2c3d", {"sm_role": "x"}, ignore_roles_and_attributes=True).role
    'assistant'
    """
    extra = extra_args or {}
    request_id = extra.get(REQUEST_KEY)
    if not isinstance(request_id, str) or not request_id:
        request_id = _INTERNAL_SUFFIX.sub("", internal_id)
    request_id = bounded_id(request_id)
    named = CONVERSATION_KEY in extra and not ignore_conversation_ids
    conversation = extra.get(CONVERSATION_KEY, request_id) if named else request_id
    sequence = extra.get(SEQUENCE_KEY)
    if ignore_conversation_ids:
        # n > 1 children are "<j>_<parent's internal id>": the sequences share the parent's.
        conversation = internal_id if sequence is None else _CHILD_PREFIX.sub("", internal_id)
    if not isinstance(conversation, str) or not conversation:
        raise NamingError(f"{CONVERSATION_KEY} must be a non-empty string, got {conversation!r}")
    if named and not _encodable(conversation):
        raise NamingError(f"{CONVERSATION_KEY} is not valid Unicode text")
    if isinstance(sequence, int) and not isinstance(sequence, bool):
        conversation = f"{conversation}/{sequence}"
    if named and len(conversation) > MAX_ID_CHARS:
        raise NamingError(f"{CONVERSATION_KEY} is longer than {MAX_ID_CHARS} characters")
    conversation = bounded_id(conversation)  # a long request id of vLLM's (n > 1 suffix)
    if ignore_roles_and_attributes:
        return RequestTag(conversation, request_id, DEFAULT_ROLE, {}, named, DEFAULT_PROMPT_ROLE)
    role = _role(extra, ROLE_KEY, DEFAULT_ROLE)
    prompt_role = _role(extra, PROMPT_ROLE_KEY, DEFAULT_PROMPT_ROLE)
    attributes = _attributes(extra.get(ATTRIBUTES_KEY))
    return RequestTag(conversation, request_id, role, attributes, named, prompt_role)


def _role(extra: Mapping[str, Any], key: str, default: str) -> str:
    role = extra.get(key, default)
    if not isinstance(role, str) or not role or len(role) > _MAX_ROLE_CHARS:
        raise NamingError(
            f"{key} must be a non-empty string of at most {_MAX_ROLE_CHARS} characters"
        )
    if not _encodable(role):
        raise NamingError(f"{key} is not valid Unicode text")
    return role


def _attributes(raw: object) -> dict[str, str]:
    if raw is None:
        return {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise NamingError(f"{ATTRIBUTES_KEY}: not a JSON object ({exc.msg})") from None
    if not isinstance(raw, Mapping):
        raise NamingError(f"{ATTRIBUTES_KEY} must be a mapping of strings")
    if len(raw) > _MAX_ATTRIBUTES:
        raise NamingError(f"{ATTRIBUTES_KEY}: more than {_MAX_ATTRIBUTES} attributes")
    attributes = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not isinstance(value, str | int | float | bool):
            raise NamingError(f"{ATTRIBUTES_KEY}: {key!r} must map to a string")
        if not key or len(key) > _MAX_KEY_CHARS:
            raise NamingError(f"{ATTRIBUTES_KEY}: keys are 1 to {_MAX_KEY_CHARS} characters")
        text = str(value)
        if len(text) > _MAX_VALUE_CHARS:
            raise NamingError(f"{ATTRIBUTES_KEY}: {key!r} is longer than {_MAX_VALUE_CHARS}")
        if not _encodable(key) or not _encodable(text):
            raise NamingError(f"{ATTRIBUTES_KEY}: {key!r} is not valid Unicode text")
        attributes[key] = text
    return attributes


def _encodable(text: str) -> bool:
    """Whether a protobuf string can carry `text` (UTF-8). A Python string may hold lone
    surrogates (JSON's "\\ud800" escape decodes to one, and vLLM's server parses request
    bodies with `json.loads`); building the message would then fail and the whole step,
    every request in it, would be dropped."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def bounded_id(text: str) -> str:
    """`text` if it fits the sidecar's id limit and a protobuf string can carry it, else a
    prefix of it (lone surrogates replaced) and a hash of the whole (distinct ids stay
    distinct): ids the plugin does not choose (the request ids users give vLLM) must not get
    a message refused or make it fail to build."""
    if len(text) <= MAX_ID_CHARS and _encodable(text):
        return text
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    prefix = text[: MAX_ID_CHARS - 17].encode("utf-8", "replace").decode("utf-8")
    return f"{prefix}~{digest}"


class Slice(NamedTuple):
    """Rows of one request in a flattened step: `rows[start:stop]` hold the tokens at
    positions `position .. position + stop - start - 1`. (A named tuple: one is made per
    request per step, and a tuple is the cheapest immutable record to make.)"""

    request: str  # vLLM's internal request id
    tag: RequestTag  # `tag.role` is these rows' role (the prompt's or the output's)
    start: int
    stop: int
    position: int
    # The last row is the prompt's last token: the prompt's turn ends there (a chunked
    # prefill's last chunk; never a decode step's slice).
    turn_end: bool = False

    @property
    def rows(self) -> int:
        return self.stop - self.start


class StepSlices(list[Slice]):
    """One step's slices, in batch order, and how many of them are prompt rows (0 on a decode
    step): the worker keys its per-step plans by request ids alone only when that is 0. The
    count travels with the slices it describes, not in the splitter's state."""

    __slots__ = ("prompt_slices",)

    def __init__(self, slices: list[Slice], prompt_slices: int) -> None:
        super().__init__(slices)
        self.prompt_slices = prompt_slices


@dataclass
class _Tracked:
    tag: RequestTag
    prompt_tag: RequestTag  # `tag.for_prompt()`, made once
    prompt_tokens: int = 0  # positions below this are the prompt's
    sent_until: int = 0  # next position not yet sent
    wire_id: str = ""  # `bounded_id` of the internal id, when it differs from it


class BatchSplitter:
    """Per-request state across steps: tags, what was sent, which requests a conversation has
    in flight (a conversation ends with the last of them). Thread-safe: alerts arrive on
    another thread."""

    def __init__(self, max_requests: int = 100_000) -> None:
        self.max_requests = max_requests
        self._requests: OrderedDict[str, _Tracked] = OrderedDict()
        self._by_conversation: dict[str, set[str]] = {}
        # Wire id -> internal id, for the requests sent under another id (`bounded_id`): an
        # alert names the wire id, and finding it must not hash every tracked id.
        self._by_wire_id: dict[str, str] = {}
        self._lock = threading.Lock()
        # The decode run whose positions may be ahead of its records' `sent_until` (it
        # writes them only when they are read: `_settle`).
        self._run: DecodeRun | None = None
        self.skipped_rows = 0  # recomputed rows not sent again
        self.gaps = 0  # requests whose first computed token was past what was sent
        self.straddles = 0  # slices split in two at the prompt's end

    def track(self, internal_id: str, tag: RequestTag, prompt_tokens: int = 0) -> None:
        """Remember a request the first time it is scheduled; its positions below
        `prompt_tokens` are its prompt's (0: every row is the output's)."""
        with self._lock:
            if internal_id in self._requests:
                return
            wire_id = bounded_id(internal_id)
            if wire_id != internal_id:
                self._by_wire_id[wire_id] = internal_id
            else:
                wire_id = ""
            self._requests[internal_id] = _Tracked(
                tag, tag.for_prompt(), prompt_tokens, wire_id=wire_id
            )
            self._by_conversation.setdefault(tag.conversation_id, set()).add(internal_id)
            while len(self._requests) > self.max_requests:
                old, tracked = self._requests.popitem(last=False)
                self._unlink(old, tracked)

    def set_prompt_tokens(self, internal_id: str, prompt_tokens: int) -> None:
        """A tracked request's prompt length changed (vLLM's streaming-input sessions append
        input to a running request: what it generated so far becomes prompt, and the new
        input is prompt too). Rows already sent keep the role they were sent with."""
        with self._lock:
            tracked = self._requests.get(internal_id)
            if tracked is not None:
                tracked.prompt_tokens = prompt_tokens

    def untracked(self, internal_ids: Sequence[str]) -> list[str]:
        """Those of `internal_ids` not tracked yet (one call per step, not one per request)."""
        requests = self._requests
        return [r for r in internal_ids if r not in requests]

    def tracked(self) -> list[str]:
        """Every tracked request's internal id."""
        with self._lock:
            return list(self._requests)

    def state(self, internal_id: str) -> tuple[RequestTag, int] | None:
        """A tracked request's tag and the next position not yet sent."""
        with self._lock:
            self._settle(keep=True)
            tracked = self._requests.get(internal_id)
            return None if tracked is None else (tracked.tag, tracked.sent_until)

    def finish(self, internal_ids: Sequence[str] | set[str]) -> None:
        """Forget finished or aborted requests."""
        with self._lock:
            self._settle(keep=True)
            for internal_id in internal_ids:
                tracked = self._requests.pop(internal_id, None)
                if tracked is not None:
                    self._unlink(internal_id, tracked)

    def request_named(self, wire_id: str) -> str:
        """The tracked request sent under `wire_id` (`bounded_id` of its internal id); else
        `wire_id` itself."""
        with self._lock:
            return self._by_wire_id.get(wire_id, wire_id)

    def requests_of(self, conversation_id: str) -> list[str]:
        """vLLM request ids currently computing tokens for a conversation."""
        with self._lock:
            return sorted(self._by_conversation.get(conversation_id, ()))

    def split(
        self, req_ids: Sequence[str], num_tokens: Sequence[int], computed: Sequence[int]
    ) -> StepSlices:
        """The step's slices: `req_ids[i]` ran `num_tokens[i]` tokens starting at position
        `computed[i]`, in this order in the flattened batch. Advances what was sent. The
        counts and positions are Python ints (the caller converts them once, with tolist).
        Each slice is all prompt rows or all output rows (its tag's role says which); a
        request's rows that span the prompt's end become two slices, prompt first; the result
        says how many slices are prompt rows (`StepSlices.prompt_slices`). A prompt slice
        whose last row is the prompt's last token is marked `turn_end`."""
        slices = []
        offset = 0
        prompt_slices = 0
        requests = self._requests
        with self._lock:
            self._settle(keep=False)  # the step did not continue the run (or none runs)
            for internal_id, count, first in zip(req_ids, num_tokens, computed, strict=True):
                start = offset
                offset += count
                tracked = requests.get(internal_id)
                if tracked is None or count <= 0:
                    continue
                sent = tracked.sent_until
                if first < sent:  # recomputed after preemption: those rows were sent
                    skip = min(count, sent - first)
                    self.skipped_rows += skip
                    if skip == count:
                        continue
                    start += skip
                    first += skip
                elif first > sent:
                    self.gaps += 1
                end = first + offset - start
                tracked.sent_until = end
                prompt = tracked.prompt_tokens
                if first >= prompt:  # output rows: every decode step takes only this branch
                    slices.append(Slice(internal_id, tracked.tag, start, offset, first))
                    continue
                prompt_slices += 1
                prompt_tag = tracked.prompt_tag
                if end <= prompt:  # the chunk that computes the prompt's last token ends it
                    slices.append(
                        Slice(internal_id, prompt_tag, start, offset, first, end == prompt)
                    )
                    continue
                # Spans the prompt's end. The scheduler computes the last prompt token in one
                # step and samples the first output from it, so a fresh request does not get
                # here; rows recomputed after preemption are skipped above. Split, never
                # mis-tag (nor miss the prompt's turn end), whatever path leads here.
                self.straddles += 1
                middle = start + prompt - first
                slices.append(Slice(internal_id, prompt_tag, start, middle, first, True))
                slices.append(Slice(internal_id, tracked.tag, middle, offset, prompt))
        return StepSlices(slices, prompt_slices)

    def decode_run(self, req_ids: Sequence[str], slices: StepSlices) -> DecodeRun | None:
        """A DecodeRun for the steps after this one, if this step (`split(req_ids, ...)`'s
        result) was a pure decode step: every request of `req_ids` tracked and sent one
        output row, in batch order. None otherwise."""
        if slices.prompt_slices or len(slices) != len(req_ids):
            return None
        records = []
        with self._lock:
            for index, (piece, internal_id) in enumerate(zip(slices, req_ids, strict=True)):
                tracked = self._requests.get(internal_id)
                if piece.request != internal_id or piece.start != index or piece.stop != index + 1:
                    return None
                if tracked is None or tracked.sent_until != piece.position + 1:
                    return None
                records.append(tracked)
            # A copy: the caller's list may be vLLM's, which it rewrites in place.
            run = DecodeRun(list(req_ids), [s.position + 1 for s in slices], records)
            self._run = run
        return run

    def _settle(self, keep: bool) -> None:
        """Under the lock: write the decode run's positions into its requests' records
        (`sent_until`), before anything reads or writes them; `keep`: the run goes on.
        Only the model runner's thread advances a run (`DecodeRun.advance`, one reference
        assignment), and every write of `sent_until` happens here or in `split` (which
        ends the run first), so a settle never writes a position older than one written."""
        run = self._run
        if run is None:
            return
        for tracked, position in zip(run.records, run.expected, strict=True):
            tracked.sent_until = position
        if not keep:
            self._run = None

    def _unlink(self, internal_id: str, tracked: _Tracked) -> None:
        if tracked.wire_id:
            self._by_wire_id.pop(tracked.wire_id, None)
        conversation_id = tracked.tag.conversation_id
        members = self._by_conversation.get(conversation_id)
        if members is not None:
            members.discard(internal_id)
            if not members:
                del self._by_conversation[conversation_id]

    def __len__(self) -> int:
        return len(self._requests)


class DecodeRun:
    """A run of pure decode steps over one batch composition: the same requests in the same
    order, one token each, each at the position after the last one sent. Such a step splits
    exactly as the one before it with every position one further, so the worker sends it
    without `split` (and without planning or slicing it again): `matches` recognises it
    from the layout alone and `advance` does the bookkeeping `split` would do (each
    request's next position to send). Anything else (a request joining, leaving, finishing
    or preempted, a prompt chunk, recomputed or skipped positions, a new order) fails
    `matches` and goes through `split`, which starts a new run when the step qualifies.
    The worker drops its run whenever a request finishes (the next step then goes through
    `split`). `advance` only notes the positions: the splitter writes them into its
    records whenever they are read or written (`BatchSplitter._settle`, from `state`,
    `finish` and `split`, under its lock), as taking its lock and writing each record every
    step cost more than the rest of the step's bookkeeping; so the splitter's run can
    outlive the worker's until the next `split`."""

    __slots__ = ("expected", "ones", "records", "req_ids")

    def __init__(self, req_ids: list[str], expected: list[int], records: list[_Tracked]) -> None:
        self.req_ids = req_ids
        self.ones = [1] * len(req_ids)  # the step's tokens per request, and rows per slice
        self.expected = expected  # each request's position in the next decode step
        self.records = records  # the splitter's per-request state, in batch order

    def matches(self, req_ids: Sequence[str], num_tokens: list[int], computed: list[int]) -> bool:
        """Whether a step (the layout `split` takes, as lists) continues this run."""
        return computed == self.expected and num_tokens == self.ones and req_ids == self.req_ids

    def advance(self, computed: list[int]) -> None:
        """Record a matching step as sent (its positions are `computed`): one assignment,
        which the splitter settles into its records when they are read."""
        self.expected = [position + 1 for position in computed]


def group_by_attributes(slices: Sequence[Slice]) -> list[list[Slice]]:
    """Slices grouped so each group shares one attribute set (a wire message carries one
    attribute map for all its sequences); the common case is a single group. A group holds a
    conversation once: two requests running for one conversation in the same step (a retry
    while the first still runs, a reused request id or `sm_conversation_id`) go to separate
    groups, as the sidecar refuses a batch that names a conversation twice, which would lose
    the step of every other conversation in it."""
    groups: dict[tuple[tuple[str, str], ...], list[tuple[set[str], list[Slice]]]] = {}
    ordered: list[list[Slice]] = []
    for piece in slices:
        candidates = groups.setdefault(tuple(sorted(piece.tag.attributes.items())), [])
        conversation_id = piece.tag.conversation_id
        found = next((c for c in candidates if conversation_id not in c[0]), None)
        if found is None:
            found = (set(), [])
            candidates.append(found)
            ordered.append(found[1])
        found[0].add(conversation_id)
        found[1].append(piece)
    return ordered


@dataclass(frozen=True)
class RankPlan:
    """Which worker sends: the residual stream is identical on every tensor-parallel rank
    after the all-reduce, so only TP rank 0 sends; with pipeline parallelism the stage that
    owns the chosen layers sends."""

    sends: bool
    reason: str


def plan_rank(
    layers: Sequence[int],
    tp_rank: int,
    pp_rank: int,
    pp_size: int,
    stage_layers: tuple[int, int],
) -> RankPlan:
    """Decide whether this worker sends. Raises ValueError when the chosen layers span
    pipeline stages (each step must carry all of a token's hook points in one message)."""
    start, end = stage_layers
    owned = [layer for layer in layers if start <= layer < end]
    if owned and len(owned) != len(layers):
        raise ValueError(
            f"safety-monitor: layers {sorted(layers)} span pipeline stages (stage {pp_rank} "
            f"owns layers {start}..{end - 1}); choose layers that one stage owns"
        )
    if not owned:
        return RankPlan(False, f"pipeline stage {pp_rank}/{pp_size} owns none of the layers")
    if tp_rank != 0:
        return RankPlan(False, f"tensor-parallel rank {tp_rank}: rank 0 sends")
    return RankPlan(True, f"pipeline stage {pp_rank}/{pp_size}, tensor-parallel rank 0")
