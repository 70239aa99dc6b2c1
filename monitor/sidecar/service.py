"""The sidecar's gRPC service: the Monitor stream (read-ahead and grouping of waiting
batches, within the stream limits of `streams.py`), Evaluate and GetStatus. Start-up, health,
signals and reload are in `process.py`.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import structlog
import torch

import monitor
from monitor.outputs.metrics import SidecarMetrics
from monitor.sidecar import streams
from monitor.sidecar.columns import ConversationTable
from monitor.sidecar.grouping import MAX_GROUP, READ_AHEAD
from monitor.sidecar.pipeline import (
    ANONYMOUS,
    BatchOutcome,
    Pipeline,
    StreamClient,
    internal_errors,
)
from monitor.sidecar.security import tls_subject, token_client
from monitor.sidecar.validate import SEQUENCE_FLAGS, decode_layers
from monitor.wire import SERVICE_NAME, WIRE_DTYPES, pb, pb_grpc
from monitor.wire.acks import EVENT_FORMATS, asks_for_acks, coalesce_acks
from monitor.wire.columns import SEQUENCE_FORMATS

log = structlog.get_logger("safety_monitor.sidecar")


async def _read_into(
    requests: AsyncIterator[bytes],
    arrived: asyncio.Queue[tuple[Any, int, tuple[torch.Tensor | None, ...]] | None],
    budget: streams.StreamBudget,
    parser: ThreadPoolExecutor | None = None,
    read: Callable[[], Awaitable[Any]] | None = None,
    widen: bool = False,
) -> None:
    """Read a stream's messages, parse them and put the batches into `arrived` with their
    sizes and decoded layers (`validate.decode_layers`), within the stream's budget; None at
    the end (also when reading failed: the handler then awaits this task for the error). An
    undecodable message ends reading: the handler answers INVALID_ARGUMENT.

    Messages arrive as bytes: their size is known before parsing, and a large one is parsed
    on `parser`'s thread, so a message of a million tiny sequences does not hold the event
    loop (and every other stream's acks) while it parses. A decode step is parsed and its
    activations decoded and checked finite here, on the event loop, while the worker thread
    encodes the batch before it: the worker is what bounds a stream's steps per second.

    `read` is the servicer context's `read` (`grpc.aio.EOF` at the end), which the server
    uses instead of iterating `requests`: one coroutine per message fewer. `widen`: the
    layers of a message parsed on `parser`'s thread are decoded to float32 there
    (`decode_layers`), off the worker thread."""
    if read is None:
        read = functools.partial(anext, aiter(requests), grpc.aio.EOF)
    loop = asyncio.get_running_loop()
    try:
        while True:
            await budget.wait_for_room()  # given back once the batch has been processed
            data = await read()
            if data is grpc.aio.EOF:
                return
            size = len(data)
            budget.hold(size)
            if parser is not None and size > streams.PARSE_INLINE_BYTES:
                batch, decoded = await loop.run_in_executor(parser, _parse, data, widen)
            else:
                batch, decoded = _parse(data)
            if batch is streams.UNDECODABLE:
                await budget.release(size)
                raise _Undecodable()
            # The decoded activations are a copy of the message's bytes: held as long as it.
            extra = sum(tensor.nbytes for tensor in decoded if tensor is not None)
            budget.add_bytes(extra)
            arrived.put_nowait((batch, size + extra, decoded))
    finally:
        arrived.put_nowait(None)


def _parse(data: bytes, widen: bool = False) -> tuple[Any, tuple[torch.Tensor | None, ...]]:
    """The StepBatch of `data` (or `streams.UNDECODABLE`) and its decoded layers (float32
    with `widen`, `decode_layers`)."""
    batch = streams.parse_batch(data)
    if batch is streams.UNDECODABLE:
        return batch, ()
    return batch, decode_layers(batch, widen)


class _Undecodable(Exception):
    """A stream message that is not a valid StepBatch."""


_UNDECODABLE_MESSAGE = "a message on the stream is not a valid StepBatch (protobuf decoding failed)"


def _start_parse_thread() -> None:
    """Name the parse thread and give it one torch thread: it converts prefill-sized BF16
    layers to float32 (``decode_layers`` with ``widen``) while the worker thread encodes the
    batch before, on the pipeline's threads; more threads here would only make the two
    wait for each other's cores. A new thread otherwise starts with whatever count any
    thread set last."""
    streams.name_os_thread(streams.PARSE_THREAD)
    torch.set_num_threads(1)


class SafetyMonitorService(pb_grpc.SafetyMonitorServicer):
    def __init__(
        self,
        pipeline: Pipeline,
        executor: ThreadPoolExecutor,
        metrics: SidecarMetrics,
        tokens: dict[str, str] | None = None,
        widen: bool = False,
    ) -> None:
        self.pipeline = pipeline
        # Large messages' layers decoded to float32 on the parse thread (`decode_layers`):
        # for packs that encode on the CPU, where the worker would convert them anyway.
        self.widen = widen
        self.executor = executor
        self.worker = streams.PipelineWorker(executor)
        self.inline = streams.InlineBudget()
        self.metrics = metrics
        self.tokens = tokens or {}
        self.gate = streams.StreamGate(pipeline.limits.max_streams)
        # Evaluate calls waiting for the worker each hold a message of up to
        # max_message_bytes: bounded like streams, or they would evade max_streams and
        # max_stream_bytes and delay every stream's acks without limit.
        self.evaluate_gate = streams.StreamGate(pipeline.limits.max_streams)
        self.parser = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="parse",
            initializer=_start_parse_thread,
        )

    def client_of(self, context: grpc.aio.ServicerContext) -> StreamClient:
        """Who is calling: the bearer token's client name, else the mTLS subject; fair
        eviction charges anonymous callers to their connection."""
        identity = ""
        if self.tokens:
            identity = token_client(context.invocation_metadata() or (), self.tokens) or ""
        if not identity:
            identity = tls_subject(context)
        return StreamClient(identity, identity or f"peer:{context.peer()}")

    async def Monitor(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> None:
        """The long-lived stream: batches in, alerts and an ack or error per batch out."""
        limits = self.pipeline.limits
        if not self.gate.admit():
            self.metrics.batches_rejected.labels(reason="too_many_streams").inc()
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the sidecar has {limits.max_streams} streams open (limits.max_streams); "
                "retry later",
            )
        self.metrics.active_streams.inc()
        peer = context.peer()
        client = self.client_of(context)
        # A client that asked for event format "acks" gets a group's acks as one event: one
        # gRPC message (and loopback send) per group instead of one per batch.
        coalesce = asks_for_acks(context.invocation_metadata())
        log.info("stream opened", peer=peer, client=client.identity)
        # Reading runs ahead of processing: the next batches arrive and are parsed on the
        # event loop while the worker thread processes this one, instead of the stream
        # standing still between an ack and the next read.
        arrived: asyncio.Queue[tuple[Any, int, tuple[torch.Tensor | None, ...]] | None]
        arrived = asyncio.Queue()
        budget = streams.StreamBudget(READ_AHEAD, limits.max_stream_bytes)
        idle = float(limits.stream_idle_timeout_seconds)
        reader = asyncio.create_task(
            _read_into(request_iterator, arrived, budget, self.parser, context.read, self.widen)
        )
        # The stream's conversation slots (columnar format); touched only by the pipeline.
        table = ConversationTable(limits.max_conversation_slots)
        process_many = self.pipeline.process_many
        loop = asyncio.get_running_loop()
        try:
            ended = False
            # How many times in a row this stream's next batch was already here when we came
            # back for it: from `streams.INLINE_BEHIND` on, the stream is behind and the
            # inline path below is not for it.
            behind = 0
            while not ended:
                waited = arrived.empty()
                behind = 0 if waited else behind + 1
                if waited:
                    try:  # nothing arrives: the client has gone quiet
                        async with asyncio.timeout(idle):
                            item = await arrived.get()
                    except TimeoutError:
                        await self._close_idle(context, peer, "sent no batch")
                else:  # under load the next batch is already here: no timer to arm
                    item = arrived.get_nowait()
                if item is None:
                    break
                # Whatever else has arrived meanwhile goes with it: under load the pipeline
                # evaluates waiting decode steps together (see grouping.py).
                # Up to `streams.GROUP_ROWS` rows: a prefill-sized batch goes alone.
                held = [item]
                rows = streams.batch_rows(item[0], item[2])
                while len(held) < MAX_GROUP and rows < streams.GROUP_ROWS and not arrived.empty():
                    more = arrived.get_nowait()
                    if more is None:
                        ended = True
                        break
                    held.append(more)
                    rows += streams.batch_rows(more[0], more[2])
                batches = [batch for batch, _, _ in held]
                decoded = [layers for _, _, layers in held]
                process = functools.partial(process_many, table=table, decoded=decoded)
                if (
                    behind < streams.INLINE_BEHIND
                    and self.worker.idle
                    and not self.pipeline.may_block
                    and self.inline.allowed(time.perf_counter())
                    and streams.small_batches(held)
                ):
                    # The stream keeps up, its step is small (`streams.small_batches`: a
                    # decode step is) and nothing is on the pipeline thread. Done here, it
                    # saves the hand-off there and back, which costs as much as the work. A
                    # stream that is behind (`streams.INLINE_BEHIND`) or has more waiting
                    # goes to the pipeline thread, where the event loop reads ahead meanwhile
                    # and waiting steps are grouped: inline, reading would wait for each
                    # step's work, and steps would not group.
                    outcomes = self._run_inline(batches, client, process)
                else:
                    outcomes = await self._run_many(batches, client, process)
                await budget.release(sum(size for _, size, _ in held), len(held))
                if len(outcomes) == 1:
                    events = outcomes[0].events
                else:
                    events = [event for outcome in outcomes for event in outcome.events]
                    if coalesce:
                        events = coalesce_acks(events)
                try:  # not taken: the client does not read its events
                    # One timer for the group's events, moved on before each write (each
                    # write may take `idle`): `asyncio.wait_for` would make a task per event.
                    async with asyncio.timeout(None) as deadline:
                        for event in events:
                            deadline.reschedule(loop.time() + idle)
                            await context.write(event)
                except TimeoutError:
                    await self._close_idle(context, peer, "read no event")
            try:
                await reader  # a broken stream raises here, as it would have from the loop
            except _Undecodable:
                self.metrics.batches_rejected.labels(reason="undecodable").inc()
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _UNDECODABLE_MESSAGE)
        finally:
            reader.cancel()
            self.gate.leave()
            self.metrics.active_streams.dec()
            log.info("stream closed", peer=peer, client=client.identity)
            if budget.peak_bytes >= streams.TRIM_AFTER_BYTES:
                # On the worker, after this stream's last batches: then they are freed.
                self.executor.submit(streams.give_memory_back, budget.peak_bytes)

    async def _close_idle(self, context: grpc.aio.ServicerContext, peer: str, what: str) -> None:
        """End a stream that made no progress for `stream_idle_timeout_seconds`."""
        timeout = self.pipeline.limits.stream_idle_timeout_seconds
        self.metrics.batches_rejected.labels(reason="stream_idle").inc()
        log.warning("closing idle stream", peer=peer, idle=what, seconds=timeout)
        await context.abort(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"stream idle: the client {what} for {timeout} s (limits.stream_idle_timeout_seconds)",
        )

    async def Evaluate(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> pb.EvaluateResponse:
        """Score one batch with fresh rule state; optionally return the feature values."""
        if request is streams.UNDECODABLE:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "the request is not a valid EvaluateRequest (protobuf decoding failed)",
            )
        if not self.evaluate_gate.admit():
            self.metrics.batches_rejected.labels(reason="too_many_evaluate_calls").inc()
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the sidecar has {self.evaluate_gate.max_streams} Evaluate calls in flight "
                "(limits.max_streams); retry later",
            )
        include = request.include_features
        try:
            outcome = await self._run(
                lambda batch: self.pipeline.evaluate_once(batch, include), request.batch
            )
        finally:
            self.evaluate_gate.leave()
        response = pb.EvaluateResponse()
        for event in outcome.events:
            if event.HasField("alert"):
                response.alerts.append(event.alert)
            elif event.HasField("error"):
                response.error.CopyFrom(event.error)
        if request.include_features:
            for name, values in sorted(outcome.features.items()):
                response.features.append(pb.FeatureValues(name=name, values=values.tolist()))
        return response

    async def GetStatus(self, request: Any, context: grpc.aio.ServicerContext) -> pb.StatusResponse:
        if request is streams.UNDECODABLE:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "the request is not a valid StatusRequest (protobuf decoding failed)",
            )
        pipeline = self.pipeline
        limits = pipeline.limits
        return pb.StatusResponse(
            version=monitor.__version__,
            packs=[
                pb.PackStatus(
                    name=p.name,
                    sha256=p.sha256,
                    hook_points={hp: p.d_model(hp) for hp in p.hook_points},
                    features=p.feature_count,
                )
                for p in pipeline.packs
            ],
            rule_files=[
                pb.RuleFileStatus(path=path, sha256=h) for path, h in pipeline.ruleset.files
            ],
            rules=len(pipeline.ruleset.rules),
            limits=pb.Limits(
                max_message_bytes=limits.max_message_bytes,
                max_rows_per_batch=limits.max_rows_per_batch,
                max_conversations=limits.max_conversations,
                max_conversation_id_length=limits.max_conversation_id_length,
                max_sequences_per_batch=limits.max_sequences_per_batch,
                max_request_id_length=limits.max_request_id_length,
                max_role_length=limits.max_role_length,
                max_model_length=limits.max_model_length,
                max_attributes=limits.max_attributes,
                max_attribute_key_length=limits.max_attribute_key_length,
                max_attribute_value_length=limits.max_attribute_value_length,
                max_streams=limits.max_streams,
                stream_idle_timeout_seconds=limits.stream_idle_timeout_seconds,
                max_stream_bytes=limits.max_stream_bytes,
            ),
            accepted_dtypes=list(WIRE_DTYPES),
            sequence_formats=list(SEQUENCE_FORMATS),
            conversation_slots=limits.max_conversation_slots,
            event_formats=list(EVENT_FORMATS),
            sequence_flags=list(SEQUENCE_FLAGS),
        )

    async def _run(
        self, func: Callable[[pb.StepBatch], BatchOutcome], batch: pb.StepBatch
    ) -> BatchOutcome:
        return (await self._run_many([batch], ANONYMOUS, lambda b, _: [func(b[0])]))[0]

    def _run_inline(
        self,
        batches: list[pb.StepBatch],
        client: StreamClient,
        func: Callable[[list[pb.StepBatch], StreamClient], list[BatchOutcome]],
    ) -> list[BatchOutcome]:
        """`_run_many` on the event loop itself, for a small batch while the pipeline thread
        is idle (`streams.small_batches`, `PipelineWorker.idle`): nothing else touches the
        pipeline meanwhile, as the loop is the only one handing it work."""
        # CPU time for the work, wall time for how long the loop was held (InlineBudget).
        started, wall_started = time.thread_time(), time.perf_counter()
        try:
            return func(batches, client)
        except Exception as exc:  # the stream must survive our own bugs too
            return internal_errors([batch.seq_no for batch in batches], exc, self.metrics)
        finally:
            now = time.perf_counter()
            self.inline.ran(time.thread_time() - started, now, now - wall_started)

    async def _run_many(
        self,
        batches: list[pb.StepBatch],
        client: StreamClient,
        func: Callable[[list[pb.StepBatch], StreamClient], list[BatchOutcome]] | None = None,
    ) -> list[BatchOutcome]:
        """Run pipeline work on the single worker thread; a bug becomes a BatchError for each
        batch, never a dead stream."""
        try:
            return await self.worker.run(func or self.pipeline.process_many, batches, client)
        except Exception as exc:  # the stream must survive our own bugs too
            return internal_errors([batch.seq_no for batch in batches], exc, self.metrics)


def add_servicer(servicer: SafetyMonitorService, server: grpc.aio.Server) -> None:
    """Register the service like the generated `add_SafetyMonitorServicer_to_server`, but
    with deserializers that hand an undecodable message to the servicer (which answers
    INVALID_ARGUMENT) instead of failing the call as UNKNOWN with a Python class name."""
    handlers = {
        "Monitor": grpc.stream_stream_rpc_method_handler(
            servicer.Monitor,
            request_deserializer=None,  # bytes: the servicer parses them (see _read_into)
            response_serializer=pb.MonitorEvent.SerializeToString,
        ),
        "Evaluate": grpc.unary_unary_rpc_method_handler(
            servicer.Evaluate,
            request_deserializer=streams.tolerant_deserializer(pb.EvaluateRequest),
            response_serializer=pb.EvaluateResponse.SerializeToString,
        ),
        "GetStatus": grpc.unary_unary_rpc_method_handler(
            servicer.GetStatus,
            request_deserializer=streams.tolerant_deserializer(pb.StatusRequest),
            response_serializer=pb.StatusResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
