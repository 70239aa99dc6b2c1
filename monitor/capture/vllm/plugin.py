"""The `vllm.general_plugins` entry point: monitoring by configuration alone.

vLLM calls `register()` in every process it starts (the frontend, the engine core and each
worker). With `SAFETY_MONITOR_TARGET` unset it does nothing. Otherwise it patches, in each
process, only what that process runs, when vLLM imports it (a post-import hook: no extra
imports, and workers forked from the engine core inherit the patches):

- frontend (`InputProcessor`, `ParentRequest`, `EngineArgs`): tags each request with the id
  the user gave and, for `n > 1`, the sequence index (so conversations are `<id>/<j>`), and
  refuses speculative decoding at start;
- engine core (`Scheduler`): guard mode, see guard.py;
- workers (`GPUModelRunner`, which the CPU runner extends): capture, see worker.py and op.py.

Whether configured or not, workers get two methods for `LLM.collective_rpc`:
`safety_monitor_report` and `safety_monitor_flush`.
"""

from __future__ import annotations

import importlib.abc
import sys
import threading
from collections.abc import Callable
from copy import copy
from time import perf_counter_ns, thread_time_ns
from types import ModuleType
from typing import Any

import structlog

from monitor.capture.vllm.batch import REQUEST_KEY, SEQUENCE_KEY
from monitor.capture.vllm.config import PluginSettings, load_settings

log = structlog.get_logger("safety_monitor.capture.vllm")

_settings: PluginSettings | None = None
_registered = False
_lock = threading.Lock()


def register() -> None:
    """Called by vLLM in every process that loads general plugins; idempotent."""
    global _settings, _registered
    with _lock:
        if _registered:
            return
        _registered = True
        _settings = load_settings()  # a configuration error stops vLLM here, by design
        # The report works with the monitor off too (it says so), for operators and tests.
        when_imported("vllm.v1.worker.worker_base", _patch_worker_base)
        if _settings is None:
            return
        when_imported("vllm.engine.arg_utils", _patch_engine_args)
        when_imported("vllm.v1.engine.input_processor", _patch_input_processor)
        when_imported("vllm.v1.engine.parallel_sampling", _patch_parallel_sampling)
        when_imported("vllm.v1.core.sched.scheduler", _patch_scheduler)
        when_imported("vllm.v1.worker.gpu_model_runner", _patch_runner)
        when_imported("vllm.v1.worker.cpu_model_runner", _patch_cpu_runner)


def settings() -> PluginSettings | None:
    return _settings


# ---- post-import hooks ----------------------------------------------------------------------


class _PostImport(importlib.abc.MetaPathFinder):
    """Runs callbacks right after a module is executed (the first import only)."""

    def __init__(self) -> None:
        self.callbacks: dict[str, list[Callable[[ModuleType], None]]] = {}

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name not in self.callbacks:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        original = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            original(module)
            for callback in self.callbacks.pop(name, []):
                callback(module)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


_finder = _PostImport()


def when_imported(name: str, callback: Callable[[ModuleType], None]) -> None:
    """Call `callback(module)` now if `name` is imported, else right after its import."""
    module = sys.modules.get(name)
    if module is not None:
        callback(module)
        return
    _finder.callbacks.setdefault(name, []).append(callback)
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


# ---- frontend -------------------------------------------------------------------------------


def _patch_engine_args(module: ModuleType) -> None:
    engine_args = module.EngineArgs
    original = engine_args.create_engine_config

    def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        config = original(self, *args, **kwargs)
        if config.speculative_config is not None:
            from monitor.capture.vllm.worker import speculative_refusal

            raise ValueError(speculative_refusal(config.speculative_config))
        return config

    engine_args.create_engine_config = create_engine_config


def _patch_input_processor(module: ModuleType) -> None:
    processor = module.InputProcessor
    original = processor.assign_request_id

    def assign_request_id(request: Any) -> None:
        original(request)
        params = getattr(request, "sampling_params", None)
        if params is not None:
            # params are this request's own clone (made in process_inputs)
            params.extra_args = {**(params.extra_args or {}), REQUEST_KEY: request.external_req_id}

    processor.assign_request_id = staticmethod(assign_request_id)


def _patch_parallel_sampling(module: ModuleType) -> None:
    parent = module.ParentRequest
    original = parent.get_child_info

    def get_child_info(self: Any, index: int) -> tuple[str, Any]:
        request_id, params = original(self, index)
        params = copy(params)  # children may share one params object
        params.extra_args = {**(params.extra_args or {}), SEQUENCE_KEY: index}
        return request_id, params

    parent.get_child_info = get_child_info


