"""The sidecar process: start-up (packs, rules, audit, Alertmanager), the gRPC server with
health and reflection, Prometheus metrics on their own port, rule hot reload (polling and
SIGHUP) and graceful drain on SIGTERM. The RPCs themselves are in `service.py`."""

from __future__ import annotations

import asyncio
import gc
import signal
import threading
import weakref
from collections.abc import Callable, Sequence
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

from monitor.features import FeatureError, FeaturePack, load_pack
from monitor.heap import settle_heap
from monitor.outputs.metrics import SidecarMetrics
from monitor.rules import RuleLoadError, RuleReloader, RuleSet, load_rules
from monitor.sidecar import streams
from monitor.sidecar.config import SidecarConfig
from monitor.sidecar.firings import Actions
from monitor.sidecar.pipeline import Pipeline, qualified_feature_names
from monitor.sidecar.security import BearerTokenInterceptor, read_tokens, server_credentials
from monitor.sidecar.service import SafetyMonitorService, add_servicer
from monitor.wire import SERVICE_NAME

log = structlog.get_logger("safety_monitor.sidecar")

# Named health service of the audit trail: NOT_SERVING while the store cannot commit, so a
# probe or an operator sees it, while the sidecar itself keeps monitoring.
AUDIT_HEALTH_SERVICE = "safety_monitor.audit"
HEALTH_POLL_SECONDS = 1.0


def server_options(max_bytes: int) -> list[tuple[str, int]]:
    """The sidecar's gRPC server options for messages of up to `max_bytes` (also those of
    `scripts/sidecar_grpc_floor.py`'s bare servers, so they compare like for like)."""
    return [
        ("grpc.max_receive_message_length", max_bytes),
        ("grpc.max_send_message_length", max_bytes),
        # gRPC's own receive window per stream stays at 4 MiB instead of growing with its
        # bandwidth probe: with never-read streams of 16 MiB messages it was most of the
        # sidecar's memory beyond `max_stream_bytes`.
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", 4 * 1024 * 1024),
    ]


class StartupError(RuntimeError):
    """The sidecar cannot start with this configuration; str() is one line."""


def load_packs(paths: Sequence[Path]) -> list[FeaturePack]:
    """Load the configured feature packs; StartupError for an unreadable pack or a name used
    twice."""
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
    """Load the rule files against the packs' feature names; StartupError (one line) on any
    problem."""
    try:
        ruleset = load_rules(paths, known_features=qualified_feature_names(packs))
    except RuleLoadError as exc:
        raise StartupError(str(exc).replace("\n", "; ")) from exc
    for note in ruleset.notes:  # e.g. a threshold calibrated for another pooling
        log.warning("rule note", note=note)
    return ruleset


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


class PackFiles:
    """The pack files a sidecar started with, and whether one changed on disk since (size or
    modification time: a stat per poll, never a read of a large file)."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.seen = {Path(path): _file_stamp(Path(path)) for path in paths}

    def changed(self) -> list[Path]:
        """The pack files that changed since the last call (or start): each change once."""
        changed = []
        for path, stamp in self.seen.items():
            now = _file_stamp(path)
            if now != stamp:
                self.seen[path] = now
                changed.append(path)
        return changed


def _file_stamp(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


@dataclass
class RunningSidecar:
    """A started sidecar: its gRPC server and health servicer, the ports it bound (useful when
    configured as 0) and how to stop its metrics server.
    """

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
        self.device = _device(config.device)
        packs = [pack.to(self.device) for pack in load_packs(config.packs)]
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
                packs,
                ruleset,
                self.metrics,
                config.limits,
                self.actions,
                config.conversations,
                config.single_thread_rows,
            )
        except ValueError as exc:
            raise StartupError(str(exc)) from exc
        self._background: list[asyncio.Task[None]] = []
        self.pack_files = PackFiles(config.packs)
        self.executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="pipeline",
            initializer=streams.name_os_thread,
            initargs=(streams.PIPELINE_THREAD,),
        )
        self.running: RunningSidecar | None = None
        self.service: SafetyMonitorService | None = None

    async def start(self) -> RunningSidecar:
        """Bind the gRPC and metrics ports and start serving; returns what was started."""
        max_bytes = self.config.limits.max_message_bytes
        security = self.config.security
        try:
            tokens = read_tokens(security)
            credentials = server_credentials(security)
        except (OSError, ValueError) as exc:
            raise StartupError(f"security: {exc}") from exc
        server = grpc.aio.server(
            interceptors=[BearerTokenInterceptor(tokens)] if tokens else [],
            options=server_options(max_bytes),
        )
        self.service = SafetyMonitorService(
            self.pipeline, self.executor, self.metrics, tokens, widen=self.device == "cpu"
        )
        add_servicer(self.service, server)
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
            # Registered from the start (NOT_SERVING until the store is open), never NOT_FOUND.
            audit_status = health_pb2.HealthCheckResponse.SERVING
            if not self.actions.audit_healthy:
                audit_status = health_pb2.HealthCheckResponse.NOT_SERVING
            await health_servicer.set(AUDIT_HEALTH_SERVICE, audit_status)
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
        if self.service is not None:  # through the worker: no batch runs inline meanwhile
            return await self.service.worker.run(self._reload_on_pipeline, force)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self._reload_on_pipeline, force)

    def _reload_on_pipeline(self, force: bool) -> bool | None:
        # Off the event loop: a stat() of a pack on a stalled mount must not hold up acks.
        for path in self.pack_files.changed():
            # Packs load once: the rules keep expanding pooled() from the running pack, so
            # probe weights and pooling stay one fit (never new pooling over old weights).
            log.warning(
                "pack file changed on disk; serving the pack loaded at start (pooled() rules "
                "keep its pooling): restart the sidecar to serve the new one",
                pack=str(path),
            )
        result = self.reloader.check(force=force)
        if result is None:
            return None
        if result.ok and result.ruleset is not None:
            replaced = weakref.ref(self.pipeline.ruleset)
            self.pipeline.replace_rules(result.ruleset)
            release_replaced(replaced)
            self.metrics.rule_reloads.labels(result="ok").inc()
            log.info("rules reloaded", rules=len(result.ruleset.rules))
            for note in result.ruleset.notes:
                log.warning("rule note", note=note)
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
    """Run until SIGTERM or SIGINT, then drain.

    The handlers go in before the sidecar starts: `start()` logs 'sidecar started', the line
    a supervisor (and the test fixtures) take for ready, and `settle_heap()`'s full collection
    follows it (~0.1 s, more on a loaded machine). A SIGTERM (or SIGHUP) in that window used
    to meet the default action and kill the process (exit -15) with no drain and no audit
    flush. Now a SIGTERM during start-up sets `stop`: the sidecar finishes starting, then
    drains."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sidecar = Sidecar(config)
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
    await sidecar.start()
    settle_heap()
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
        """Start the loop thread and the sidecar on it; returns once it serves (30 s at most)."""
        self._thread.start()
        return asyncio.run_coroutine_threadsafe(self.sidecar.start(), self._loop).result(30)

    def stop(self) -> None:
        """Drain and stop the sidecar, then its loop and thread."""
        asyncio.run_coroutine_threadsafe(self.sidecar.stop(), self._loop).result(60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
