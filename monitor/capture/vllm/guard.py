"""Guard mode on the scheduler's side: stop the requests a `block` alert named.

The alert reaches the worker that captured the tokens (worker.py); the worker puts the
request ids on the ModelRunnerOutput it returns, which vLLM already carries to the engine
core's scheduler (across processes with the multiprocessing executor). There,
`Scheduler.update_from_output` picks them up, and the stop check it runs for every request
that sampled a token this step finishes a blocked one as FINISHED_ABORTED, with
`stop_reason = "safety-monitor: <rule>"`. The user sees `finish_reason == "abort"` on
that request, as for an engine-side abort; other requests of the batch are untouched.

Bound: a request stops at the first step whose output carries its block, i.e. the tokens
sampled after the firing token are those of the steps the alert takes to come back (the
sidecar's latency, in decode steps) plus the one sampled in the step that stops it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import structlog

log = structlog.get_logger("safety_monitor.capture.vllm")

STOP_REASON_PREFIX = "safety-monitor: "
BLOCKS_ATTR = "safety_monitor_blocks"  # on ModelRunnerOutput: {request id: rule}
_MAX_BLOCKED = 100_000

# request id -> rule, in the engine core process
_blocked: OrderedDict[str, str] = OrderedDict()
stopped = 0  # requests stopped by a block, in this process


def install() -> None:
    """Patch the V1 scheduler (idempotent)."""
    from vllm.v1.core.sched import scheduler as scheduler_module
    from vllm.v1.request import RequestStatus

    if getattr(scheduler_module, "_safety_monitor_guard", False):
        return
    original_check_stop = scheduler_module.check_stop
    original_update = scheduler_module.Scheduler.update_from_output

    def check_stop(request: Any, *args: Any, **kwargs: Any) -> bool:
        global stopped
        if _blocked:
            rule = _blocked.pop(request.request_id, None)
            if rule is not None:
                request.status = RequestStatus.FINISHED_ABORTED
                request.stop_reason = STOP_REASON_PREFIX + rule
                stopped += 1
                return True
        return original_check_stop(request, *args, **kwargs)

    def update_from_output(self: Any, scheduler_output: Any, model_runner_output: Any) -> Any:
        blocks = getattr(model_runner_output, BLOCKS_ATTR, None)
        if blocks:
            for request_id, rule in blocks.items():
                if request_id in self.requests:
                    _blocked[request_id] = rule
            while len(_blocked) > _MAX_BLOCKED:
                _blocked.popitem(last=False)
        outputs = original_update(self, scheduler_output, model_runner_output)
        if _blocked:
            # Requests that finished some other way before they sampled again.
            for request_id in [r for r in _blocked if r not in self.requests]:
                del _blocked[request_id]
        return outputs

    scheduler_module.check_stop = check_stop
    scheduler_module.Scheduler.update_from_output = update_from_output
    scheduler_module._safety_monitor_guard = True