# ---- engine core ----------------------------------------------------------------------------


def _patch_scheduler(module: ModuleType) -> None:
    from monitor.capture.vllm import guard

    guard.install()


# ---- workers --------------------------------------------------------------------------------


def _hook_failed(capture: Any, message: str) -> None:
    """Nothing may raise into the engine: a monitoring bug must not stop serving. Log it
    and count the step as dropped."""
    log.exception(message)
    if capture.client is not None:
        capture.client.count_drop("hook_error")


def _patch_runner(module: ModuleType) -> None:
    runner_class = module.GPUModelRunner
    _wrap_load_model(runner_class)
    original_prepare = runner_class._prepare_inputs
    original_execute = runner_class.execute_model
    original_sample = runner_class.sample_tokens

    def _prepare_inputs(self: Any, scheduler_output: Any, num_scheduled_tokens: Any) -> Any:
        result = original_prepare(self, scheduler_output, num_scheduled_tokens)
        capture = getattr(self, "_safety_monitor", None)
        if capture is not None:
            try:  # keeps two references, read after the forward: not timed (PluginTiming)
                capture.note_layout(self, num_scheduled_tokens)
            except Exception:  # this step is then not captured
                _hook_failed(capture, "safety-monitor: could not read a step's layout")
        return result

    def execute_model(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        output = original_execute(self, scheduler_output, *args, **kwargs)
        capture = getattr(self, "_safety_monitor", None)
        if capture is not None:
            cpu, wall = thread_time_ns(), perf_counter_ns()
            forward = capture.has_layout  # a call that only reports finished requests has none
            try:
                capture.after_forward(self, scheduler_output)
            except Exception:
                _hook_failed(capture, "safety-monitor: capture failed for a step")
            capture.timing.add(cpu, wall, step=forward)
        return output

    def sample_tokens(self: Any, *args: Any, **kwargs: Any) -> Any:
        output = original_sample(self, *args, **kwargs)
        capture = getattr(self, "_safety_monitor", None)
        if capture is None or not capture.is_output_rank or capture.nothing_to_hand_back:
            return output  # the usual step: no block pending, none waited for (not timed)
        cpu, wall = thread_time_ns(), perf_counter_ns()
        try:
            blocks = capture.take_blocks()
        except Exception:
            # Fail open: a guard bug must not stop serving (the step's output goes unchanged).
            log.exception("safety-monitor: could not hand back this step's blocks")
            blocks = {}
        capture.timing.add(cpu, wall)
        if blocks:
            from monitor.capture.vllm.guard import BLOCKS_ATTR

            output = _with_blocks(output, blocks, BLOCKS_ATTR)
        return output

    runner_class._prepare_inputs = _prepare_inputs
    runner_class.execute_model = execute_model
    runner_class.sample_tokens = sample_tokens


def _patch_worker_base(module: ModuleType) -> None:
    """Operator calls by name: `llm.collective_rpc("safety_monitor_report")` and
    `llm.collective_rpc("safety_monitor_flush", args=(timeout,))`."""

    def safety_monitor_report(worker: Any) -> dict[str, Any]:
        from monitor.capture.vllm.worker import capture_report

        return capture_report(worker)

    def safety_monitor_flush(worker: Any, timeout: float = 30.0) -> bool:
        from monitor.capture.vllm.worker import capture_flush

        return capture_flush(worker, timeout)

    module.WorkerBase.safety_monitor_report = safety_monitor_report
    module.WorkerBase.safety_monitor_flush = safety_monitor_flush


def _patch_cpu_runner(module: ModuleType) -> None:
    _wrap_load_model(module.CPUModelRunner)  # it overrides load_model


def _wrap_load_model(runner_class: type) -> None:
    original = runner_class.__dict__["load_model"]

    def load_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        if _settings is not None and getattr(self, "_safety_monitor", None) is None:
            from monitor.capture.vllm.worker import WorkerCapture

            self._safety_monitor = WorkerCapture(_settings, self)
        return result

    runner_class.load_model = load_model


def _with_blocks(output: Any, blocks: dict[str, str], attr: str) -> Any:
    """The output with the blocks attached (never on vLLM's shared empty output)."""
    get_output = getattr(output, "get_output", None)
    if get_output is not None:  # async scheduling: the output is built later

        def deferred() -> Any:
            return _with_blocks(get_output(), blocks, attr)

        output.get_output = deferred
        return output
    output = copy(output)
    setattr(output, attr, blocks)
    return output
