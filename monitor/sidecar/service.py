"""The sidecar's gRPC service: the Monitor stream (read-ahead and grouping of waiting
batches), Evaluate and GetStatus. Start-up, health, signals and reload are in `process.py`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import structlog

import monitor
from monitor.outputs.metrics import SidecarMetrics
from monitor.sidecar.grouping import MAX_GROUP, READ_AHEAD
from monitor.sidecar.pipeline import BatchOutcome, Pipeline, internal_errors
from monitor.wire import WIRE_DTYPES, pb, pb_grpc

log = structlog.get_logger("safety_monitor.sidecar")


async def _read_into(
    requests: AsyncIterator[pb.StepBatch],
    arrived: asyncio.Queue[pb.StepBatch | None],
    room: asyncio.Semaphore,
) -> None:
    """Read a stream's batches into `arrived`, at most READ_AHEAD waiting; None at the end
    (also when reading failed: the handler then awaits this task for the error)."""
    batches = aiter(requests)
    try:
        while True:
            await room.acquire()  # released once the batch has been processed
            try:
                batch = await anext(batches)
            except StopAsyncIteration:
                return
            arrived.put_nowait(batch)
    finally:
        arrived.put_nowait(None)


class SafetyMonitorService(pb_grpc.SafetyMonitorServicer):
    """The gRPC servicer: `Monitor` (the capture stream), `Evaluate` (one batch, e.g. from
    `rules test` or a notebook) and `GetStatus`. Pipeline work runs on `executor`, a single
    worker thread, so rule state is never touched concurrently."""

    def __init__(
        self, pipeline: Pipeline, executor: ThreadPoolExecutor, metrics: SidecarMetrics
    ) -> None:
        self.pipeline = pipeline
        self.executor = executor
        self.metrics = metrics

    async def Monitor(
        self, request_iterator: AsyncIterator[pb.StepBatch], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.MonitorEvent]:
        """The capture stream: StepBatches in, their Alerts and an Ack or BatchError each out, in
        order."""
        self.metrics.active_streams.inc()
        peer = context.peer()
        log.info("stream opened", peer=peer)
        # Reading runs ahead of processing: the next batches arrive and are parsed on the
        # event loop while the worker thread processes this one, instead of the stream
        # standing still between an ack and the next read.
        arrived: asyncio.Queue[pb.StepBatch | None] = asyncio.Queue()
        room = asyncio.Semaphore(READ_AHEAD)
        reader = asyncio.create_task(_read_into(request_iterator, arrived, room))
        try:
            ended = False
            while not ended and (batch := await arrived.get()) is not None:
                # Whatever else has arrived meanwhile goes with it: under load the pipeline
                # evaluates waiting decode steps together (see grouping.py).
                batches = [batch]
                while len(batches) < MAX_GROUP and not arrived.empty():
                    more = arrived.get_nowait()
                    if more is None:
                        ended = True
                        break
                    batches.append(more)
                outcomes = await self._run_many(batches)
                for _ in batches:
                    room.release()
                for outcome in outcomes:
                    for event in outcome.events:
                        yield event
            await reader  # a broken stream raises here, as it would have from the loop
        finally:
            reader.cancel()
            self.metrics.active_streams.dec()
            log.info("stream closed", peer=peer)

    async def Evaluate(
        self, request: pb.EvaluateRequest, context: grpc.aio.ServicerContext
    ) -> pb.EvaluateResponse:
        """Score one batch with fresh rule state; optionally return the feature values."""
        outcome = await self._run(self.pipeline.evaluate_once, request.batch)
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

    async def GetStatus(
        self, request: pb.StatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.StatusResponse:
        """The version, loaded packs and rule files, limits and accepted dtypes."""
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
            ),
            accepted_dtypes=list(WIRE_DTYPES),
        )

    async def _run(
        self, func: Callable[[pb.StepBatch], BatchOutcome], batch: pb.StepBatch
    ) -> BatchOutcome:
        return (await self._run_many([batch], lambda batches: [func(batches[0])]))[0]

    async def _run_many(
        self,
        batches: list[pb.StepBatch],
        func: Callable[[list[pb.StepBatch]], list[BatchOutcome]] | None = None,
    ) -> list[BatchOutcome]:
        """Run pipeline work on the single worker thread; a bug becomes a BatchError for each
        batch, never a dead stream."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self.executor, func or self.pipeline.process_many, batches
            )
        except Exception as exc:  # the stream must survive our own bugs too
            return internal_errors([batch.seq_no for batch in batches], exc, self.metrics)
