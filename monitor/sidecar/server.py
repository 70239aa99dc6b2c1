"""The sidecar process: gRPC server (Monitor, Evaluate, GetStatus), health, reflection,
Prometheus metrics on their own port, graceful drain on SIGTERM."""

from __future__ import annotations

import asyncio
import gc
import signal
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

import monitor
from monitor.features import FeatureError, FeaturePack, load_pack
from monitor.outputs.metrics import SidecarMetrics
from monitor.rules.errors import RuleLoadError
from monitor.rules.loader import RuleSet, load_rules
from monitor.rules.reload import RuleReloader
from monitor.sidecar import streams
from monitor.sidecar.actions import Actions
from monitor.sidecar.config import SidecarConfig
from monitor.sidecar.pipeline import (
    ANONYMOUS,
    BatchOutcome,
    Pipeline,
    StreamClient,
    qualified_feature_names,
)
from monitor.sidecar.security import (
    BearerTokenInterceptor,
    read_tokens,
    server_credentials,
    tls_subject,
    token_client,
)
from monitor.wire import SERVICE_NAME, WIRE_DTYPES, pb, pb_grpc

log = structlog.get_logger("safety_monitor.sidecar")

# Named health service of the audit trail: NOT_SERVING while the store cannot commit, so a
# probe or an operator sees it, while the sidecar itself keeps monitoring.
AUDIT_HEALTH_SERVICE = "safety_monitor.audit"
HEALTH_POLL_SECONDS = 1.0
# Batches of one stream held at once, in count (and in bytes: `limits.max_stream_bytes`),
# so a client faster than the sidecar is held back by gRPC flow control, not by our memory.
READ_AHEAD = streams.READ_AHEAD
# At most this many waiting batches are processed as one group: half the read-ahead, so the
# next ones are still read while a full group is processed.
MAX_GROUP = 8


class StartupError(RuntimeError):
    """The sidecar cannot start with this configuration; str() is one line."""


def load_packs(paths: Sequence[Path]) -> list[FeaturePack]:
    packs: list[FeaturePack] = []
    for path in paths:
        try:
            pack = load_pack(path)
        except FeatureError as exc:
            raise StartupError(str(exc)) from exc
        if any(p.name == pack.name for p in packs):
            raise StartupError(f"{path}: pack name {pack.name!r} is already used by another pack")
        packs.append(pack)
    return packs


def load_ruleset(paths: Sequence[Path], packs: Sequence[FeaturePack]) -> RuleSet:
    try:
        return load_rules(paths, known_features=qualified_feature_names(packs))
    except RuleLoadError as exc:
        raise StartupError(str(exc).replace("\n", "; ")) from exc


async def _read_into(
    requests: AsyncIterator[bytes],
    arrived: asyncio.Queue[tuple[pb.StepBatch, int] | None],
    budget: streams.StreamBudget,
    parser: ThreadPoolExecutor | None = None,
) -> None:
    """Read a stream's messages, parse them and put the batches into `arrived` with their
    sizes, within the stream's budget; None at the end (also when reading failed: the
    handler then awaits this task for the error). An undecodable message ends reading: the
    handler answers INVALID_ARGUMENT.

    Messages arrive as bytes: their size is known before parsing, and a large one is parsed
    on `parser`'s thread, so a message of a million tiny sequences does not hold the event
    loop (and every other stream's acks) while it parses."""
    messages = aiter(requests)
    loop = asyncio.get_running_loop()
    try:
        while True:
            await budget.wait_for_room()  # given back once the batch has been processed
            try:
                data = await anext(messages)
            except StopAsyncIteration:
                return
            size = len(data)
            budget.hold(size)
            if parser is not None and size > streams.PARSE_INLINE_BYTES:
                batch = await loop.run_in_executor(parser, streams.parse_batch, data)
            else:
                batch = streams.parse_batch(data)
            if batch is streams.UNDECODABLE:
                await budget.release(size)
                raise _Undecodable()
            arrived.put_nowait((batch, size))
    finally:
        arrived.put_nowait(None)


