"""The worker side: capture buffers on the model, one CapturedStep per forward pass, and
the alerts that ask to block a request.

Patched into vLLM's V1 model runner (`GPUModelRunner`, which the CPU runner extends):

- `load_model`: after the model is built (before it is first compiled), choose this rank's
  role, give each chosen decoder layer a capture buffer and start the CaptureClient (the
  same ring, relay process, fail-open/closed semantics and metrics as the transformers
  client);
- `_prepare_inputs`: keep the flattened batch's layout (request order, tokens per request,
  position of each request's first token), exactly as the runner computes it;
- `execute_model`: after the forward, read that layout and the first `num_tokens` rows of
  each buffer, and send them split per request (batch.py);
- `sample_tokens`: hand the engine core the requests a `block` alert asked to stop, on the
  ModelRunnerOutput (it travels to the scheduler process with the output; guard.py).

Each slice goes out with vLLM's internal request id (the id the user gave plus vLLM's random
suffix, unique in the engine and never shown to API clients) as its request id, so the alert a
rule raises names the one request whose token fired it, and a `block` stops that request only:
conversation ids and user request ids come from the request and may be shared or guessed.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import structlog
import torch

from monitor.capture.layers import find_layer_list
from monitor.capture.steps import CapturedStep, Tagging
from monitor.capture.vllm import op
from monitor.capture.vllm.batch import (
    REQUEST_KEY,
    SEQUENCE_KEY,
    BatchSplitter,
    DecodeRun,
    NamingError,
    RequestTag,
    Slice,
    StepSlices,
    bounded_id,
    group_by_attributes,
    plan_rank,
    tag_request,
)
from monitor.capture.vllm.config import PluginSettings
from monitor.hookpoints import hook_point_name

log = structlog.get_logger("safety_monitor.capture.vllm")

_MAX_PENDING_BLOCKS = 10_000
_KEEP_RECENT_ENDS = 100
_MAX_PLANS = 256
_MAX_VIEWS = 1024


class PluginTiming:
    """Time the plugin spends on the model runner's thread (reading the layout, splitting and
    submitting each step, handing blocks back): thread CPU time, which a busy machine does
    not inflate, and wall time. `steps` counts the forward passes it handled (the calls
    that only report finished requests add their time, not a step). Not timed: finding
    the capture on the runner and keeping the layout's two references after
    `_prepare_inputs` (a clock read costs more than either)."""

    __slots__ = ("cpu_ns", "steps", "wall_ns")

    def __init__(self) -> None:
        self.cpu_ns = 0
        self.wall_ns = 0
        self.steps = 0

    def add(self, cpu_started: int, wall_started: int, step: bool = False) -> None:
        """Add the time since `cpu_started` (thread_time_ns) and `wall_started`
        (perf_counter_ns); `step` at the end of a forward pass's work."""
        self.cpu_ns += time.thread_time_ns() - cpu_started
        self.wall_ns += time.perf_counter_ns() - wall_started
        self.steps += step


