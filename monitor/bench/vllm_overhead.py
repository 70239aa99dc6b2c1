"""`safety-monitor bench overhead --engine vllm`: what the vLLM plugin costs generation.

The measurement isolates the monitor's cost on the serving process:

- three engines of the same tiny random-weight Llama (each its own process tree, started by
  `monitor.bench.vllm_engine`): monitor off, on with a real sidecar, on with nothing
  listening (fail-open);
- the engines start together on every CPU (start-up, compilation included, is most of the
  bench's time), then every thread of each is pinned to one CPU (`OMP_NUM_THREADS=1` so no
  idle OpenMP thread spins, vLLM's own thread binding off), the sidecar and each engine's
  capture relay (`SAFETY_MONITOR_RELAY_CPUS`) to the other CPUs: in production the sidecar
  has CPUs of its own, and what the engine pays is the capture op, the copy onto the ring and
  the plugin's Python, which this keeps on the engine's CPU;
- only one engine generates at a time: a round runs the same batch of greedy requests on each
  engine in turn (the order rotating each round, so drift hits every mode alike), many short
  rounds; between runs the sidecar catches up (a flush, not timed), so its backlog never
  overlaps the next engine's run;
- the engines not generating are paused (SIGSTOP to their process group, after their
  sidecar has caught up): vLLM's worker busy-polls its message queue (`sched_yield`) for a
  second after each message, so an engine that has just run would take the CPU from the next
  one (an early version of this bench saw the monitor-off engine run 2x slower than the
  others from that alone). Their CPU use once that second is over is measured and reported
  (small but not zero: 1.5-4.5% of a CPU in the README's runs).

Reported per execution mode (compiled, vLLM's default, and eager) and engine mode: median
generation throughput over rounds (output tokens/s), median inter-token latency (engine step
time in the decode phase), and the throughput loss against monitor-off paired per round
(1 - tokens/s of the mode / tokens/s of the off engine in the same round): its median and
spread (quartiles, min, max). Needs vLLM installed (the project's `make vllm-venv`).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ENGINE_MODES = ("off", "sidecar-up", "sidecar-down")
CONTROL_MODE = "off-control"  # a second monitor-off engine: the bench's own noise and bias
# A sidecar-up engine running another checkout's monitor code: two plugin versions side by side.
BASELINE_MODE = "up-baseline"
HIDDEN = 256
IDLE_WINDOW_S = 2.0
IDLE_AFTER_S = 1.5  # vLLM's worker busy-polls its message queue for 1 s after a message

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": HIDDEN,
    "intermediate_size": 704,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "num_hidden_layers": 4,
    "vocab_size": 8192,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "torch_dtype": "float32",
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
}


def _pin_engine(session: int, engine_cpus: set[int], side_cpus: set[int]) -> dict[str, int]:
    """Move a started engine's processes (every thread of each) to the engine CPUs and its
    capture relay to the monitor's CPUs; returns how many threads went where. Threads started
    later inherit their creator's mask."""
    moved = {"engine": 0, "relay": 0}
    for pid in _session_pids(session):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            continue
        relay = b"monitor.capture.relay" in cmdline
        for tid in tids:
            with contextlib.suppress(OSError):  # a thread that just exited
                os.sched_setaffinity(tid, side_cpus if relay else engine_cpus)
                moved["relay" if relay else "engine"] += 1
    return moved


@contextlib.contextmanager
def _this_thread_on(cpus: set[int] | None) -> Iterator[None]:
    """Run the block with this thread pinned to `cpus`: a process started meanwhile inherits
    the mask (Linux affinity is per thread and inherited across fork)."""
    if cpus is None:
        yield
        return
    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, previous)