class _Undecodable(Exception):
    """A stream message that is not a valid StepBatch."""


_UNDECODABLE_MESSAGE = "a message on the stream is not a valid StepBatch (protobuf decoding failed)"


def _internal_error(seq_no: int, exc: Exception) -> BatchOutcome:
    error = pb.BatchError(
        seq_no=seq_no, reason="internal", field="", message=f"internal error: {type(exc).__name__}"
    )
    return BatchOutcome([pb.MonitorEvent(error=error)], [], {})


class SafetyMonitorService(pb_grpc.SafetyMonitorServicer):
    def __init__(
        self,
        pipeline: Pipeline,
        executor: ThreadPoolExecutor,
        metrics: SidecarMetrics,
        tokens: dict[str, str] | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.executor = executor
        self.metrics = metrics
        self.tokens = tokens or {}
        self.gate = streams.StreamGate(pipeline.limits.max_streams)
        self.parser = ThreadPoolExecutor(max_workers=1, thread_name_prefix="parse")

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
        log.info("stream opened", peer=peer, client=client.identity)
        # Reading runs ahead of processing: the next batches arrive and are parsed on the
        # event loop while the worker thread processes this one, instead of the stream
        # standing still between an ack and the next read.
        arrived: asyncio.Queue[tuple[pb.StepBatch, int] | None] = asyncio.Queue()
        budget = streams.StreamBudget(READ_AHEAD, limits.max_stream_bytes)
        idle = float(limits.stream_idle_timeout_seconds)
        reader = asyncio.create_task(_read_into(request_iterator, arrived, budget, self.parser))
        try:
            ended = False
            while not ended:
                try:  # nothing arrives: the client has gone quiet
                    item = await asyncio.wait_for(arrived.get(), idle)
                except TimeoutError:
                    await self._close_idle(context, peer, "sent no batch")
                if item is None:
                    break
                # Whatever else has arrived meanwhile goes with it: under load the pipeline
                # evaluates waiting decode steps together (see grouping.py).
                held = [item]
                while len(held) < MAX_GROUP and not arrived.empty():
                    more = arrived.get_nowait()
                    if more is None:
                        ended = True
                        break
                    held.append(more)
                outcomes = await self._run_many([batch for batch, _ in held], client)
                for _, size in held:
                    await budget.release(size)
                for outcome in outcomes:
                    for event in outcome.events:
                        try:  # not taken: the client does not read its events
                            await asyncio.wait_for(context.write(event), idle)
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
        if request is streams.UNDECODABLE:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "the request is not a valid EvaluateRequest (protobuf decoding failed)",
            )
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
        )

    async def _run(
        self, func: Callable[[pb.StepBatch], BatchOutcome], batch: pb.StepBatch
    ) -> BatchOutcome:
        return (await self._run_many([batch], ANONYMOUS, lambda b, _: [func(b[0])]))[0]

    async def _run_many(
        self,
        batches: list[pb.StepBatch],
        client: StreamClient,
        func: Callable[[list[pb.StepBatch], StreamClient], list[BatchOutcome]] | None = None,
    ) -> list[BatchOutcome]:
        """Run pipeline work on the single worker thread; a bug becomes a BatchError for each
        batch, never a dead stream."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self.executor, func or self.pipeline.process_many, batches, client
            )
        except Exception as exc:  # the stream must survive our own bugs too
            seq_nos = [batch.seq_no for batch in batches]
            log.exception("internal error processing batches", seq_nos=seq_nos)
            self.metrics.batches_rejected.labels(reason="internal").inc(len(batches))
            return [_internal_error(seq_no, exc) for seq_no in seq_nos]


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


def release_replaced(replaced: weakref.ref[Any]) -> bool:
    """Make sure an object replaced on reload (the old rule set and what hangs off it) is
    freed. Reference counting frees it at once unless it sits in a reference cycle; a cycle
    among objects frozen at start-up (`gc.freeze()` in `serve`) is never collected, so then
    the frozen objects are unfrozen, collected and frozen again: one full collection per
    such reload. Returns whether that was needed."""
    if replaced() is None or not gc.get_freeze_count():
        return False
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    return True


@dataclass
class RunningSidecar:
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    metrics_port: int
    shutdown_metrics: Callable[[], None]


class Sidecar:
    """Owns everything a running sidecar holds; `start` binds the ports, `stop` drains."""

    def __init__(self, config: SidecarConfig) -> None:
        self.config = config
        self.metrics = SidecarMetrics()
        packs = [pack.to(_device(config.device)) for pack in load_packs(config.packs)]
        ruleset = load_ruleset(config.rules, packs)
        self.reloader = RuleReloader(
            config.rules, known_features=qualified_feature_names(packs), ruleset=ruleset
        )
        try:
            self.actions = Actions(
                config.audit,
                config.alertmanager,
                self.metrics,
                config.limits.max_conversations,
                config.limits.max_model_labels,
            )
        except Exception as exc:  # a bad store URL or the like: one line, exit 2
            raise StartupError(f"audit: {exc}") from exc
        try:
            self.pipeline = Pipeline(
                packs, ruleset, self.metrics, config.limits, self.actions, config.conversations
            )
        except ValueError as exc:
            raise StartupError(str(exc)) from exc
        self._background: list[asyncio.Task[None]] = []
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeline")
        self.running: RunningSidecar | None = None

    async def start(self) -> RunningSidecar:
        max_bytes = self.config.limits.max_message_bytes
        security = self.config.security
        try:
            tokens = read_tokens(security)
            credentials = server_credentials(security)
        except (OSError, ValueError) as exc:
            raise StartupError(f"security: {exc}") from exc
        server = grpc.aio.server(
            interceptors=[BearerTokenInterceptor(tokens)] if tokens else [],
            options=[
                ("grpc.max_receive_message_length", max_bytes),
                ("grpc.max_send_message_length", max_bytes),
                # gRPC's own receive window per stream stays at 4 MiB instead of growing
                # with its bandwidth probe: with never-read streams of 16 MiB messages it
                # was most of the sidecar's memory beyond `max_stream_bytes`.
                ("grpc.http2.bdp_probe", 0),
                ("grpc.http2.lookahead_bytes", 4 * 1024 * 1024),
            ],
        )
        add_servicer(
            SafetyMonitorService(self.pipeline, self.executor, self.metrics, tokens), server
        )
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        if credentials is None:
            port = server.add_insecure_port(self.config.listen)
        else:
            port = server.add_secure_port(self.config.listen, credentials)
        if port == 0:
            raise StartupError(f"listen: cannot bind {self.config.listen}")
        httpd = self._start_metrics()
        await server.start()
        for service in ("", SERVICE_NAME):
            await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
        if self.actions.recorder is not None:
            self._background.append(asyncio.create_task(self._watch_audit(health_servicer)))
        if self.config.rules and self.config.rules_reload_seconds > 0:
            self._background.append(asyncio.create_task(self._poll_rules()))
        self.running = RunningSidecar(
            server, health_servicer, port, httpd.server_port, httpd.shutdown
        )
        log.info(
            "sidecar started",
            grpc_port=port,
            tls="mutual" if security.tls_client_ca else ("on" if credentials else "off"),
            token_auth=bool(tokens),
            metrics_port=httpd.server_port,
            packs=[p.name for p in self.pipeline.packs],
            rules=len(self.pipeline.ruleset.rules),
        )
        return self.running

    def _start_metrics(self) -> WSGIServer:
        try:
            httpd, _ = start_http_server(
                self.config.metrics_port,
                addr=self.config.metrics_bind_host,
                registry=self.metrics.registry,
            )
        except OSError as exc:
            raise StartupError(
                f"metrics_port: cannot bind {self.config.metrics_bind_host}:"
                f"{self.config.metrics_port}: {exc.strerror}"
            ) from exc
        return httpd

    async def reload_rules(self, force: bool = False) -> bool | None:
        """Re-read the rule files (if changed, or when forced) and swap the new set in on the
        pipeline thread, between batches. A broken file keeps the running set. Returns None
        when nothing changed, else whether the new set loaded."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self._reload_on_pipeline, force)

    def _reload_on_pipeline(self, force: bool) -> bool | None:
        result = self.reloader.check(force=force)
        if result is None:
            return None
        if result.ok and result.ruleset is not None:
            replaced = weakref.ref(self.pipeline.ruleset)
            self.pipeline.replace_rules(result.ruleset)
            release_replaced(replaced)
            self.metrics.rule_reloads.labels(result="ok").inc()
            log.info("rules reloaded", rules=len(result.ruleset.rules))
            return True
        self.metrics.rule_reloads.labels(result="error").inc()
        log.error("rule reload failed; keeping the running rules", error=result.error)
        return False

    async def _poll_rules(self) -> None:
        while True:
            await asyncio.sleep(self.config.rules_reload_seconds)
            try:
                await self.reload_rules()
            except Exception:  # keep polling: one failed swap must not end hot reload
                log.exception("rule reload crashed; keeping the running rules")

    async def _watch_audit(self, health_servicer: health.aio.HealthServicer) -> None:
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        last = None
        while True:
            # Sleep first: the store opens on the recorder's own thread just after start-up.
            await asyncio.sleep(HEALTH_POLL_SECONDS)
            healthy = self.actions.audit_healthy
            if healthy != last:
                await health_servicer.set(AUDIT_HEALTH_SERVICE, serving if healthy else not_serving)
                (log.info if healthy else log.error)("audit store health", healthy=healthy)
                last = healthy

    async def stop(self) -> None:
        """Go NOT_SERVING, let streams drain for the grace period, flush the audit trail and
        Alertmanager, then close everything."""
        running = self.running
        if running is None:
            return
        self.running = None
        log.info("sidecar draining", grace_seconds=self.config.shutdown_grace_seconds)
        for task in self._background:
            task.cancel()
        await running.health.enter_graceful_shutdown()
        await running.server.stop(self.config.shutdown_grace_seconds)
        await asyncio.to_thread(self.executor.shutdown, wait=True)
        await asyncio.to_thread(self.actions.close, self.config.shutdown_grace_seconds)
        running.shutdown_metrics()
        log.info("sidecar stopped")