class WorkerCapture:
    """One per model runner: buffers, the request bookkeeping and the capture client."""

    # The current run of pure decode steps and how its steps go out (see `after_forward`):
    # the run, its tagging and row views, and the step that started it.
    _decode: tuple[DecodeRun, Tagging, dict[str, torch.Tensor], CapturedStep] | None = None

    def __init__(self, settings: PluginSettings, runner: Any) -> None:
        from vllm.distributed import get_pp_group, get_tp_group

        self.settings = settings
        config = runner.vllm_config
        if config.speculative_config is not None:
            raise RuntimeError(speculative_refusal(config.speculative_config))
        model = runner.get_model()
        layer_list = find_layer_list(model)
        count = len(layer_list)
        layers = []
        for index in settings.layers:
            if not -count <= index < count:
                raise ValueError(
                    f"safety-monitor: layer {index} out of range; the model has {count} "
                    f"decoder layers (0..{count - 1})"
                )
            layers.append(index % count)
        base = _base_model(model)
        stage = (getattr(base, "start_layer", 0), getattr(base, "end_layer", count))
        pp, tp = get_pp_group(), get_tp_group()
        self.plan = plan_rank(layers, tp.rank_in_group, pp.rank_in_group, pp.world_size, stage)
        self.is_output_rank = pp.is_last_rank and tp.rank_in_group == 0
        self.hook_points = [hook_point_name(index) for index in layers]
        self.buffers: dict[str, torch.Tensor] = {}
        self.splitter = BatchSplitter()
        self.client = None
        self._layout: tuple[Any, Any] | None = None  # the input batch and token counts
        self._blocks: dict[str, str] = {}
        self._blocks_lock = threading.Lock()
        self.block_requests = 0  # block alerts that named a request in flight
        self.blocks_unmatched = 0  # block alerts for a request no longer (or never) in flight
        self.conversations_ended = 0  # end messages sent for conversations named by requests
        # Zero-row turn-end messages sent for answers of conversations named by
        # `sm_conversation_id` (one per finished request; see `_finish`).
        self.turn_ends_sent = 0
        self.recent_ends: deque[str] = deque(maxlen=_KEEP_RECENT_ENDS)  # their ids, for reports
        self.guard_timeouts = 0  # steps released without the sidecar's verdict (fail-open)
        self.steps = 0
        self.naming_errors = 0
        self.timing = PluginTiming()
        self._plans: dict[tuple[Any, ...], list[tuple[tuple[int, ...], Tagging]]] = {}
        self._views: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self._decode = None
        self._on_cuda = False
        if not self.plan.sends:
            log.info("safety-monitor: this rank does not send", reason=self.plan.reason)
            return
        if settings.guard and not self.is_output_rank:
            log.warning(
                "safety-monitor: the `block` action cannot stop requests from this rank "
                "(its outputs do not reach the scheduler); block alerts are only logged",
                reason=self.plan.reason,
            )
        rows = max(runner.max_num_tokens, _cudagraph_max(config))
        hidden = config.model_config.get_hidden_size()
        dtype = config.model_config.dtype
        for index, hook_point in zip(layers, self.hook_points, strict=True):
            self.buffers[hook_point] = op.attach_buffer(
                layer_list[index], index, rows, hidden, dtype, runner.device
            )
        self._empty = {hp: torch.empty(0, hidden, dtype=dtype) for hp in self.hook_points}
        self._on_cuda = any(buffer.is_cuda for buffer in self.buffers.values())
        # The compile cache must not hand back a graph compiled without the op (or with other
        # layers): put the capture settings into the config hash that keys it.
        extra = config.additional_config if isinstance(config.additional_config, dict) else None
        if extra is not None:
            extra["safety_monitor_capture"] = {"layers": layers, "op": op.OP_NAME}
        from monitor.capture.client import CaptureClient

        self.client = CaptureClient(
            settings.target, on_alert=self._on_alert, **settings.client_kwargs()
        )
        if settings.metrics_port is not None:
            _start_metrics(settings.metrics_port + config.parallel_config.rank)
        log.info(
            "safety-monitor capture attached",
            hook_points=self.hook_points,
            target=settings.target,
            rank=self.plan.reason,
            compiled=config.compilation_config.mode != 0,
        )

    # ---- per step -------------------------------------------------------------------------

    def note_layout(self, runner: Any, num_scheduled_tokens: Any) -> None:
        """Called right after `_prepare_inputs`: keep the batch and the step's token counts,
        which hold the order and positions the forward uses. `after_forward` reads them (and
        is timed): vLLM changes neither before the next step's `_update_states`, inside the
        next `execute_model`, so the wrapper around `_prepare_inputs` reads no clock (two
        clock reads there cost more than keeping two references)."""
        self._layout = (runner.input_batch, num_scheduled_tokens)

    @property
    def has_layout(self) -> bool:
        """A forward pass ran since the last `after_forward` (its layout was noted)."""
        return self._layout is not None

    def after_forward(self, runner: Any, scheduler_output: Any) -> None:
        """Called after `execute_model`: send this step's rows, split per request."""
        noted, self._layout = self._layout, None
        finished = scheduler_output.finished_req_ids
        if finished:
            self._finish(finished)
        if noted is None or self.client is None:
            return
        batch, scheduled = noted
        count = batch.num_reqs
        # A copy: vLLM rewrites its list in place (swaps, condensing), and a kept alias
        # would make `DecodeRun.matches` compare the batch with itself.
        req_ids = batch.req_ids[:count]
        num_tokens = _ints(scheduled)  # vLLM's holds num_reqs counts: no slice to make
        if len(num_tokens) != count:
            num_tokens = num_tokens[:count]
        computed = _ints(batch.num_computed_tokens_cpu[:count])
        layout = (req_ids, num_tokens, computed)
        new_requests = scheduler_output.scheduled_new_reqs
        decode = self._decode
        if decode is not None and not new_requests and decode[0].matches(*layout):
            # The usual step: the last step's requests, one token each, one position on.
            # It splits, plans and slices as that step did: send it as that one, with this
            # step's positions (a new request makes it a step of `new_requests`; a grown
            # streaming prompt too, whose rows the slow path tags by position).
            run, tagging, views, first = decode
            run.advance(computed)
            self.steps += 1
            if self._on_cuda:  # each step is its own copy off the device
                self.client.submit(self._captured(views, tagging, run.ones, computed))
            else:  # the run's first step again, at this step's positions: no new objects
                self.client.submit_again(first, computed)
            return
        self._decode = None
        splitter = self.splitter
        if new_requests:  # empty on a decode step
            # A request id vLLM schedules as new while it runs is a streaming-input session
            # given more input: its prompt grew. Its naming stays the first input's (the
            # update's extra_args are not read): its positions continue one conversation.
            for new in new_requests:
                splitter.set_prompt_tokens(new.req_id, _prompt_tokens(runner, new.req_id))
        for internal_id in splitter.untracked(req_ids):
            tag = self._tag(runner, internal_id)
            splitter.track(internal_id, tag, _prompt_tokens(runner, internal_id))
        slices = splitter.split(req_ids, num_tokens, computed)
        if not slices:
            return
        self.steps += 1
        submit = self.client.submit
        plan = self._plan(slices)
        for indices, tagging in plan:
            step = self._step([slices[i] for i in indices] if indices else slices, tagging)
            submit(step)
        if len(plan) == 1 and not plan[0][0]:  # one message of every slice: a run may start
            run = splitter.decode_run(req_ids, slices)
            if run is not None:
                self._decode = (run, plan[0][1], self._row_views(0, len(slices)), step)

    def _plan(self, slices: StepSlices) -> list[tuple[tuple[int, ...], Tagging]]:
        """How this step's slices go out: groups (indices into `slices`; () for all of them)
        and each group's Tagging. A decode step runs the same requests as the step before, so
        the plan is kept by the requests' ids and reused: the Taggings (and with them the
        client's serialised metadata) are then built once per batch composition, not per
        step. Forgotten when a request finishes (its id could come back with another tag).
        A step with prompt rows keys its plan by each slice's role too: a request's prompt
        and its output are tagged with different roles (a decode step has no prompt rows,
        and its key stays the ids alone), and by which slices end the prompt's turn."""
        key: tuple[Any, ...] = tuple([s.request for s in slices])
        if slices.prompt_slices:
            # A chunked prefill's last chunk ends the prompt's turn, its other chunks do not.
            key = (key, tuple([s.tag.role for s in slices]), tuple([s.turn_end for s in slices]))
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        groups = group_by_attributes(slices)
        # By the slice itself: a request split at its prompt's end has two slices.
        position = {id(s): i for i, s in enumerate(slices)}
        plan = []
        for group in groups:
            indices = tuple(position[id(s)] for s in group)
            if len(groups) == 1 and indices == tuple(range(len(slices))):
                indices = ()
            plan.append((indices, _tagging(group)))
        if len(self._plans) >= _MAX_PLANS:
            self._plans.clear()
        self._plans[key] = plan
        return plan

    def _step(self, group: Sequence[Slice], tagging: Tagging) -> CapturedStep:
        start, stop = group[0].start, group[-1].stop
        rows = [s.stop - s.start for s in group]
        positions = [s.position for s in group]
        if stop - start == sum(rows):  # contiguous rows
            return self._captured(self._row_views(start, stop), tagging, rows, positions)
        index = torch.cat([torch.arange(s.start, s.stop) for s in group])
        layers = {}
        for hp, buffer in self.buffers.items():
            layers[hp] = buffer.index_select(0, index.to(buffer.device))
        return self._captured(layers, tagging, rows, positions, views=False)

    def _row_views(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        """Views of the persistent buffers' rows `start:stop`, made once per row range: decode
        steps repeat one range, and slicing a tensor costs more than the rest of a step's
        Python. The frame writer recognises the same views and reuses the frame's layout.
        The dict is shared by every step of that range: nothing downstream modifies a
        step's `layers`."""
        views = self._views.get((start, stop))
        if views is None:
            if len(self._views) >= _MAX_VIEWS:
                self._views.clear()
            views = {hp: buffer[start:stop] for hp, buffer in self.buffers.items()}
            self._views[(start, stop)] = views
        return views

    def _captured(
        self,
        layers: dict[str, torch.Tensor],
        tagging: Tagging,
        rows: list[int],
        positions: list[int],
        views: bool = True,
    ) -> CapturedStep:
        """The step to submit: `layers` (the buffers' `views` of this step's rows, or rows
        selected into new tensors) as they are on a CPU, or copied off the GPU."""
        ready = None
        if self._on_cuda:
            # Off the device without waiting: the client publishes once the copy is done.
            host = {}
            for hp, tensor in layers.items():
                host[hp] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                host[hp].copy_(tensor, non_blocking=True)
            layers = host
            ready = torch.cuda.Event()
            ready.record()
        return CapturedStep(
            layers=layers,
            tagging=tagging,
            rows=rows,
            positions=positions,
            ready=ready,
            persistent_layers=views and ready is None,
        )

    def _tag(self, runner: Any, internal_id: str) -> RequestTag:
        state = runner.requests.get(internal_id)
        params = getattr(state, "sampling_params", None)
        extra = getattr(params, "extra_args", None)
        try:
            return tag_request(
                internal_id,
                extra,
                self.settings.ignore_request_conversation_ids,
                self.settings.ignore_request_roles_and_attributes,
            )
        except NamingError as exc:
            # Serve the request anyway, under its own id: a naming mistake must not fail it.
            self.naming_errors += 1
            log.error(
                "safety-monitor: bad conversation naming", request=internal_id, error=str(exc)
            )
            # Only the user's naming is dropped: the frontend's request id and n > 1 sequence
            # and the operator's switches still hold (with `ignore_request_conversation_ids`
            # a bad role must not turn a request back into the id its client chose).
            frontend = {k: extra[k] for k in (REQUEST_KEY, SEQUENCE_KEY) if k in (extra or {})}
            try:
                return tag_request(
                    internal_id, frontend, self.settings.ignore_request_conversation_ids, True
                )
            except NamingError:
                return tag_request(internal_id, None, True, True)

    def finish_missing(self, live: Any) -> int:
        """Finish the tracked requests not in `live` (the runner's requests): they ended while
        this capture was not called (the bench switches the monitor off and on in one engine,
        and vLLM reports an end only once, in the next step). Returns how many."""
        gone = {r for r in self.splitter.tracked() if r not in live}
        if gone:
            self._finish(gone)
        return len(gone)

    def _finish(self, finished: set[str]) -> None:
        """Requests that ended (finished, or aborted: vLLM reports both here): each ends its
        answer's turn, at the position after its last sent row (the sidecar's rules engine
        marks the turn end at the conversation's last evaluated token, as the answer's last
        token is sampled and never computed). A conversation named after its request is over:
        it gets a zero-row `end` (which is also a turn end), sent when the last request still
        running under that name finishes (a user may give two requests one id, or the
        operator's `ignore_request_conversation_ids` names each by its request's internal id).
        A conversation named with `sm_conversation_id` may go on in a later request: it gets
        a zero-row `turn_end`, which keeps its state."""
        states = [(i, self.splitter.state(i)) for i in finished]
        self.splitter.finish(finished)
        self._plans.clear()  # they name finished requests
        self._decode = None  # as does the decode run (their ids may come back, tagged anew)
        with self._blocks_lock:
            for internal_id in finished:
                self._blocks.pop(internal_id, None)
        if self.client is None:
            return
        marks: dict[tuple[bool, str, tuple[tuple[str, str], ...]], tuple[str, RequestTag, int]]
        marks = {}
        for internal_id, state in states:
            if state is None:
                continue
            tag, position = state
            if self.splitter.requests_of(tag.conversation_id):
                # Another request still runs this conversation: an `end` would drop its
                # state; a turn end here would sit at this request's position, not the
                # conversation's next one, and read as a gap (which resets its state too).
                # The conversation ends (or ends a turn) with that request.
                continue
            key = (tag.explicit, tag.conversation_id, tuple(sorted(tag.attributes.items())))
            if key not in marks or position > marks[key][2]:
                marks[key] = (internal_id, tag, position)
        for internal_id, tag, position in marks.values():
            if tag.explicit:
                # The request's own id and output role, as on its rows: the sidecar's slot
                # for the conversation is reused as it is, and nothing reads the zero-row
                # slice as another request.
                tagging = Tagging(
                    (tag.conversation_id,),
                    (tag.role,),
                    (bounded_id(internal_id),),
                    dict(tag.attributes),
                    turn_ends=(True,),
                )
                self.turn_ends_sent += 1
            else:
                # The attributes too: with `conversations.scope: attribute` they pick the
                # conversation's namespace in the sidecar.
                tagging = Tagging(
                    (tag.conversation_id,), ("",), ("",), dict(tag.attributes), end=True
                )
                self.conversations_ended += 1
                self.recent_ends.append(tag.conversation_id)
            step = CapturedStep(
                layers=dict(self._empty), tagging=tagging, rows=[0], positions=[position]
            )
            self.client.submit(step)

    # ---- guard mode -----------------------------------------------------------------------

    def _on_alert(self, alert: Any) -> None:
        """Relay thread: a rule with the `block` action fired. Stop the one request whose
        token fired it (the alert's request id is vLLM's internal id, see `_step`), never
        every request that shares its conversation id: that id comes from the request, so
        any user could name another's conversation. For a conversation-scoped rule other
        requests of the conversation go on; they stop if a rule fires on their own tokens."""
        if "block" not in alert.actions or not self.settings.guard:
            return
        internal_id = self.splitter.request_named(alert.request_id)
        state = self.splitter.state(internal_id)
        if state is None or state[0].conversation_id != alert.conversation_id:
            # Finished before the alert came back (or not a request of this worker).
            self.blocks_unmatched += 1
            log.info(
                "safety-monitor: block for a request not in flight",
                rule=alert.rule,
                request=internal_id,
            )
            return
        with self._blocks_lock:
            if len(self._blocks) < _MAX_PENDING_BLOCKS:
                self._blocks.setdefault(internal_id, alert.rule)
            self.block_requests += 1
        log.warning(
            "safety-monitor: blocking request",
            rule=alert.rule,
            conversation_id=alert.conversation_id,
            position=alert.position,
            request=internal_id,
        )

    @property
    def nothing_to_hand_back(self) -> bool:
        """No block is pending and no step waits for the sidecar's verdict (guard mode off,
        or without `block_within`): `take_blocks` would return {} at once."""
        if self._blocks:
            return False
        return self.settings.block_within is None or not self.settings.guard or self.client is None

    def take_blocks(self) -> dict[str, str]:
        """The requests to stop with this step's output. With `block_within` set, first wait
        (up to `guard_timeout`, then fail-open) until the sidecar has judged every step but
        the last `block_within`, so a block lands within that many tokens of its firing."""
        within = self.settings.block_within
        waits = within is not None and self.settings.guard and self.client is not None
        if waits and not self.client.wait_settled(within, self.settings.guard_timeout):  # type: ignore[union-attr, arg-type]
            self.guard_timeouts += 1
        if not self._blocks:
            return {}
        with self._blocks_lock:
            blocks, self._blocks = self._blocks, {}
        return blocks

    def close(self) -> None:
        if self.client is not None:
            self.client.close(timeout=5)


def _tagging(group: Sequence[Slice]) -> Tagging:
    ids = tuple(s.tag.conversation_id for s in group)
    roles = tuple(s.tag.role for s in group)
    # vLLM's internal id: what an alert names is then exactly one request (see `_on_alert`)
    requests = tuple(bounded_id(s.request) for s in group)
    attributes = group[0].tag.attributes
    turn_ends = tuple(s.turn_end for s in group)
    if not any(turn_ends):
        turn_ends = ()
    return Tagging(
        ids,
        roles,
        requests,
        attributes,
        key=(ids, roles, requests, tuple(sorted(attributes.items())), turn_ends),
        turn_ends=turn_ends,
    )


def _prompt_tokens(runner: Any, internal_id: str) -> int:
    """The request's prompt length as the runner holds it (prompt embeddings included); 0,
    so every row is the output's, for a request the runner does not hold."""
    state = runner.requests.get(internal_id)
    return int(getattr(state, "num_prompt_tokens", 0) or 0)


def _ints(values: Any) -> list[int]:
    """A numpy array (what vLLM hands over) or a sequence, as a list of Python ints."""
    tolist = getattr(values, "tolist", None)
    return tolist() if tolist is not None else [int(v) for v in values]


def speculative_refusal(speculative_config: Any) -> str:
    method = getattr(speculative_config, "method", None) or "speculative decoding"
    return (
        "safety-monitor: speculative decoding is not supported (speculative_config: "
        f"method={method!r}): the monitor would see draft tokens the engine may reject. "
        "Start vLLM without --speculative-config, or unset SAFETY_MONITOR_TARGET."
    )


def _base_model(model: Any) -> Any:
    return getattr(model, "model", model)


def _cudagraph_max(config: Any) -> int:
    sizes = getattr(config.compilation_config, "cudagraph_capture_sizes", None) or [0]
    return max(sizes)


_metrics_started: set[int] = set()


def _start_metrics(port: int) -> None:
    """Serve this worker's client metrics (vLLM's own /metrics lives in another process)."""
    if port in _metrics_started:
        return
    from prometheus_client import start_http_server

    start_http_server(port, addr="127.0.0.1")
    _metrics_started.add(port)


# ---- operator helpers, for `LLM.collective_rpc(...)` ------------------------------------------


def capture_report(worker: Any) -> dict[str, Any]:
    """This worker's capture state: `llm.collective_rpc(capture_report)` returns one per rank."""
    capture: WorkerCapture | None = getattr(worker.model_runner, "_safety_monitor", None)
    report: dict[str, Any] = {"attached": capture is not None, "op_calls": op.op_calls()}
    if capture is None:
        return report
    report.update(
        sends=capture.plan.sends,
        rank=capture.plan.reason,
        hook_points=capture.hook_points,
        steps=capture.steps,
        skipped_rows=capture.splitter.skipped_rows,
        gaps=capture.splitter.gaps,
        straddles=capture.splitter.straddles,
        tracked_requests=len(capture.splitter),
        block_requests=capture.block_requests,
        blocks_unmatched=capture.blocks_unmatched,
        conversations_ended=capture.conversations_ended,
        turn_ends_sent=capture.turn_ends_sent,
        recent_ends=list(capture.recent_ends),
        guard_timeouts=capture.guard_timeouts,
        naming_errors=capture.naming_errors,
        plugin_steps=capture.timing.steps,
        plugin_cpu_ns=capture.timing.cpu_ns,
        plugin_wall_ns=capture.timing.wall_ns,
    )
    client = capture.client
    if client is not None:
        stats = client.stats
        report.update(
            steps_captured=stats.steps_captured,
            batches_acked=stats.batches_acked,
            batches_rejected=stats.batches_rejected,
            rows_acked=stats.rows_acked,
            dropped=dict(stats.dropped),
            connected=client.connected,
            alerts=[
                {
                    "rule": a.rule,
                    "conversation_id": a.conversation_id,
                    "request_id": a.request_id,
                    "position": a.position,
                    "actions": list(a.actions),
                }
                for a in client.alerts
            ],
        )
    return report


def capture_flush(worker: Any, timeout: float = 30.0) -> bool:
    """Wait until every captured step is acknowledged, rejected or counted as dropped."""
    capture: WorkerCapture | None = getattr(worker.model_runner, "_safety_monitor", None)
    if capture is None or capture.client is None:
        return True
    return capture.client.flush(timeout)