class _Engine:
    def __init__(
        self, kwargs: dict[str, Any], env: dict[str, str], log: Path, cwd: str | None = None
    ) -> None:
        self._log = log.open("wb")
        self._out = log.with_suffix(".out")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "monitor.bench.vllm_engine", json.dumps(kwargs)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env={**os.environ, "OMP_NUM_THREADS": "1", **env},
            # `python -m` puts the working directory ahead of PYTHONPATH on sys.path.
            cwd=cwd,
            start_new_session=True,
        )
        self.paused = False
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        with self._out.open("wb") as out:  # vLLM logs to stdout; replies are JSON lines
            for line in self.process.stdout:
                text = line.decode(errors="replace").strip()
                if text.startswith("{"):
                    self._lines.put(text)
                else:
                    out.write(line)
        self._lines.put(None)

    def reply(self, timeout: float) -> Any:
        line = self._lines.get(timeout=timeout)
        if line is None:
            raise RuntimeError(f"a vLLM engine exited ({self.process.poll()}); see {self._out}")
        return json.loads(line)

    def call(self, command: dict[str, Any], timeout: float = 600.0) -> Any:
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps(command) + "\n").encode())
        self.process.stdin.flush()
        return self.reply(timeout)["reply"]

    def pause(self) -> None:
        """Stop every process of this engine (SIGSTOP to its process group): an idle vLLM
        worker busy-polls for a second after its last message, on the active engine's CPU."""
        os.killpg(self.process.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        os.killpg(self.process.pid, signal.SIGCONT)
        self.paused = False

    def cpu_seconds(self) -> float:
        """CPU time used so far by every process of this engine's session (its tree)."""
        return sum(_cpu_seconds(pid) for pid in _session_pids(self.process.pid))

    def stop(self) -> None:
        try:
            if self.process.poll() is None:
                if self.paused:
                    self.resume()
                self.call({"op": "quit"}, timeout=60)
                self.process.wait(60)
        except Exception:
            pass
        if self.process.poll() is None:
            os.killpg(self.process.pid, 9)
            self.process.wait(30)
        self._log.close()


def _session_pids(session: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[3]) == session:  # field 6 of stat: the session id
            pids.append(int(entry))
    return pids


def _cpu_seconds(pid: int) -> float:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def plan_cpus(available: set[int]) -> tuple[set[int] | None, set[int] | None]:
    """(engine CPUs, sidecar + relay CPUs): the lowest CPU for the engines, the rest for the
    monitor's own processes. With one CPU nothing is pinned (None, None)."""
    if len(available) < 2:
        return None, None
    ordered = sorted(available)
    return {ordered[0]}, set(ordered[1:])


def _cpu_text(cpus: set[int] | None) -> str:
    return "unpinned" if cpus is None else ",".join(str(c) for c in sorted(cpus))


def _start_sidecar(workdir: Path, cpus: set[int] | None) -> tuple[Any, str]:
    from monitor.fixtures import start_sidecar, write_layer_sae

    sae = write_layer_sae(workdir / "sae", HIDDEN, 64, 1, seed=5)
    pack = workdir / "bench.pack.safetensors"
    build = ["pack", "build", "--sae", str(sae), "--features", "0,1,2,3", "--name", "bench"]
    subprocess.run(
        [sys.executable, "-m", "monitor.cli", *build, "--out", str(pack)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    rules = workdir / "rules.yaml"
    rules.write_text(
        "features: {f: bench/0}\nrules:\n"
        "  - rule: sustained\n    severity: info\n    condition: f > 1000\n    for: 8\n"
    )
    with _this_thread_on(cpus):
        sidecar = start_sidecar({"packs": [str(pack)], "rules": [str(rules)]}, workdir)
    return sidecar, sidecar.target


def run_vllm_overhead_bench(
    rounds: int = 30,
    requests: int = 4,
    prompt_tokens: int = 32,
    new_tokens: int = 32,
    layers: str = "1",
    eager_modes: tuple[bool, ...] = (False, True),
    control: bool = False,
    baseline_tree: str | None = None,
) -> dict[str, Any]:
    """Measure the three engine modes for each execution mode; returns the results. With
    `control`, a second monitor-off engine runs in every round too: its loss against the
    first is what the bench measures when the monitor costs nothing. With `baseline_tree`
    (another checkout of this project), a sidecar-up engine imports the monitor from there:
    its plugin ms/step and loss next to sidecar-up's compare two versions in one run."""
    modes = ENGINE_MODES + ((CONTROL_MODE,) if control else ())
    if baseline_tree is not None:
        baseline_tree = str(Path(baseline_tree).resolve())
        if not (Path(baseline_tree) / "monitor" / "capture" / "vllm").is_dir():
            raise ValueError(f"--baseline-tree {baseline_tree}: not a checkout of this project")
        modes += (BASELINE_MODE,)
    workdir = Path(tempfile.mkdtemp(prefix="sm-bench-vllm-"))
    # A fixed model path: vLLM's compile cache is then reused by the next run (start-up is
    # most of this bench's time). In the user's own cache directory, not a shared /tmp name
    # that another user could create first (and point config.json elsewhere).
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    model = cache / "safety-monitor" / "bench-vllm-model"
    model.mkdir(mode=0o700, parents=True, exist_ok=True)
    (model / "config.json").write_text(json.dumps(TINY_LLAMA))
    engine_cpus, side_cpus = plan_cpus(os.sched_getaffinity(0))
    sidecar, target = _start_sidecar(workdir, side_cpus)
    batch = [
        {
            "id": f"r{i}",
            "prompt": [(7 * i + j) % 8000 + 10 for j in range(prompt_tokens)],
            "params": {"max_tokens": new_tokens, "temperature": 0.0, "ignore_eos": True},
        }
        for i in range(requests)
    ]
    results: dict[str, Any] = {
        "model": f"Llama-style, hidden {HIDDEN}, 4 layers, float32, random weights",
        "requests": requests,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "layers": layers,
        "rounds": rounds,
        "baseline_tree": baseline_tree,
        "engine_cpus": _cpu_text(engine_cpus),
        "monitor_cpus": _cpu_text(side_cpus),
        "execution": {},
    }
    started = time.monotonic()
    try:
        for eager in eager_modes:
            name = "eager" if eager else "compiled"
            results["execution"][name] = _measure(
                workdir / name,
                model,
                eager,
                target,
                layers,
                batch,
                rounds,
                engine_cpus,
                side_cpus,
                modes,
                baseline_tree,
            )
    finally:
        sidecar.stop()
    results["seconds"] = round(time.monotonic() - started, 1)
    return results


def _measure(
    workdir: Path,
    model: Path,
    eager: bool,
    target: str,
    layers: str,
    batch: list[dict[str, Any]],
    rounds: int,
    engine_cpus: set[int] | None,
    side_cpus: set[int] | None,
    modes: tuple[str, ...] = ENGINE_MODES,
    baseline_tree: str | None = None,
) -> dict[str, Any]:
    workdir.mkdir(parents=True)
    kwargs = {
        "model": str(model),
        "load_format": "dummy",
        "skip_tokenizer_init": True,
        "dtype": "float32",
        "seed": 0,
        "max_model_len": 256,
        "max_num_seqs": 8,
        "enforce_eager": eager,
        "enable_prefix_caching": False,  # every round computes every token
        # A fixed KV cache: vLLM's CPU default is a fraction of the machine's memory, and three
        # engines are up at once.
        "kv_cache_memory_bytes": 256 * 1024 * 1024,
    }
    from monitor.fixtures import free_port

    pinning: dict[str, str] = {}
    if engine_cpus is not None and side_cpus is not None:
        pinning = {
            # vLLM's CPU worker would bind its OpenMP threads to CPUs of its choosing; the
            # bench pins the engines itself once they are up (they start on every CPU).
            "VLLM_CPU_OMP_THREADS_BIND": "nobind",
            "SAFETY_MONITOR_RELAY_CPUS": _cpu_text(side_cpus),
        }
    down = f"127.0.0.1:{free_port()}"  # nothing listens there
    envs = {
        "off": {},
        CONTROL_MODE: {},
        "sidecar-up": {"SAFETY_MONITOR_TARGET": target, "SAFETY_MONITOR_LAYERS": layers},
        "sidecar-down": {"SAFETY_MONITOR_TARGET": down, "SAFETY_MONITOR_LAYERS": layers},
    }
    if baseline_tree is not None:
        envs[BASELINE_MODE] = {**envs["sidecar-up"], "PYTHONPATH": baseline_tree}
    engines: dict[str, _Engine] = {}
    try:
        # All three start at once, on every CPU (start-up is most of this bench's time)...
        for mode in modes:
            cwd = baseline_tree if mode == BASELINE_MODE else None
            engines[mode] = _Engine(
                kwargs, {**pinning, **envs[mode]}, workdir / f"{mode}.log", cwd=cwd
            )
        for engine in engines.values():
            engine.reply(timeout=1800)
        # ...and are pinned before anything is measured.
        if engine_cpus is not None and side_cpus is not None:
            for engine in engines.values():
                _pin_engine(engine.process.pid, engine_cpus, side_cpus)
        for engine in engines.values():
            engine.call({"op": "run", "requests": _renamed(batch, "warmup")})
            engine.call({"op": "flush", "timeout": 30.0})
        idle = _idle_cpu(engines)
        # The plugin's own time is counted from here: the measured rounds only.
        before = {mode: engines[mode].call({"op": "report"})[0] for mode in modes}
        for engine in engines.values():
            engine.pause()
        tps: dict[str, list[float]] = {mode: [] for mode in modes}
        steps: dict[str, list[float]] = {mode: [] for mode in modes}
        for index in range(rounds):
            shift = index % len(modes)
            order = modes[shift:] + modes[:shift]
            for mode in order:
                engine = engines[mode]
                engine.resume()
                reply = engine.call({"op": "run", "requests": _renamed(batch, str(index))})
                tokens = sum(len(r["outputs"][0]["token_ids"]) for r in reply["results"].values())
                tps[mode].append(tokens / reply["seconds"])
                steps[mode].extend(reply["step_seconds"][2:])  # after the prefill step(s)
                # Let the sidecar and relay catch up before the next engine runs (not timed).
                engine.call({"op": "flush", "timeout": 30.0})
                engine.pause()
        for engine in engines.values():
            engine.resume()
        reports = {mode: engines[mode].call({"op": "report"})[0] for mode in modes}
    finally:
        for engine in engines.values():
            engine.stop()
    rows = {}
    off_itl_ms = 1000 * statistics.median(steps["off"])
    for mode in modes:
        losses = sorted(100 * (1 - m / b) for m, b in zip(tps[mode], tps["off"], strict=True))
        report = reports[mode]
        plugin = _plugin_ms_per_step(before[mode], report)
        rows[mode] = {
            "tokens_per_s": statistics.median(tps[mode]),
            "itl_ms_p50": 1000 * statistics.median(steps[mode]),
            "loss_pct_median": statistics.median(losses),
            "loss_pct_q1": _quantile(losses, 0.25),
            "loss_pct_q3": _quantile(losses, 0.75),
            "loss_pct_min": losses[0],
            "loss_pct_max": losses[-1],
            "idle_cpu_pct": idle[mode],
            "steps_captured": report.get("steps_captured", 0),
            "acked": report.get("batches_acked", 0),
            "dropped": sum(report.get("dropped", {}).values()),
            "op_calls": report["op_calls"],
            # The plugin's Python on the runner's thread, per forward pass (thread CPU time:
            # a busy machine barely inflates it, unlike the throughput loss), and as a share of
            # the monitor-off engine's inter-token latency.
            "plugin_ms_per_step": plugin,
            "plugin_pct_of_off_itl": None if plugin is None else 100 * plugin / off_itl_ms,
        }
    return rows


def _plugin_ms_per_step(before: dict[str, Any], after: dict[str, Any]) -> float | None:
    """Thread CPU ms the plugin spent per forward pass between two capture reports; None
    for an engine without the monitor."""
    steps = after.get("plugin_steps", 0) - before.get("plugin_steps", 0)
    if not steps:
        return None
    return (after["plugin_cpu_ns"] - before["plugin_cpu_ns"]) / steps / 1e6


def _idle_cpu(engines: dict[str, _Engine]) -> dict[str, float]:
    """Each engine's CPU use (percent of one CPU) while no engine generates, once vLLM's
    post-activity busy-poll (1 s) is over: what an idle engine would cost the active one
    if it were not paused."""
    time.sleep(IDLE_AFTER_S)
    before = {mode: engine.cpu_seconds() for mode, engine in engines.items()}
    time.sleep(IDLE_WINDOW_S)
    return {
        mode: 100 * (engine.cpu_seconds() - before[mode]) / IDLE_WINDOW_S
        for mode, engine in engines.items()
    }


def _quantile(ordered: list[float], q: float) -> float:
    if len(ordered) == 1:
        return ordered[0]
    return statistics.quantiles(ordered, n=4, method="inclusive")[round(q * 4) - 1]


def _renamed(batch: list[dict[str, Any]], tag: str) -> list[dict[str, Any]]:
    return [{**request, "id": f"{request['id']}-{tag}"} for request in batch]


def format_vllm_table(result: dict[str, Any]) -> str:
    """The result as a text table (one row per execution mode and engine mode)."""
    lines = [
        f"vLLM plugin overhead: {result['model']}; {result['requests']} requests x "
        f"{result['prompt_tokens']} prompt + {result['new_tokens']} new tokens per run, "
        f"capture on layer(s) {result['layers']}, {result['rounds']} interleaved rounds, one "
        f"engine generating at a time; engines on CPU {result['engine_cpus']}, sidecar and "
        f"relays on CPU {result['monitor_cpus']}; {result.get('seconds', 0):.0f} s",
        "loss: 1 - tokens/s against the monitor-off engine in the same round, median over "
        "rounds [quartiles] (min..max); plugin ms/step: the plugin's thread CPU time per "
        "forward pass on the model runner's thread (its % of the monitor-off ITL)",
        f"{'execution':<10}{'mode':<14}{'tokens/s':>10}{'ITL ms':>8}{'loss':>8}"
        f"{'  [q1, q3] (min..max)':<30}{'idle CPU':>9}{'captured':>10}{'acked':>8}"
        f"{'dropped':>9}{'plugin ms/step':>16}",
    ]
    for execution, rows in result["execution"].items():
        for mode, row in rows.items():
            spread = ""
            if mode != "off":
                spread = (
                    f"  [{row['loss_pct_q1']:.1f}, {row['loss_pct_q3']:.1f}] "
                    f"({row['loss_pct_min']:.1f}..{row['loss_pct_max']:.1f})"
                )
            loss = f"{row['loss_pct_median']:.2f}%" if mode != "off" else ""
            plugin = row.get("plugin_ms_per_step")
            plugin_text = (
                "" if plugin is None else f"{plugin:.3f} ({row['plugin_pct_of_off_itl']:.1f}%)"
            )
            lines.append(
                f"{execution:<10}{mode:<14}{row['tokens_per_s']:>10.1f}{row['itl_ms_p50']:>8.2f}"
                f"{loss:>8}{spread:<30}{row['idle_cpu_pct']:>8.1f}%{row['steps_captured']:>10}"
                f"{row['acked']:>8}{row['dropped']:>9}{plugin_text:>16}"
            )
    return "\n".join(lines)
