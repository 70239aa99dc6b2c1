"""The per-batch pipeline: validate -> encode (feature packs) -> rules -> events.

One Pipeline serves every stream of a sidecar; the server runs it on a single worker thread so
rule state is never touched concurrently and batches of a stream stay in order.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import structlog
import torch

from monitor.features import FeaturePack, RestrictedEncoder
from monitor.outputs.metrics import SidecarMetrics
from monitor.rules import FeatureBlock, Firing, PackFeatures, RuleEngine, RuleSet
from monitor.sidecar.columns import ConversationTable
from monitor.sidecar.config import SINGLE_THREAD_ROWS, Limits, ScopeSettings
from monitor.sidecar.firings import (
    Actions,
    AlertRedaction,
    DispatchResult,
    alert_event,
    closing_event,
    log_firing,
    ruleset_hash,
)
from monitor.sidecar.grouping import GroupState, StepGroup, merge_steps
from monitor.sidecar.validate import (
    BatchRejected,
    EncoderCatalog,
    ValidatedBatch,
    validate_batch,
)
from monitor.wire import pb

log = structlog.get_logger("safety_monitor.pipeline")


@contextmanager
def encode_threads(threads: int, restore: int) -> Iterator[None]:
    """Run the block with ``threads`` torch threads in the calling thread, then set
    ``restore`` (the pipeline's count) again if it had to change it.

    OpenMP's count is the calling thread's, but ``torch.set_num_threads`` also sets the
    process-wide value that every thread starting torch work later begins with (the parse
    thread, an in-process neighbour such as eval's sidecar thread). Restoring keeps a
    one-thread small-batch encode from leaking into those; a set costs well under 1 us.
    """
    if torch.get_num_threads() == threads:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(restore)


@dataclass(frozen=True)
class StreamClient:
    """Who sent a stream's batches: `identity` is the authenticated name (bearer token name
    or mTLS subject; empty without authentication), the scope of their conversations when
    state is scoped by client; `owner` is what their new conversations are charged to for
    fair eviction (the identity, or the connection when there is none)."""

    identity: str = ""
    owner: str = ""


ANONYMOUS = StreamClient()


@dataclass(frozen=True)
class FeatureColumn:
    """Where a feature the rules use comes from: a pack's encoder at one hook point."""

    name: str  # qualified '<pack>/<feature>'
    pack: FeaturePack
    hook_point: str
    column: int


@dataclass
class BatchOutcome:
    """What processing one batch produced: the events for the stream (alerts, then its Ack or
    BatchError), the firings, and the feature values (Evaluate only)."""

    events: list[pb.MonitorEvent]
    firings: list[Firing]
    features: dict[str, torch.Tensor | np.ndarray]  # the Evaluate RPC's; empty on a stream


class Pipeline:
    """The per-batch work of a sidecar: validate a StepBatch, encode its activations with the
    packs, evaluate the rules, hand the firings to `Actions`, and return the events for the
    stream. One Pipeline serves every stream; it runs on a single worker thread.

        pipeline = Pipeline(packs, ruleset, SidecarMetrics(), Limits())
        outcome = pipeline.process(batch)    # pb.StepBatch -> BatchOutcome
        outcome.events                       # Alerts, then the Ack or a BatchError
    """

    def __init__(
        self,
        packs: Sequence[FeaturePack],
        ruleset: RuleSet,
        metrics: SidecarMetrics,
        limits: Limits,
        actions: Actions | None = None,
        scoping: ScopeSettings | None = None,
        single_thread_rows: int = SINGLE_THREAD_ROWS,
    ) -> None:
        self.packs = list(packs)
        # Batches of at most `single_thread_rows` rows encode on one torch thread, larger
        # ones on as many as torch had when the pipeline was made (`SINGLE_THREAD_ROWS`).
        self.single_thread_rows = single_thread_rows
        self.threads = torch.get_num_threads()
        self.metrics = metrics
        self.limits = limits
        self.scoping = scoping or ScopeSettings()
        self.actions = actions
        # Redacts what the "rule fired" log lines carry; the audit settings' patterns when
        # there are actions, the built-in ones otherwise.
        self.redaction = actions.redaction if actions is not None else AlertRedaction()
        self.engine = RuleEngine(
            ruleset,
            max_conversations=limits.max_conversations,
            max_state_bytes=limits.max_rule_state_bytes,
        )
        self._configured = limits
        self.catalog = EncoderCatalog(
            d_model_of=_d_model_by_hook_point(self.packs),
            columns_of={
                (p.name, hp): (p.sha256, len(p.qualified_names(hp)))
                for p in self.packs
                for hp in p.hook_points
            },
        )
        self._use_rules(ruleset)

    @property
    def may_block(self) -> bool:
        """Whether processing a batch may wait on I/O: with an audit recorder, a flagged
        conversation's step waits for its commit (up to the store's write timeout), so such
        a pipeline must not run on the event loop. Alertmanager only enqueues."""
        return self.actions is not None and self.actions.recorder is not None

    def replace_rules(self, ruleset: RuleSet) -> None:
        """Swap in a new rule set between batches; state of unchanged rules is kept."""
        self.engine.replace_rules(ruleset)
        self._use_rules(ruleset)

    def _use_rules(self, ruleset: RuleSet) -> None:
        # What the engine can hold with these rules under the state budget is the limit a
        # batch is checked against and GetStatus reports.
        self.limits = replace(self._configured, max_conversations=self.engine.max_conversations)
        if self.engine.max_conversations < self._configured.max_conversations:
            log.warning(
                "rule state budget lowers the conversation cap",
                max_conversations=self.engine.max_conversations,
                max_rule_state_bytes=self._configured.max_rule_state_bytes,
            )
        self.ruleset = ruleset
        self.rules_hash = ruleset_hash(ruleset)
        self.columns = _feature_columns(self.packs, ruleset.required_features)
        self.required = {(c.pack.name, c.hook_point) for c in self.columns}
        # One plan per block the rules read; the narrowed sub-encoders are built here, once.
        packs = {c.pack.name: c.pack for c in self.columns}
        blocks = dict.fromkeys((c.pack.name, c.hook_point) for c in self.columns)
        self._plans = [
            _block_plan(packs[name], hook_point, self.columns) for name, hook_point in blocks
        ]
        self._narrowed = {plan.key: plan.encoder for plan in self._plans if plan.encoder}

    def process(
        self,
        batch: pb.StepBatch,
        client: StreamClient = ANONYMOUS,
        table: ConversationTable | None = None,
        decoded: Sequence[torch.Tensor | None] = (),
    ) -> BatchOutcome:
        """Run one batch through the stream's stateful rule engine; never raises on bad input.
        `decoded`: `validate.decode_layers` of the batch, if it ran already."""
        # `process_many` of this one batch, without its lists (a decode step under light
        # load comes alone).
        try:
            validated = self.validate(batch, client, table, decoded)
        except BatchRejected as rejected:
            return self._reject(batch.seq_no, rejected)
        outcomes: list[BatchOutcome | None] = [None]
        self._process_group([(0, validated)], outcomes, client)
        return outcomes[0]  # type: ignore[return-value]  # set, or an internal error

    def process_many(
        self,
        batches: Sequence[pb.StepBatch],
        client: StreamClient = ANONYMOUS,
        table: ConversationTable | None = None,
        decoded: Sequence[Sequence[torch.Tensor | None]] = (),
    ) -> list[BatchOutcome]:
        """Batches of one stream that arrived together, in order: one outcome each, exactly
        as if processed one at a time, but consecutive steps that continue the same
        conversations are evaluated as one (`grouping.py`): how the sidecar keeps up when
        decode steps queue. `client` is who sent them: the scope of their conversations'
        state and the owner new conversations are charged to. `table` is the stream's
        conversation table (the columnar sequence format); without one, only `Sequence`
        messages are accepted. `decoded`, when given, holds `validate.decode_layers` of each
        batch, done already (on the server's event loop)."""
        if len(batches) == 1:  # the light-load case (a decode step alone): no group to form
            one = decoded[0] if len(decoded) == 1 else ()
            return [self.process(batches[0], client, table, one)]
        outcomes: list[BatchOutcome | None] = [None] * len(batches)
        if len(decoded) != len(batches):
            decoded = ((),) * len(batches)
        group: list[tuple[int, ValidatedBatch]] = []
        # Built when a second step asks to join the group: a step alone (the light-load
        # case, one decode step after another) never needs it, and building it reads every
        # one of the step's slices.
        state: GroupState | None = None
        has_decode = False  # whether the group holds a decode step
        for index, batch in enumerate(batches):
            try:
                validated = self.validate(batch, client, table, decoded[index])
            except BatchRejected as rejected:  # touches no rule state: the group goes on
                outcomes[index] = self._reject(batch.seq_no, rejected)
                continue
            decode = _decode_step(validated)
            if group and decode and has_decode:
                # Two decode steps are never merged (`_decode_step`): done with the group.
                self._process_group(group, outcomes, client)
                group, state = [], None
            elif group:
                if state is None:
                    state = GroupState(group[0][1])
                # Conversations already tracked may be counted twice: the room is a lower
                # bound.
                room = self.limits.max_conversations - self.engine.tracked_conversations
                if state.fits(validated, self.limits.max_rows_per_batch, room):
                    state.add(validated)
                else:
                    self._process_group(group, outcomes, client)
                    group, state = [], None
            has_decode = decode or (bool(group) and has_decode)
            group.append((index, validated))
        if group:
            self._process_group(group, outcomes, client)
        return [outcome for outcome in outcomes if outcome is not None]

    def _process_group(
        self,
        group: list[tuple[int, ValidatedBatch]],
        outcomes: list[BatchOutcome | None],
        client: StreamClient,
    ) -> None:
        """A failure here is confined to this group's steps (each gets an internal BatchError);
        the outcomes of groups already processed stand."""
        try:
            self._evaluate_group(group, outcomes, client)
        except Exception as exc:
            errors = internal_errors([member.seq_no for _, member in group], exc, self.metrics)
            for (index, _), outcome in zip(group, errors, strict=True):
                outcomes[index] = outcome

    def _evaluate_group(
        self,
        group: list[tuple[int, ValidatedBatch]],
        outcomes: list[BatchOutcome | None],
        client: StreamClient,
    ) -> None:
        metrics = self.metrics
        started = time.perf_counter()
        # A step alone (the light-load case) is its own merged batch.
        alone = len(group) == 1
        steps = None if alone else merge_steps([member for _, member in group])
        batch = group[0][1] if steps is None else steps.merged
        # The encode's time starts after the merge (its own histogram).
        encode_started = started if alone else time.perf_counter()
        features, rules_started = self._encode(batch)
        result = self.engine.evaluate(
            features, batch.slices, model=batch.model, client=client.owner
        )
        rules_ended = time.perf_counter()
        if result.gaps:  # a metric call costs microseconds: none for nothing to count
            metrics.position_gaps.inc(result.gaps)
        if result.evicted:
            metrics.conversations_evicted.inc(result.evicted)
        metrics.show_conversations(self.engine.tracked_conversations)
        fired = result.firings
        # Without actions and firings there is nothing to dispatch.
        no_dispatch = not fired and self.actions is None
        dispatched = None if no_dispatch else self._dispatch(batch, features, fired)
        if not fired:
            # The usual step: nothing fired, nothing withheld, each step's Ack alone (what
            # the loop below gives, without its per-step lists).
            for index, member in group:
                event = pb.MonitorEvent()
                ack = event.ack
                ack.seq_no, ack.rows, ack.alerts = member.seq_no, member.rows, 0
                outcomes[index] = BatchOutcome([event], [], {})
        else:
            assert dispatched is not None
            if steps is None:
                steps = StepGroup([batch], batch)
            self._firing_outcomes(group, steps, fired, dispatched, outcomes)
        encode_seconds, rules_seconds = rules_started - encode_started, rules_ended - rules_started
        if alone:  # its metrics in one call
            metrics.record_step(
                batch.rows, encode_seconds, rules_seconds, time.perf_counter() - started
            )
            return
        metrics.encode_seconds.observe(encode_seconds)
        metrics.rules_seconds.observe(rules_seconds)
        metrics.tokens.inc(batch.rows)
        metrics.batches.inc(len(group))
        metrics.batches_grouped.inc(len(group))
        elapsed = time.perf_counter() - started
        for _ in group:  # each step waited for the whole group
            metrics.batch_seconds.observe(elapsed)

    def _firing_outcomes(
        self,
        group: list[tuple[int, ValidatedBatch]],
        steps: StepGroup,
        fired: list[Firing],
        dispatched: DispatchResult,
        outcomes: list[BatchOutcome | None],
    ) -> None:
        """Each step's firings logged, its sendable alerts, then its Ack (or BatchError)."""
        sendable = {id(firing) for firing in dispatched.sendable}
        for (index, member), firings in zip(group, steps.split(fired), strict=True):
            for firing in firings:
                log_firing(self.metrics, member, firing, self.redaction)
            sent = [firing for firing in firings if id(firing) in sendable]
            events = [alert_event(member.seq_no, firing) for firing in sent]
            events.append(
                closing_event(self.metrics, member, sent, len(firings), dispatched.audit_status)
            )
            outcomes[index] = BatchOutcome(events, firings, {})

    def evaluate_once(self, batch: pb.StepBatch, include_features: bool = False) -> BatchOutcome:
        """Score a batch with fresh rule state (the Evaluate RPC); shares no stream state.

        ``include_features`` returns every loaded pack feature the batch's hook points carry,
        not only those the rules read (with no rules loaded, the rules read none); a batch
        that no pack can encode is rejected (``no_features``) rather than answered empty."""
        try:
            # No stream, no table beyond this call: a columnar batch defines what it uses.
            table = ConversationTable(self.limits.max_conversation_slots)
            validated = self.validate(batch, table=table)
            features: Mapping[str, torch.Tensor | np.ndarray] = self.encode(validated)
            if include_features:
                features = {**self._encode_all(validated), **features}
                if not features:
                    raise BatchRejected(
                        "no_features",
                        "layers",
                        "layers: no loaded pack encodes the batch's hook point(s) "
                        f"{', '.join(sorted(validated.activations)) or '(none)'}",
                    )
        except BatchRejected as rejected:
            return self._reject(batch.seq_no, rejected)
        engine = RuleEngine(self.ruleset, max_conversations=self.limits.max_conversations)
        result = engine.evaluate(features, validated.slices, model=batch.model)
        events = [alert_event(batch.seq_no, f) for f in result.firings]
        return BatchOutcome(events, result.firings, dict(features))

    def _encode_all(self, batch: ValidatedBatch) -> dict[str, torch.Tensor]:
        """Every feature of every pack at the hook points this batch carries."""
        features: dict[str, torch.Tensor] = {}
        for pack in self.packs:
            for hook_point in pack.hook_points:
                values = batch.encoded.get((pack.name, hook_point))
                if values is None and hook_point in batch.activations:
                    values = pack.encode(hook_point, batch.activations[hook_point]).to("cpu")
                if values is None:
                    continue
                for column, name in enumerate(pack.qualified_names(hook_point)):
                    features[name] = values[:, column]
        return features

    def validate(
        self,
        batch: pb.StepBatch,
        client: StreamClient = ANONYMOUS,
        table: ConversationTable | None = None,
        decoded: Sequence[torch.Tensor | None] = (),
    ) -> ValidatedBatch:
        """Check a StepBatch against the packs, the rules' hook points and the limits; raises
        BatchRejected (reason, field, message) without touching rule state (slot definitions
        of a columnar batch do update `table`). The batch's conversations are scoped as
        configured (`ScopeSettings`) for `client`. `decoded`: `validate.decode_layers` of
        the batch, if it ran already.
        """
        scoping = self.scoping
        return validate_batch(
            batch,
            self.catalog,
            self.required,
            self.limits,
            scope=client.identity if scoping.scope == "client" else "",
            scope_attribute=scoping.attribute if scoping.scope == "attribute" else "",
            table=table,
            decoded=decoded,
        )

    def encode(self, batch: ValidatedBatch) -> Mapping[str, np.ndarray]:
        """Encode each hook point once per pack (unless the client already did) and pick out
        the columns the rules use: float32 numpy views of the encoded block (a numpy column
        view costs a fraction of a torch one, and the rules engine runs on numpy). When the
        rules read one block only (the usual case), the mapping is a ``FeatureBlock``, from
        which the engine gathers them all with one call."""
        started = time.perf_counter()
        features, ended = self._encode(batch)
        self.metrics.encode_seconds.observe(ended - started)
        return features

    def _encode(self, batch: ValidatedBatch) -> tuple[Mapping[str, np.ndarray], float]:
        """``encode`` (its time not observed), and when it ended. A block the client encoded
        (full width) is read with the pack's column index; one encoded here may be narrowed
        to the rules' columns (``_BlockPlan``) and is read with the narrowed index."""
        plans = self._plans
        client_encoded = batch.encoded
        if len(plans) == 1:  # the usual case: the rules read one pack's block
            plan = plans[0]
            values = client_encoded.get(plan.key) if client_encoded else None
            if values is not None:
                return FeatureBlock(_cpu_float32(values), plan.full_index), time.perf_counter()
            values = self.encode_block(plan.pack, plan.key[1], batch)
            return FeatureBlock(_cpu_float32(values), plan.index), time.perf_counter()
        features: dict[str, np.ndarray] = {}
        for plan in plans:
            values = client_encoded.get(plan.key) if client_encoded else None
            index = plan.full_index
            if values is None:
                values = self.encode_block(plan.pack, plan.key[1], batch)
                index = plan.index
            block = _cpu_float32(values)
            for name, column in index.items():
                features[name] = block[:, column]
        return features, time.perf_counter()

    def encode_block(
        self, pack: FeaturePack, hook_point: str, batch: ValidatedBatch
    ) -> torch.Tensor:
        """One pack's encode of one hook point's activations (the matrix multiply): of only
        the columns the loaded rules read when that block is narrowed (``_BlockPlan``; its
        ``index`` says where each feature is), else the pack's full block."""
        activations = batch.activations[hook_point]
        threads = 1 if len(activations) <= self.single_thread_rows else self.threads
        with encode_threads(threads, self.threads):
            narrowed = self._narrowed.get((pack.name, hook_point))
            if narrowed is not None:
                return narrowed.encode(activations)
            return pack.encode(hook_point, activations)

    def encoded_width(self, pack: FeaturePack, hook_point: str) -> int:
        """How many columns ``encode_block`` computes for this block: the narrowed width
        (padding included) when it is narrowed, else the pack's full width."""
        narrowed = self._narrowed.get((pack.name, hook_point))
        return len(pack.qualified_names(hook_point)) if narrowed is None else narrowed.k

    def _dispatch(
        self, batch: ValidatedBatch, features: Mapping[str, np.ndarray], firings: list[Firing]
    ) -> DispatchResult:
        """Audit and Alertmanager: which alerts may be sent now (an alert of an `audit` rule
        only once its record is durable)."""
        if self.actions is None:
            return DispatchResult(list(firings), 0, "off")
        return self.actions.dispatch(batch, self.rules_hash, features, firings)

    def _reject(self, seq_no: int, rejected: BatchRejected) -> BatchOutcome:
        self.metrics.batches_rejected.labels(reason=rejected.reason).inc()
        log.warning(
            "batch rejected",
            seq_no=seq_no,
            reason=rejected.reason,
            field=rejected.field,
            error=rejected.message,
        )
        error = pb.BatchError(
            seq_no=seq_no, reason=rejected.reason, field=rejected.field, message=rejected.message
        )
        return BatchOutcome([pb.MonitorEvent(error=error)], [], {})


def _decode_step(step: ValidatedBatch) -> bool:
    """Whether `step` is a decode step: one row for each of its conversations. Two such
    steps are never merged (`process_many`; other steps still join them): the rules engine
    evaluates one row per conversation with its one-token kernel, and a merged group takes
    its general path, which costs more than the steps one at a time. Observed on 2026-12-02
    with timing code that was not kept (so not a reproducible benchmark): a 64-conversation
    decode step of `bench sidecar` (20 rules, 10 temporal), in process on one core: 0.62 ms alone;
    two merged 1.83 ms (rules 0.91 against 0.19), eight merged 4.73 (0.59 a step). In the
    sidecar, with the event loop parsing the next steps beside it, a merged pair took 3.2 ms
    of the pipeline thread's CPU against 0.9 for one step, so a stream that fell behind paid
    more per step on the pipeline thread than it had inline, and stayed behind (the
    send-to-ack tail of `bench sidecar`, issue 15). The events are the same either way: a
    group's are those of its steps one at a time."""
    return step.rows == len(step.slices) and all(sl.rows == 1 for sl in step.slices)


def _cpu_float32(values: torch.Tensor) -> np.ndarray:
    """A float32 numpy view of an encoded block (the rules engine runs on CPU, on numpy): the
    tensor itself when it is one already (the usual case: one torch call, not three)."""
    if values.dtype is torch.float32:
        try:
            return values.numpy()
        except (RuntimeError, TypeError):  # on a GPU, or needs grad
            pass
    return values.detach().to("cpu", torch.float32).numpy()


def _d_model_by_hook_point(packs: Sequence[FeaturePack]) -> dict[str, int]:
    d_model_of: dict[str, int] = {}
    for pack in packs:
        for hook_point in pack.hook_points:
            d_model = pack.d_model(hook_point)
            if d_model_of.setdefault(hook_point, d_model) != d_model:
                raise ValueError(
                    f"pack {pack.name!r}: {hook_point} has d_model {d_model}, another pack "
                    f"says {d_model_of[hook_point]}"
                )
    return d_model_of


# Width multiple of a narrowed encoder: MKL picks another kernel (another summation order)
# for a few output columns, so 20 of 256 columns come out a few ulp off the full block's; at
# a multiple of 16 they came out bit-identical for full widths that are multiples of 16
# (checked on AVX2 MKL, 1-4,096 rows). The zero columns cost less than the mismatch.
NARROW_MULTIPLE = 16


@dataclass(frozen=True)
class _BlockPlan:
    """How the pipeline encodes one (pack, hook point) block the rules read. ``encoder``: a
    sub-encoder of only the read columns, when the block's encoder is column-separable
    (a ``RestrictedEncoder``, not an exact TopK, which needs every latent) and the rules read
    fewer columns than it has; None: the pack's full encode. ``index``: feature name ->
    column of what the sidecar's encode returns; ``full_index``: of the pack's full block (a
    client-encoded block). Built once per rule load; the engine caches columns per index
    object, so both stay the same objects between loads."""

    key: tuple[str, str]
    pack: FeaturePack
    encoder: RestrictedEncoder | None
    index: dict[str, int]
    full_index: dict[str, int]


def _block_plan(pack: FeaturePack, hook_point: str, columns: Sequence[FeatureColumn]) -> _BlockPlan:
    key = (pack.name, hook_point)
    read = [c for c in columns if (c.pack.name, c.hook_point) == key]
    full_index = {c.name: c.column for c in read}
    encoder = pack.hook_points[hook_point].encoder
    width = len(read) + -len(read) % NARROW_MULTIPLE
    if not isinstance(encoder, RestrictedEncoder) or width >= encoder.k:
        return _BlockPlan(key, pack, None, full_index, full_index)
    narrowed = encoder.subset([c.column for c in read], NARROW_MULTIPLE)
    return _BlockPlan(key, pack, narrowed, {c.name: i for i, c in enumerate(read)}, full_index)


def _feature_columns(packs: Sequence[FeaturePack], required: set[str]) -> list[FeatureColumn]:
    columns = []
    for pack in packs:
        for hook_point in pack.hook_points:
            for index, name in enumerate(pack.qualified_names(hook_point)):
                if name in required:
                    columns.append(FeatureColumn(name, pack, hook_point, index))
    return columns


def qualified_feature_names(packs: Sequence[FeaturePack]) -> PackFeatures:
    """Every '<pack>/<feature>' the loaded packs provide (for rule validation), with its
    calibrated alert threshold (what a rule's ``thresholds:`` entry naming it takes) and its
    recorded aggregation (what ``pooled()`` expands from)."""
    return PackFeatures.of(packs)


def internal_errors(
    seq_nos: Sequence[int], exc: Exception, metrics: SidecarMetrics
) -> list[BatchOutcome]:
    """The one guard against our own bugs: logs `exc` (call it from the `except` block), counts
    the batches as rejected for `internal`, and gives each an internal BatchError, so a bug
    never kills a stream."""
    log.exception("internal error processing batches", seq_nos=list(seq_nos))
    metrics.batches_rejected.labels(reason="internal").inc(len(seq_nos))
    outcomes = []
    for seq_no in seq_nos:
        error = pb.BatchError(
            seq_no=seq_no,
            reason="internal",
            field="",
            message=f"internal error: {type(exc).__name__}",
        )
        outcomes.append(BatchOutcome([pb.MonitorEvent(error=error)], [], {}))
    return outcomes
