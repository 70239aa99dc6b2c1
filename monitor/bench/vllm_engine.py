"""A vLLM engine in its own process, driven by JSON lines on stdin (one JSON reply line each,
`{"reply": ...}`):
`python -m monitor.bench.vllm_engine '<LLM keyword arguments as JSON>'`. Used by
`safety-monitor bench overhead --engine vllm` and by the vLLM integration tests.

vLLM starts its engine core and workers with multiprocessing, which needs the engine to be
created under `if __name__ == "__main__":`; running it as a script also lets one engine serve
a whole test module. The monitor plugin is configured by the environment the test gives it.

Commands:
  {"op": "run", "requests": [...], "max_steps": N}   each request: id, prompt (token ids),
      params (SamplingParams keyword arguments), optional request_id (the id given to vLLM,
      default id; two requests may share one if their prompts differ), start_step (add it
      before that engine step), abort_after (abort once it has that many output tokens);
      -> {"results": {id: {"outputs": [{token_ids, finish_reason, stop_reason}], ...}}}
  {"op": "report"} -> the workers' capture reports;  {"op": "flush"} -> bool per worker
  {"op": "probe_hooks"} -> installs a forward hook counter on every decoder layer (tests:
      it shows whether forward hooks run at all; needs VLLM_ALLOW_INSECURE_SERIALIZATION=1)
  {"op": "hook_calls"} -> how often those hooks ran
  {"op": "monitor", "on": bool, "keep_op": bool} -> turns the plugin's work off or back on
      in this engine (bench: the same engine with and without the monitor, see
      `bench overhead --engine vllm --same-engine`; needs VLLM_ALLOW_INSECURE_SERIALIZATION=1)
  {"op": "linger", "ms": N | null} -> sends the next steps through a capture client whose
      relay lingers N ms (null: switch nothing); returns per worker the client's relay pid
      and its counters and the plugin's time so far (bench: `--linger-ms 0,20`, several
      lingers in one engine; needs VLLM_ALLOW_INSECURE_SERIALIZATION=1)
  {"op": "quit"}
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any


def _hook_layers(worker: Any) -> int:
    from monitor.capture.layers import find_layer_list

    layers = find_layer_list(worker.model_runner.get_model())
    worker._probe_calls = 0

    def hook(*_: Any) -> None:
        worker._probe_calls += 1

    for layer in layers:
        layer.register_forward_hook(hook)
    return len(layers)


def _hook_calls(worker: Any) -> int:
    return getattr(worker, "_probe_calls", -1)


def _set_monitor(worker: Any, on: bool, keep_op: bool) -> bool:
    """Off: the runner forgets its capture (no layout, no split, nothing sent) and, unless
    `keep_op`, the chosen layers lose their buffers, so the capture op is not called either
    (eager mode only: a compiled graph keeps the op it was compiled with). On: both back.
    Returns whether the monitor is now on. Between runs only: requests that start while it
    is off are not tracked; tracked ones that ended while it was off (vLLM reports an end in
    the next step only, so the last run's ends arrive while off) are finished when it comes
    back on, so the sidecar still sees their conversations end."""
    from monitor.capture.layers import find_layer_list
    from monitor.capture.vllm import op

    runner = worker.model_runner
    layers = find_layer_list(runner.get_model())
    saved = getattr(runner, "_bench_saved_monitor", None)
    if not on and saved is None and getattr(runner, "_safety_monitor", None) is not None:
        buffers = {}
        if not keep_op:
            for index, layer in enumerate(layers):
                if op.BUFFER_ATTR in layer._buffers:
                    buffers[index] = layer._buffers.pop(op.BUFFER_ATTR)
        runner._bench_saved_monitor = (runner._safety_monitor, buffers)
        runner._safety_monitor = None
    elif on and saved is not None:
        runner._safety_monitor, buffers = saved
        for index, buffer in buffers.items():
            layers[index].register_buffer(op.BUFFER_ATTR, buffer, persistent=False)
        runner._bench_saved_monitor = None
        runner._safety_monitor.finish_missing(runner.requests)
    return getattr(runner, "_safety_monitor", None) is not None


def _use_linger(worker: Any, linger_ms: float | None) -> dict[str, Any] | None:
    """Send the next steps through the capture client whose relay lingers `linger_ms`: the
    plugin's own client serves the linger it was configured with, any other is started here
    on first use (the plugin's settings otherwise, its own relay and sidecar stream; no
    metrics). Between runs only. A run's conversation ends go out in the next run's first
    step (vLLM reports an end in the step after), through whichever client that run uses:
    the sidecar keys conversations by client identity, not by stream, so they still end.
    Returns the active client's relay pid and counters, and the plugin's time so far (the
    bench takes them around each run); None without a capture on this worker, and
    {"refused": why} for a linger the plugin would not use (`block_within` set)."""
    import dataclasses

    capture = getattr(worker.model_runner, "_safety_monitor", None)
    if capture is None or capture.client is None:
        return None
    if linger_ms is not None:
        settings = dataclasses.replace(capture.settings, linger_ms=float(linger_ms))
        if settings.effective_linger_ms != float(linger_ms):
            # As the plugin itself: a guard that waits for every step's verdict never lingers.
            return {"refused": f"linger {linger_ms:g} ms with block_within set"}
    clients = getattr(worker, "_bench_clients", None)
    if clients is None:
        clients = worker._bench_clients = {capture.settings.effective_linger_ms: capture.client}
    if linger_ms is not None:
        client = clients.get(float(linger_ms))
        if client is None:
            from monitor.capture.client import CaptureClient

            client = clients[float(linger_ms)] = CaptureClient(
                settings.target,
                on_alert=capture._on_alert,
                metrics_registry=None,
                **settings.client_kwargs(),
            )
        capture.client = client
    client = capture.client
    stats = client.stats
    process = getattr(getattr(client, "_link", None), "_process", None)  # the relay's
    return {
        "linger_ms": next(value for value, known in clients.items() if known is client),
        "relay_pid": None if process is None else process.pid,
        "plugin_steps": capture.timing.steps,
        "plugin_cpu_ns": capture.timing.cpu_ns,
        "steps_captured": stats.steps_captured,
        "batches_acked": stats.batches_acked,
        "messages_sent": stats.messages_sent,
        "dropped": sum(stats.dropped.values()),
    }


def run(engine: Any, requests: list[dict[str, Any]], max_steps: int) -> dict[str, Any]:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    pending = sorted(requests, key=lambda r: r.get("start_step", 0))
    results: dict[str, Any] = {}
    live: dict[str, dict[str, Any]] = {}
    step = 0
    step_seconds: list[float] = []
    started = time.monotonic()
    while (pending or live) and step < max_steps:
        while pending and pending[0].get("start_step", 0) <= step:
            request = pending.pop(0)
            params = SamplingParams(
                **request.get("params", {}), output_kind=RequestOutputKind.CUMULATIVE
            )
            vllm_id = request.get("request_id", request["id"])
            engine.add_request(vllm_id, {"prompt_token_ids": request["prompt"]}, params)
            live[(vllm_id, tuple(request["prompt"]))] = request
        step_started = time.perf_counter()
        outputs = engine.step()
        step_seconds.append(time.perf_counter() - step_started)
        for output in outputs:
            # Outputs carry the id given to vLLM; requests sharing one differ by prompt.
            key = (output.request_id, tuple(output.prompt_token_ids or ()))
            request = live.get(key)
            if request is None:
                continue
            # With n > 1 a step reports only the sequences that moved: keep each by index.
            completions = request.setdefault("_completions", {})
            for o in output.outputs:
                completions[o.index] = {
                    "token_ids": list(o.token_ids),
                    "finish_reason": o.finish_reason,
                    "stop_reason": o.stop_reason,
                }
            results[request["id"]] = {
                "outputs": [completions[i] for i in sorted(completions)],
                "prompt_len": len(output.prompt_token_ids or []),
                "num_cached_tokens": output.num_cached_tokens,
                "finished": output.finished,
            }
            limit = request.get("abort_after")
            if output.finished:
                del live[key]
            elif limit is not None and max(len(o.token_ids) for o in output.outputs) >= limit:
                engine.abort_request([output.request_id])  # every request given that id
                results[request["id"]]["aborted_by_client"] = True
                del live[key]
        step += 1
    return {
        "results": results,
        "steps": step,
        "seconds": time.monotonic() - started,
        "step_seconds": step_seconds,
    }


def main() -> None:
    engine_kwargs = json.loads(sys.argv[1])
    from vllm import LLM

    llm = LLM(**engine_kwargs)
    engine = llm.llm_engine
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        op = command["op"]
        if op == "run":
            reply: Any = run(engine, command["requests"], command.get("max_steps", 5000))
        elif op == "report":
            reply = llm.collective_rpc("safety_monitor_report")
        elif op == "flush":
            reply = llm.collective_rpc("safety_monitor_flush", args=(command.get("timeout", 30.0),))
        elif op == "probe_hooks":
            reply = llm.collective_rpc(_hook_layers)
        elif op == "hook_calls":
            reply = llm.collective_rpc(_hook_calls)
        elif op == "monitor":
            reply = llm.collective_rpc(
                _set_monitor, args=(command["on"], command.get("keep_op", False))
            )
        elif op == "linger":
            reply = llm.collective_rpc(_use_linger, args=(command["ms"],))
        elif op == "quit":
            print(json.dumps({"reply": "bye"}), flush=True)
            break
        else:
            reply = {"error": f"unknown op {op!r}"}
        print(json.dumps({"reply": reply}), flush=True)
    del llm


if __name__ == "__main__":
    main()