async def serve(config: SidecarConfig) -> None:
    """Run until SIGTERM or SIGINT, then drain."""
    sidecar = Sidecar(config)
    await sidecar.start()
    # What is loaded by now (torch, the packs, gRPC) lives as long as the process. Frozen,
    # it is left out of the collector's full passes, which otherwise took ~90 ms here, a
    # stall every stream felt (send-to-ack p99 60-70 ms instead of 10-14 ms).
    gc.collect()
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[None]] = set()

    async def reload_logged() -> None:
        try:
            await sidecar.reload_rules(force=True)
        except Exception:  # e.g. a SIGHUP during shutdown, once the pipeline has stopped
            log.exception("rule reload on SIGHUP failed")

    def on_sighup() -> None:
        task = asyncio.create_task(reload_logged())
        reloads.add(task)  # keep a reference until done
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    await stop.wait()
    await sidecar.stop()


def _device(setting: str) -> str:
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise StartupError("device: cuda requested but torch sees no CUDA device")
    return setting


class SidecarThread:
    """A sidecar on its own event loop in a background thread (embedded demo, tests)."""

    def __init__(self, config: SidecarConfig) -> None:
        self.sidecar = Sidecar(config)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sidecar", daemon=True)

    def start(self) -> RunningSidecar:
        self._thread.start()
        return asyncio.run_coroutine_threadsafe(self.sidecar.start(), self._loop).result(30)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.sidecar.stop(), self._loop).result(60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
