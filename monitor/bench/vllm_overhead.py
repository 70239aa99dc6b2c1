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
  engine in turn, many short rounds, in mirrored pairs (one round in an order, the next in
  the reverse order, the order rotating from pair to pair): drift hits every mode alike, and
  within a pair a linear drift cancels exactly; between runs the sidecar catches up (a flush,
  not timed), so its backlog never overlaps the next engine's run;
- the engines not generating are paused (SIGSTOP to their process group, after their
  sidecar has caught up): vLLM's worker busy-polls its message queue (`sched_yield`) for a
  second after each message, so an engine that has just run would take the CPU from the next
  one (an early version of this bench saw the monitor-off engine run 2x slower than the
  others from that alone). Their CPU use once that second is over is measured and reported
  (small but not zero: 1.5-4.5% of a CPU in the README's runs).

Reported per execution mode (compiled, vLLM's default, and eager) and engine mode: median
generation throughput over rounds (output tokens/s), median inter-token latency (engine step
time in the decode phase), and the throughput loss against monitor-off paired per round
(1 - tokens/s of the mode / tokens/s of the off engine in the same round): its median, the
95% bootstrap confidence interval of that median (monitor/bench/intervals.py: rounds
resampled, seeded) and spread (quartiles, min, max); the same per mirrored pair of rounds
(JSON: `loss_pct_pairs_*`); the plugin's thread CPU time per step; and where the CPU time
per step goes: the engine's own processes, its capture relay, the sidecar (schedstat), and the
engine's share of its CPU during each run (its on-CPU time over the run's wall time; pinned,
below 1 when the engine was idle or preempted) with its threads' run-queue wait per step,
which says which (`per_round` in the JSON).
A run is 4 requests x 32 prompt + 128 new tokens (about 0.4 s here): with 32 new tokens (0.15
s) a run was shorter than the machine's slow and fast spells, and its loss against the next
engine's run varied far more (README, Serving with vLLM, has the numbers).
`linger_ms` with several values (`--linger-ms 0,20`) runs the sidecar-up engine with each
relay linger in turn, every round (modes sidecar-up, with the first value, and
sidecar-up-linger<N>): one capture client per value in the same engine process, switched
between runs, so the linger's effect is measured without the bias between two engines.
`--pinning unpinned` (or `both`) measures with every process free to run on every CPU;
`--same-engine` adds the sidecar-up engine with its plugin switched off (mode up-paused) as a
baseline in the same process, which two separately started engines are not (`--control`
shows how far apart those are). Needs vLLM installed (the project's `make vllm-venv`).
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
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from monitor.bench.intervals import summary
from monitor.bench.workdir import bench_workdir, engine_tmp_env
from monitor.limits import MAX_LINGER_MS

ENGINE_MODES = ("off", "sidecar-up", "sidecar-down")
CONTROL_MODE = "off-control"  # a second monitor-off engine: the bench's own noise and bias
# A sidecar-up engine running another checkout's monitor code: two plugin versions side by side.
BASELINE_MODE = "up-baseline"
# The sidecar-up engine with the plugin's work turned off between runs: the same process with
# and without the monitor, free of the bias between two separately started engines (eager:
# the capture op is off too; compiled: the op stays in the graph, only the plugin's Python and
# everything after it is off).
PAUSED_MODE = "up-paused"
# `--pairs`: short runs of the sidecar-up engine alone, the plugin on and off in turn (see
# `same_engine_pairs`); new tokens per request in each (the rounds' runs have 128).
PAIR_TOKENS = 16
# The sidecar-up engine with another relay linger (`--linger-ms 0,20`): see `linger_mode`.
LINGER_PREFIX = "sidecar-up-linger"
MAX_LINGERS = 4  # every value is one more run per round
HIDDEN = 256  # the default model's; `--hidden` picks another (see `bench_model_config`)
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


def bench_model_config(hidden: int = HIDDEN) -> dict[str, Any]:
    """The bench's Llama-style model config at `hidden` (a multiple of 128): 4 layers, head
    dimension 64 (the CPU attention backend's smallest), an MLP 2.75 times as wide, as the
    default (hidden 256: 704). At 256 its float32 weights are about 28 MB, about a server
    CPU's last-level cache; at 1024 about 250 MB, and a step takes about 14 ms instead of
    4 here (2026-12-03)."""
    if hidden < 128 or hidden % 128:
        raise ValueError(f"hidden: a multiple of 128 from 128 up, got {hidden!r}")
    heads = hidden // 64
    return {
        **TINY_LLAMA,
        "hidden_size": hidden,
        "intermediate_size": hidden * 11 // 4,
        "num_attention_heads": heads,
        "num_key_value_heads": heads // 2,
    }


def linger_mode(linger_ms: float) -> str:
    """The mode name of the sidecar-up engine with a relay linger after the list's first:
    `sidecar-up-linger20` for 20 ms, `sidecar-up-linger2.5` for 2.5."""
    return f"{LINGER_PREFIX}{linger_ms:g}"


def parse_lingers(text: str) -> tuple[float, ...]:
    """`--linger-ms`: one value or a comma-separated list of milliseconds (0..MAX_LINGER_MS,
    each once). A bad item is named with its place in the list."""
    items = text.split(",")
    if len(items) > MAX_LINGERS:
        raise ValueError(f"--linger-ms {text!r}: at most {MAX_LINGERS} values")
    values: list[float] = []
    for place, item in enumerate(items, 1):
        where = f"--linger-ms {text!r}, value {place} ({item.strip()!r})"
        try:
            value = float(item)
        except ValueError:
            raise ValueError(f"{where}: not a number of milliseconds") from None
        if not 0 <= value <= MAX_LINGER_MS:  # NaN fails this too
            raise ValueError(f"{where}: expected 0..{MAX_LINGER_MS:g} ms")
        if value in values:
            raise ValueError(f"{where}: given twice")
        values.append(value)
    return tuple(values)


def _lingers(linger_ms: float | Sequence[float] | None) -> tuple[float, ...]:
    """The bench's lingers as a tuple (empty: the plugin's default), checked as on the
    command line."""
    if linger_ms is None:
        return ()
    if isinstance(linger_ms, int | float):
        linger_ms = (linger_ms,)
    return parse_lingers(",".join(repr(float(v)) for v in linger_ms))


def _pin_engine(session: int, engine_cpus: set[int], side_cpus: set[int]) -> dict[str, int]:
    """Move a started engine's processes (every thread of each) to the engine CPUs and its
    capture relay to the monitor's CPUs; returns how many threads went where. Threads started
    later inherit their creator's mask. Passing every CPU twice unpins them."""
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


def _pin_process(pid: int, cpus: set[int]) -> None:
    """Every thread of one process (the sidecar) onto `cpus`."""
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(tid), cpus)


def _on_cpu_ns(pids: list[int]) -> int:
    """Nanoseconds the threads of these processes have run on a CPU (schedstat: exact, unlike
    the 10 ms ticks of /proc/PID/stat)."""
    return _schedstat_ns(pids, 0)


def _run_queue_ns(pids: list[int]) -> int:
    """Nanoseconds the threads of these processes have waited on a run queue: runnable, not
    running (schedstat's second field). Summed over threads, so it exceeds the wall time when
    several wait at once."""
    return _schedstat_ns(pids, 1)


def _schedstat_ns(pids: list[int], field: int) -> int:
    total = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            with contextlib.suppress(OSError, ValueError, IndexError):
                total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[field])
    return total


def _split_pids(session: int) -> tuple[list[int], list[int]]:
    """An engine's processes: (the engine's own, its capture relays)."""
    engine, relay = [], []
    for pid in _session_pids(session):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        (relay if b"monitor.capture.relay" in cmdline else engine).append(pid)
    return engine, relay


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


def _start_sidecar(workdir: Path, cpus: set[int] | None, hidden: int) -> tuple[Any, str]:
    from monitor.fixtures import start_sidecar, write_layer_sae

    sae = write_layer_sae(workdir / "sae", hidden, 64, 1, seed=5)
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


PINNINGS = ("pinned", "unpinned")


def run_vllm_overhead_bench(
    rounds: int = 60,
    requests: int = 4,
    prompt_tokens: int = 32,
    new_tokens: int = 128,
    layers: str = "1",
    eager_modes: tuple[bool, ...] = (False, True),
    control: bool = False,
    baseline_tree: str | None = None,
    pinnings: tuple[str, ...] = ("pinned",),
    same_engine: bool = False,
    linger_ms: float | Sequence[float] | None = None,
    pairs: int = 0,
    pair_tokens: int = PAIR_TOKENS,
    decompose: bool = False,
    hidden: int = HIDDEN,
) -> dict[str, Any]:
    """Measure the three engine modes for each execution mode; returns the results. With
    `control`, a second monitor-off engine runs in every round too: its loss against the
    first is what the bench measures when the monitor costs nothing. With `baseline_tree`
    (another checkout of this project), a sidecar-up engine imports the monitor from there:
    its plugin ms/step and loss next to sidecar-up's compare two versions in one run.

    `pinnings`: "pinned" (the engines on the lowest CPU, the sidecar and relays on the others:
    the monitor's processes have CPUs of their own, as in production) and/or "unpinned"
    (every process may run on every CPU: the monitor competes with the engine). Both are
    measured on the same engines, one after the other, each with its own rounds.

    With `same_engine`, the sidecar-up engine also runs every round with the plugin turned
    off (mode up-paused): the loss of sidecar-up against up-paused is then measured in one
    process, without the bias between two engines (the control engine shows that bias).

    `linger_ms`: the monitored engines' relay linger (None: the plugin's default). Several
    values: every engine with the monitor starts with the first, and the sidecar-up engine
    also runs each other value in every round (mode `linger_mode(value)`), through a capture
    client of its own in the same engine process.

    `pairs` (needs `same_engine`): after the rounds, that many pairs of short runs
    (`pair_tokens` new tokens per request) of the sidecar-up engine alone, the plugin on and
    off in turn (`same_engine_pairs`): the same-engine loss with a narrower interval than the
    rounds give in the same time. With `control`, one more run per pair with the plugin off
    again (the A/A of that comparison); with `decompose`, one more with the plugin on and
    the engine's capture relay stopped for the run (what the plugin costs the engine's
    thread alone; the rest of the loss is the monitor's processes running beside it).

    `hidden`: the model's width (`bench_model_config`); the sidecar's pack follows it."""
    lingers = _lingers(linger_ms)
    if pairs < 0 or pair_tokens < 4:
        raise ValueError(f"pairs >= 0 and pair_tokens >= 4, got {pairs!r} and {pair_tokens!r}")
    if pairs and not same_engine:
        raise ValueError("pairs: the plugin is switched off between runs as for same_engine")
    if decompose and not pairs:
        raise ValueError("decompose: a kind of run of `pairs`, which is 0")
    model_config = bench_model_config(hidden)
    if not pinnings or any(p not in PINNINGS for p in pinnings):
        raise ValueError(f"pinnings: a non-empty subset of {PINNINGS}, got {pinnings!r}")
    modes = ENGINE_MODES + ((CONTROL_MODE,) if control else ())
    if baseline_tree is not None:
        baseline_tree = str(Path(baseline_tree).resolve())
        if not (Path(baseline_tree) / "monitor" / "capture" / "vllm").is_dir():
            raise ValueError(f"--baseline-tree {baseline_tree}: not a checkout of this project")
        modes += (BASELINE_MODE,)
    modes += tuple(linger_mode(value) for value in lingers[1:])
    if same_engine:
        modes += (PAUSED_MODE,)
    # Removed when the bench completes, kept (and named) when it fails: the sidecar's and
    # the engines' logs are there.
    with bench_workdir("sm-bench-vllm-") as workdir:
        # A fixed model path: vLLM's compile cache is then reused by the next run (start-up is
        # most of this bench's time). In the user's own cache directory, not a shared /tmp name
        # that another user could create first (and point config.json elsewhere).
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        # One directory per width: each keeps its own compile cache.
        suffix = "" if hidden == HIDDEN else f"-h{hidden}"
        model = cache / "safety-monitor" / f"bench-vllm-model{suffix}"
        model.mkdir(mode=0o700, parents=True, exist_ok=True)
        (model / "config.json").write_text(json.dumps(model_config))
        available = os.sched_getaffinity(0)
        engine_cpus, side_cpus = plan_cpus(available)
        if engine_cpus is None:
            pinnings = ("unpinned",)  # one CPU: nothing to split
        sidecar, target = _start_sidecar(
            workdir, side_cpus if "pinned" in pinnings else None, hidden
        )
        batch = [
            {
                "id": f"r{i}",
                "prompt": [(7 * i + j) % 8000 + 10 for j in range(prompt_tokens)],
                "params": {"max_tokens": new_tokens, "temperature": 0.0, "ignore_eos": True},
            }
            for i in range(requests)
        ]
        results: dict[str, Any] = {
            "model": f"Llama-style, hidden {hidden}, 4 layers, float32, random weights",
            "requests": requests,
            "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens,
            "layers": layers,
            "rounds": rounds,
            "baseline_tree": baseline_tree,
            "pinnings": list(pinnings),
            "engine_cpus": _cpu_text(engine_cpus),
            "monitor_cpus": _cpu_text(side_cpus),
            "linger_ms": list(lingers) or None,
            "pairs": pairs,
            "pair_tokens": pair_tokens if pairs else None,
            "execution": {},
        }
        started = time.monotonic()
        try:
            for eager in eager_modes:
                name = "eager" if eager else "compiled"
                measured = _measure(
                    workdir / name,
                    model,
                    eager,
                    target,
                    layers,
                    batch,
                    rounds,
                    _Placement(engine_cpus, side_cpus, available, sidecar.process.pid),
                    pinnings,
                    modes,
                    baseline_tree,
                    lingers,
                    PairSettings(pairs, pair_tokens, control, decompose),
                )
                for pinning, rows in measured.items():
                    # The key stays the bare execution mode for the default (pinned) run.
                    key = name if pinnings == ("pinned",) else f"{name}/{pinning}"
                    results["execution"][key] = rows
        finally:
            sidecar.stop()
        results["seconds"] = round(time.monotonic() - started, 1)
    return results


class _Placement:
    """Where the engines and the monitor's processes run, pinned or not."""

    def __init__(
        self,
        engine_cpus: set[int] | None,
        side_cpus: set[int] | None,
        available: set[int],
        sidecar_pid: int,
    ) -> None:
        self.engine_cpus = engine_cpus
        self.side_cpus = side_cpus
        self.available = available
        self.sidecar_pid = sidecar_pid

    def apply(self, pinning: str, engines: dict[str, _Engine]) -> None:
        """Pin (engines on their CPU, sidecar and relays on the others) or unpin everything."""
        if self.engine_cpus is None or self.side_cpus is None:
            return
        pinned = pinning == "pinned"
        engine = self.engine_cpus if pinned else self.available
        side = self.side_cpus if pinned else self.available
        for started in engines.values():
            _pin_engine(started.process.pid, engine, side)
        _pin_process(self.sidecar_pid, side)


def _measure(
    workdir: Path,
    model: Path,
    eager: bool,
    target: str,
    layers: str,
    batch: list[dict[str, Any]],
    rounds: int,
    placement: _Placement,
    pinnings: tuple[str, ...],
    modes: tuple[str, ...] = ENGINE_MODES,
    baseline_tree: str | None = None,
    lingers: tuple[float, ...] = (),
    pairs: PairSettings | None = None,
) -> dict[str, dict[str, Any]]:
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
    from monitor.capture.vllm.config import ENV_LINGER_MS
    from monitor.fixtures import free_port

    pinning_env: dict[str, str] = {}
    if placement.engine_cpus is not None and placement.side_cpus is not None:
        # vLLM's CPU worker would bind its OpenMP threads to CPUs of its choosing; the bench
        # places the engines itself once they are up (they start on every CPU).
        pinning_env = {"VLLM_CPU_OMP_THREADS_BIND": "nobind"}
        if "pinned" in pinnings:
            pinning_env["SAFETY_MONITOR_RELAY_CPUS"] = _cpu_text(placement.side_cpus)
    down = f"127.0.0.1:{free_port()}"  # nothing listens there
    envs = {
        "off": {},
        CONTROL_MODE: {},
        "sidecar-up": {"SAFETY_MONITOR_TARGET": target, "SAFETY_MONITOR_LAYERS": layers},
        "sidecar-down": {"SAFETY_MONITOR_TARGET": down, "SAFETY_MONITOR_LAYERS": layers},
    }
    if lingers:  # the monitored engines only: unmonitored ones refuse the key
        for mode in ("sidecar-up", "sidecar-down"):
            envs[mode] = {**envs[mode], ENV_LINGER_MS: f"{lingers[0]:g}"}
    if baseline_tree is not None:
        envs[BASELINE_MODE] = {**envs["sidecar-up"], "PYTHONPATH": baseline_tree}
    if PAUSED_MODE in modes or len(lingers) > 1:
        # The bench's own functions turn the plugin off in the worker or switch its capture
        # client: vLLM sends them pickled between this engine's own processes (local pipes).
        envs["sidecar-up"] = {**envs["sidecar-up"], "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}
    engines: dict[str, _Engine] = {}
    measured = {}
    try:
        # All start at once, on every CPU (start-up is most of this bench's time)...
        for mode in modes:
            if _engine_of(mode) != mode:
                continue  # the sidecar-up engine, its plugin off or another linger
            cwd = baseline_tree if mode == BASELINE_MODE else None
            engines[mode] = _Engine(
                kwargs,
                # vLLM's file store and IPC sockets in this bench's working directory, not
                # left in /tmp (it is removed when the bench completes).
                {**engine_tmp_env(workdir), **pinning_env, **envs[mode]},
                workdir / f"{mode}.log",
                cwd=cwd,
            )
        for engine in engines.values():
            engine.reply(timeout=1800)
        # ...and are placed before anything is measured.
        for pinning in pinnings:
            placement.apply(pinning, engines)
            started = time.monotonic()
            measured[pinning] = _rounds(
                engines, modes, batch, rounds, placement.sidecar_pid, pinning, eager, lingers
            )
            # The warm-up, the idle measurement and the rounds (the engines' start is apart).
            measured[pinning]["off"]["rounds_seconds"] = round(time.monotonic() - started, 1)
            if pairs is not None and pairs.count:
                if len(lingers) > 1:  # the pairs run with the engine's own linger, the first
                    engines["sidecar-up"].call({"op": "linger", "ms": lingers[0]})
                measured[pinning]["sidecar-up"]["same_engine_pairs"] = same_engine_pairs(
                    engines, batch, pairs, pinning, eager
                )
    finally:
        for engine in engines.values():
            engine.stop()
    return measured


class PairSettings(NamedTuple):
    """What `same_engine_pairs` runs."""

    count: int  # pairs (0: none)
    tokens: int  # new tokens per request in each run
    control: bool = False  # one more run per pair, the plugin off again (the A/A)
    decompose: bool = False  # one more, the plugin on and the capture relay stopped


# The kinds of run of `same_engine_pairs`, in the order of an even pair.
PAIR_UP, PAIR_PAUSED, PAIR_CONTROL, PAIR_RELAY_STOPPED = (
    "up",
    "paused",
    "paused-again",
    "up-relay-stopped",
)


def pair_kinds(pairs: PairSettings) -> tuple[str, ...]:
    """The runs of one pair: up and paused, then the A/A's and the decomposition's if asked."""
    kinds = (PAIR_UP, PAIR_PAUSED)
    if pairs.control:
        kinds += (PAIR_CONTROL,)
    if pairs.decompose:
        kinds += (PAIR_RELAY_STOPPED,)
    return kinds


def same_engine_pairs(
    engines: dict[str, _Engine],
    batch: list[dict[str, Any]],
    pairs: PairSettings,
    tag: str,
    eager: bool,
) -> dict[str, Any]:
    """The sidecar-up engine alone (every other engine stopped), `pairs.count` pairs of short
    runs: one with the plugin on ("up"), one with it off ("paused", as up-paused), and the
    kinds `pair_kinds` adds; the order reverses from pair to pair (a drift linear over two
    pairs cancels). Each kind's loss against "paused" is paired per pair (tokens/s, and the
    median decode step); their medians and 95% intervals over the pairs are the result.

    "up-relay-stopped" runs with the plugin on and the engine's capture relay stopped
    (SIGSTOP) until the run ends: the plugin writes every step onto the ring as always (the
    relay sends them once it continues, before the flush), but neither the relay nor the
    sidecar runs meanwhile. Its loss is what the plugin costs the engine's own thread; what
    "up" loses beyond it comes from the monitor's processes running on the other CPUs,
    through what the CPUs share (caches, memory).

    Why short pairs: one run's tokens/s on this kind of machine moves by 10-15% from run to
    run however long the run (two identical runs of one engine, 16 or 64 new tokens per
    request, 2026-12-03: quartiles of their loss about -14% and +12%), so 60 rounds of 128
    tokens leave an interval 8-12 points wide. 600 short pairs take about as long as 60
    rounds of five engine modes and narrow it about threefold. A short run's prefill is a
    larger share of it than in the rounds, and the plugin's slower path runs there, so its
    tokens/s loss counts the plugin's per-request cost more than a long generation would;
    the median decode step leaves prefills out."""
    up = engines["sidecar-up"]
    for name, engine in engines.items():
        if name != "sidecar-up" and not engine.paused:
            engine.pause()
    if up.paused:
        up.resume()
    short = [
        {**request, "params": {**request["params"], "max_tokens": pairs.tokens}}
        for request in batch
    ]
    kinds = pair_kinds(pairs)
    runs: dict[str, list[tuple[int, float]]] = {kind: [] for kind in kinds}
    itl: dict[str, list[float]] = {kind: [] for kind in kinds}
    before = up.call({"op": "report"})[0]
    unflushed = 0
    started = time.monotonic()
    try:
        for index in range(pairs.count):
            for kind in kinds if index % 2 == 0 else kinds[::-1]:
                off = kind in (PAIR_PAUSED, PAIR_CONTROL)
                if off:
                    up.call({"op": "monitor", "on": False, "keep_op": not eager})
                stopped = _split_pids(up.process.pid)[1] if kind == PAIR_RELAY_STOPPED else []
                try:
                    _stop(stopped)
                    reply = up.call(
                        {"op": "run", "requests": _renamed(short, f"{tag}-pair{index}-{kind}")}
                    )
                finally:
                    for pid in stopped:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGCONT)
                # The relay and sidecar catch up before the next run (not timed).
                unflushed += not all(up.call({"op": "flush", "timeout": 30.0}))
                if off:
                    # Turning it back on ends the requests that finished while it was off
                    # (`finish_missing`): their end messages settle here too, not during the
                    # next run.
                    up.call({"op": "monitor", "on": True})
                    unflushed += not all(up.call({"op": "flush", "timeout": 30.0}))
                tokens = sum(len(r["outputs"][0]["token_ids"]) for r in reply["results"].values())
                runs[kind].append((tokens, reply["seconds"]))
                decode = reply["step_seconds"][2:] or reply["step_seconds"]
                itl[kind].append(1000 * statistics.median(decode))
    finally:
        for engine in engines.values():
            if engine.paused:
                engine.resume()
    seconds = time.monotonic() - started
    after = up.call({"op": "report"})[0]
    result = pairs_result(runs, itl, pairs.tokens, seconds)
    # What the monitored runs sent: a relay-stopped run longer than the ring's queue would
    # drop steps (fail-open), and a dropped step costs the plugin less than a sent one.
    result["steps_captured"] = after["steps_captured"] - before["steps_captured"]
    result["acked"] = after["batches_acked"] - before["batches_acked"]
    result["dropped"] = sum(after["dropped"].values()) - sum(before["dropped"].values())
    result["unflushed"] = unflushed  # flushes that timed out: a run may have overlapped one
    return result


def _process_state(pid: int) -> str:
    """The state letter of /proc/PID/stat ("T": stopped); "" once the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat[stat.rindex(")") + 2]


def _stop(pids: list[int], timeout: float = 1.0) -> None:
    """SIGSTOP each process and wait (up to `timeout`) until each has stopped: a signal is
    delivered when its process next runs, so a process caught running or asleep in the
    kernel would otherwise go on for part of the run that is meant to be without it."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    for pid in pids:
        while _process_state(pid) not in ("T", ""):
            if time.monotonic() >= deadline:
                raise RuntimeError(f"the capture relay {pid} did not stop within {timeout} s")
            time.sleep(0.001)


def pairs_result(
    runs: dict[str, list[tuple[int, float]]],
    itl: dict[str, list[float]],
    tokens: int,
    seconds: float,
) -> dict[str, Any]:
    """`same_engine_pairs`'s numbers from its runs ((tokens, seconds) per run of each kind, in
    run order) and their median decode steps (ms): every other kind against "paused", pair
    by pair, under the kind's prefix ("up": none; "paused-again": `control_`;
    "up-relay-stopped": `relay_stopped_`)."""
    tps = {kind: [t / s for t, s in values] for kind, values in runs.items()}
    result: dict[str, Any] = {
        "pairs": len(tps[PAIR_PAUSED]),
        "new_tokens": tokens,
        "seconds": round(seconds, 1),
        **{f"tokens_per_s_{kind}": statistics.median(tps[kind]) for kind in tps},
        **{f"itl_ms_{kind}": statistics.median(itl[kind]) for kind in itl},
    }
    prefixes = {PAIR_UP: "", PAIR_CONTROL: "control_", PAIR_RELAY_STOPPED: "relay_stopped_"}
    for kind, prefix in prefixes.items():
        if kind not in tps:
            continue
        losses = [100 * (1 - m / b) for m, b in zip(tps[kind], tps[PAIR_PAUSED], strict=True)]
        result.update(summary(losses, f"{prefix}loss_pct"))
        # Over each two pairs (one order and its reverse): each side's tokens over its seconds
        # across both, so a drift linear over the two cancels, and each side has one run
        # after a monitored run and one after a paused one (a request's end is processed in
        # the next run: a monitored run after a paused one has none to process).
        mirrored = _pairs_summary(runs[kind], runs[PAIR_PAUSED])
        result.update({f"{prefix}{name}": value for name, value in mirrored.items()})
        steps = _step_summary(itl[kind], itl[PAIR_PAUSED])
        result.update({f"{prefix}{name}": value for name, value in steps.items()})
    # Every run's numbers, in run order, so any other statistic can be computed from the JSON.
    result["per_pair"] = {
        **{f"{kind}_tokens_per_s": tps[kind] for kind in tps},
        **{f"{kind}_itl_ms": itl[kind] for kind in itl},
    }
    return result


def _pairs_lines(execution: str, pairs: dict[str, Any]) -> list[str]:
    """The table's lines for `same_engine_pairs`'s result."""
    lines = [
        f"{execution}: same engine, {pairs['pairs']} short pairs ({pairs['new_tokens']} new "
        f"tokens per request, {pairs['seconds']:.0f} s), sidecar-up against {PAUSED_MODE}: "
        f"loss {_loss_text(pairs).replace('per pair of rounds', 'per two mirrored pairs')}; "
        f"ITL {pairs[f'itl_ms_{PAIR_PAUSED}']:.2f} -> "
        f"{pairs[f'itl_ms_{PAIR_UP}']:.2f} ms"
        + (
            f"; steps captured {pairs['steps_captured']}, acked {pairs['acked']}, dropped "
            f"{pairs['dropped']}, flushes timed out {pairs.get('unflushed', 0)}"
            if "steps_captured" in pairs
            else ""
        )
    ]
    for prefix, what in (
        ("relay_stopped_", "the capture relay stopped during the run (the plugin alone)"),
        ("control_", f"A/A: {PAUSED_MODE} again"),
    ):
        if f"{prefix}loss_pct_median" not in pairs:
            continue
        lines.append(
            f"{execution}: same engine, short pairs, {what} against {PAUSED_MODE}: loss "
            f"{pairs[f'{prefix}loss_pct_median']:.2f}% (95% CI {_ci(pairs, f'{prefix}loss_pct')})"
            f"; median decode step {pairs[f'{prefix}step_loss_pct_median']:.2f}% (95% CI "
            f"{_ci(pairs, f'{prefix}step_loss_pct')})"
        )
    return lines


def _engine_of(mode: str) -> str:
    """The engine a mode runs on: up-paused and the other lingers are the sidecar-up engine."""
    return "sidecar-up" if mode == PAUSED_MODE or mode.startswith(LINGER_PREFIX) else mode


def round_order(modes: tuple[str, ...], index: int) -> tuple[str, ...]:
    """The order of round `index`: rounds go in mirrored pairs (an order, then its reverse),
    the order rotating by one mode from pair to pair. Within a pair every mode's two runs sit
    at the same mean time, so a drift linear over the pair cancels from every paired loss;
    over the rotations each mode runs early and late alike."""
    shift = (index // 2) % len(modes)
    order = modes[shift:] + modes[:shift]
    return order[::-1] if index % 2 else order


# Counters the `linger` op reports, taken around each run of a switched client.
_SWITCHED = (
    "plugin_steps",
    "plugin_cpu_ns",
    "steps_captured",
    "batches_acked",
    "messages_sent",
    "dropped",
)


def _rounds(
    engines: dict[str, _Engine],
    modes: tuple[str, ...],
    batch: list[dict[str, Any]],
    rounds: int,
    sidecar_pid: int,
    tag: str,
    eager: bool,
    lingers: tuple[float, ...] = (),
) -> dict[str, Any]:
    """Warm up, then `rounds` interleaved rounds; the rows of one placement."""
    paused = PAUSED_MODE in modes
    # With several lingers, the linger each run of the sidecar-up engine uses (its capture
    # client switched before the run); the counters of those runs are taken around each run.
    switch = {"sidecar-up": lingers[0]} if len(lingers) > 1 else {}
    switch.update({linger_mode(value): value for value in lingers[1:]})
    for name, engine in engines.items():
        # Each linger's client warms up too (its relay started, connected, the sidecar's
        # stream open); the first is the engine's own and goes last, as rounds expect.
        for value in [*lingers[1:], lingers[0]] if name == "sidecar-up" and switch else [None]:
            if value is not None:
                engine.call({"op": "linger", "ms": value})
            engine.call({"op": "run", "requests": _renamed(batch, f"{tag}-warmup-{value}")})
            engine.call({"op": "flush", "timeout": 30.0})
    idle = _idle_cpu(engines)
    for mode in modes:
        idle.setdefault(mode, idle[_engine_of(mode)])
    # The plugin's own time is counted from here: the measured rounds only.
    before = {mode: engines[mode].call({"op": "report"})[0] for mode in engines}
    for engine in engines.values():
        engine.pause()
    runs: dict[str, list[tuple[int, float]]] = {mode: [] for mode in modes}  # tokens, s
    steps: dict[str, list[float]] = {mode: [] for mode in modes}
    itl: dict[str, list[float]] = {mode: [] for mode in modes}  # median decode step, per round
    # CPU time per engine step in each round: the engine's processes (during the run), its
    # relay and the sidecar (during the run and the flush that follows it).
    cpu: dict[str, dict[str, list[float]]] = {
        mode: {"engine": [], "relay": [], "sidecar": []} for mode in modes
    }
    counted: dict[str, dict[str, float]] = {mode: dict.fromkeys(_SWITCHED, 0) for mode in switch}
    share: dict[str, list[float]] = {mode: [] for mode in modes}  # engine on-CPU / wall
    waits: dict[str, list[float]] = {mode: [] for mode in modes}  # run-queue ms per step
    for index in range(rounds):
        for mode in round_order(modes, index):
            engine = engines[_engine_of(mode)]
            engine.resume()
            if mode == PAUSED_MODE:
                # A compiled graph calls the op on the buffer it was compiled with: keep it.
                engine.call({"op": "monitor", "on": False, "keep_op": not eager})
            own, relays = _split_pids(engine.process.pid)
            start = None
            if mode in switch:
                start = engine.call({"op": "linger", "ms": switch[mode]})[0]
                if start is None or start.get("linger_ms") != switch[mode]:
                    raise RuntimeError(f"{mode}: the engine did not switch its linger: {start}")
                # Only the relay of the client in use: the other lingers' relays sit idle.
                relays = [start["relay_pid"]] if start.get("relay_pid") else relays
            engine_ns, relay_ns, side_ns = (
                _on_cpu_ns(own),
                _on_cpu_ns(relays),
                _on_cpu_ns([sidecar_pid]),
            )
            wait_ns, run_ns, wall_ns = _run_queue_ns(own), _on_cpu_ns(own), time.monotonic_ns()
            reply = engine.call({"op": "run", "requests": _renamed(batch, f"{tag}-{index}")})
            wall_ns = time.monotonic_ns() - wall_ns
            wait_ns = _run_queue_ns(own) - wait_ns
            run_ns = _on_cpu_ns(own) - run_ns
            engine_ns = _on_cpu_ns(own) - engine_ns
            # The engine's share of its CPU during the run (pinned: about 1 when it neither
            # waited idle nor was preempted) and its threads' wait on the run queue: a run
            # slowed as a whole by another process on the engine's CPU shows as a low share
            # and a long wait (README, Serving with vLLM).
            share[mode].append(run_ns / max(wall_ns, 1))
            waits[mode].append(wait_ns / 1e6 / max(reply["steps"], 1))
            tokens = sum(len(r["outputs"][0]["token_ids"]) for r in reply["results"].values())
            runs[mode].append((tokens, reply["seconds"]))
            decode = reply["step_seconds"][2:]  # after the prefill step(s)
            steps[mode].extend(decode)
            itl[mode].append(1000 * statistics.median(decode or reply["step_seconds"]))
            # Let the sidecar and relay catch up before the next engine runs (not timed).
            engine.call({"op": "flush", "timeout": 30.0})
            relay_ns = _on_cpu_ns(relays) - relay_ns
            if mode == PAUSED_MODE:
                engine.call({"op": "monitor", "on": True})
            side_ns = _on_cpu_ns([sidecar_pid]) - side_ns
            if start is not None:
                end = engine.call({"op": "linger", "ms": None})[0]
                for key in _SWITCHED:
                    counted[mode][key] += end[key] - start[key]
            engine.pause()
            per_step = 1e6 * max(reply["steps"], 1)
            cpu[mode]["engine"].append(engine_ns / per_step)
            cpu[mode]["relay"].append(relay_ns / per_step)
            cpu[mode]["sidecar"].append(side_ns / per_step)
    for engine in engines.values():
        engine.resume()
    for mode, switched in counted.items():
        # A plugin that kept sending through another client than `capture.client` would
        # leave this client's count at zero: the comparison would then be of nothing.
        if rounds and not switched["steps_captured"]:
            raise RuntimeError(f"{mode}: no step went through its capture client")
    reports = {mode: engines[mode].call({"op": "report"})[0] for mode in engines}
    for mode in modes:
        if mode not in engines:  # its counters are the sidecar-up engine's
            before[mode] = reports[mode] = {"op_calls": None}
    tps = {mode: [tokens / seconds for tokens, seconds in runs[mode]] for mode in modes}
    rows = {}
    off_itl_ms = 1000 * statistics.median(steps["off"])
    for mode in modes:
        losses = [100 * (1 - m / b) for m, b in zip(tps[mode], tps["off"], strict=True)]
        # The engine's own CPU per step against the off engine's in the same round: what the
        # monitor adds to the serving process, barely touched by the machine's other load.
        extra = sorted(
            100 * (m / b - 1)
            for m, b in zip(cpu[mode]["engine"], cpu["off"]["engine"], strict=True)
        )
        report = reports[mode]
        plugin = _plugin_ms_per_step(before[mode], report)
        captured = report.get("steps_captured", 0)
        acked = report.get("batches_acked", 0)
        dropped = sum(report.get("dropped", {}).values())
        if mode in counted:  # the runs of this linger only (the measured rounds)
            switched = counted[mode]
            plugin = _plugin_ms_per_step({"plugin_steps": 0, "plugin_cpu_ns": 0}, switched)
            captured, acked = int(switched["steps_captured"]), int(switched["batches_acked"])
            dropped = int(switched["dropped"])
        rows[mode] = {
            "tokens_per_s": statistics.median(tps[mode]),
            "itl_ms_p50": 1000 * statistics.median(steps[mode]),
            **summary(losses, "loss_pct"),
            **_pairs_summary(runs[mode], runs["off"]),
            **_step_summary(itl[mode], itl["off"]),
            "idle_cpu_pct": idle[mode],
            "steps_captured": captured,
            "acked": acked,
            "dropped": dropped,
            "op_calls": report["op_calls"],
            # The plugin's Python on the runner's thread, per forward pass (thread CPU time:
            # a busy machine barely inflates it, unlike the throughput loss), and as a share of
            # the monitor-off engine's inter-token latency.
            "plugin_ms_per_step": plugin,
            "plugin_pct_of_off_itl": None if plugin is None else 100 * plugin / off_itl_ms,
            "engine_cpu_ms_per_step": statistics.median(cpu[mode]["engine"]),
            "engine_cpu_extra_pct_median": statistics.median(extra),
            "engine_cpu_extra_pct_q1": _quantile(extra, 0.25),
            "engine_cpu_extra_pct_q3": _quantile(extra, 0.75),
            "relay_cpu_ms_per_step": statistics.median(cpu[mode]["relay"]),
            "sidecar_cpu_ms_per_step": statistics.median(cpu[mode]["sidecar"]),
            "engine_cpu_share_median": statistics.median(share[mode]),
            "engine_cpu_share_min": min(share[mode]),
            "engine_run_queue_ms_per_step": statistics.median(waits[mode]),
            # Every round's numbers, in run order, so any other statistic can be computed
            # from the JSON output.
            "per_round": {
                "tokens": [tokens for tokens, _ in runs[mode]],
                "seconds": [seconds for _, seconds in runs[mode]],
                "itl_ms": itl[mode],
                **{f"{part}_cpu_ms_per_step": cpu[mode][part] for part in cpu[mode]},
                "engine_cpu_share": share[mode],
                "engine_run_queue_ms_per_step": waits[mode],
            },
        }
        if mode in switch:
            rows[mode]["linger_ms"] = switch[mode]
            if counted[mode]["messages_sent"]:
                rows[mode]["steps_per_message"] = (
                    counted[mode]["steps_captured"] / counted[mode]["messages_sent"]
                )
    if paused:
        # Same engine: sidecar-up (and its other lingers) against itself with the plugin
        # off, paired per round.
        for mode in ("sidecar-up", *(m for m in modes if m.startswith(LINGER_PREFIX))):
            same = [100 * (1 - m / b) for m, b in zip(tps[mode], tps[PAUSED_MODE], strict=True)]
            rows[mode]["same_engine"] = {
                **summary(same, "loss_pct"),
                **_pairs_summary(runs[mode], runs[PAUSED_MODE]),
                **_step_summary(itl[mode], itl[PAUSED_MODE]),
                "itl_ms_paused": 1000 * statistics.median(steps[PAUSED_MODE]),
                "itl_ms_up": 1000 * statistics.median(steps[mode]),
            }
    for value in lingers[1:]:
        # Each other linger against the first, same engine, paired per round: its
        # throughput loss (negative: faster) and the monitor's CPU per engine step (relay and
        # sidecar together) it saves.
        mode = linger_mode(value)
        first = [100 * (1 - m / b) for m, b in zip(tps[mode], tps["sidecar-up"], strict=True)]
        monitor_cpu = [
            (r + s) - (r0 + s0)
            for r, s, r0, s0 in zip(
                cpu[mode]["relay"],
                cpu[mode]["sidecar"],
                cpu["sidecar-up"]["relay"],
                cpu["sidecar-up"]["sidecar"],
                strict=True,
            )
        ]
        rows[mode]["against_first_linger"] = {
            "first_linger_ms": lingers[0],
            **summary(first, "loss_pct"),
            **_pairs_summary(runs[mode], runs["sidecar-up"]),
            **_step_summary(itl[mode], itl["sidecar-up"]),
            **summary(monitor_cpu, "monitor_cpu_ms_diff"),
        }
    return rows


def _step_summary(mode_itl: list[float], base_itl: list[float]) -> dict[str, float]:
    """The loss in decode speed per round: 1 - the reference's median decode step time over
    the mode's, in the same round. A step slowed by another process on the machine moves a
    run's tokens/s but not its median step: this says what the monitor costs every step,
    not what it costs in a rare slow one (which only the tokens/s loss shows)."""
    return summary(
        [100 * (1 - b / m) for m, b in zip(mode_itl, base_itl, strict=True)], "step_loss_pct"
    )


def _pairs_summary(
    mode_runs: list[tuple[int, float]], base_runs: list[tuple[int, float]]
) -> dict[str, float]:
    """The loss per mirrored pair of rounds (`round_order`): each side's tokens over its
    seconds across both rounds of the pair, so a linear drift across the pair cancels.
    Empty under two rounds (an odd last round is left out)."""
    losses = []
    for start in range(0, len(mode_runs) - 1, 2):
        mode = mode_runs[start : start + 2]
        base = base_runs[start : start + 2]
        rate = sum(t for t, _ in mode) / sum(s for _, s in mode)
        base_rate = sum(t for t, _ in base) / sum(s for _, s in base)
        losses.append(100 * (1 - rate / base_rate))
    return summary(losses, "loss_pct_pairs") if losses else {}


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


def _ci(row: dict[str, Any], prefix: str = "loss_pct") -> str:
    """A median's 95% interval as `low to high` (empty without one)."""
    if f"{prefix}_ci_low" not in row:
        return ""
    return f"{row[f'{prefix}_ci_low']:.2f} to {row[f'{prefix}_ci_high']:.2f}"


def _loss_text(row: dict[str, Any]) -> str:
    """`median% (95% CI low to high) [q1, q3] (min..max)`, then the same per mirrored pair
    of rounds and by the median decode step time, each with its interval."""
    text = (
        f"{row['loss_pct_median']:.2f}% (95% CI {_ci(row)}) [{row['loss_pct_q1']:.1f}, "
        f"{row['loss_pct_q3']:.1f}] ({row['loss_pct_min']:.1f}..{row['loss_pct_max']:.1f})"
    )
    if "loss_pct_pairs_median" in row:
        text += (
            f"; per pair of rounds {row['loss_pct_pairs_median']:.2f}% "
            f"(95% CI {_ci(row, 'loss_pct_pairs')})"
        )
    if "step_loss_pct_median" in row:
        text += (
            f"; median decode step {row['step_loss_pct_median']:.2f}% "
            f"(95% CI {_ci(row, 'step_loss_pct')})"
        )
    return text


def format_vllm_table(result: dict[str, Any]) -> str:
    """The result as text: one row per execution mode and engine mode, then the same-engine
    and linger comparisons, then where the CPU time per step went (engine, relay, sidecar)."""
    placement = (
        f"engines on CPU {result['engine_cpus']}, sidecar and relays on CPU "
        f"{result['monitor_cpus']}"
        if result.get("pinnings", ["pinned"]) == ["pinned"]
        else f"pinned: engines on CPU {result['engine_cpus']}, sidecar and relays on CPU "
        f"{result['monitor_cpus']}; unpinned: every process on every CPU"
    )
    lingers = result.get("linger_ms") or []
    linger_text = (
        ""
        if not lingers
        else f"; relay linger {lingers[0]:g} ms (sidecar-up, sidecar-down, up-baseline)"
        + "".join(f", {value:g} ms ({linger_mode(value)})" for value in lingers[1:])
    )
    width = max(14, *(len(m) + 2 for rows in result["execution"].values() for m in rows))
    lines = [
        f"vLLM plugin overhead: {result['model']}; {result['requests']} requests x "
        f"{result['prompt_tokens']} prompt + {result['new_tokens']} new tokens per run, "
        f"capture on layer(s) {result['layers']}, {result['rounds']} interleaved rounds, one "
        f"engine generating at a time; {placement}{linger_text}; "
        f"{result.get('seconds', 0):.0f} s",
        "loss: 1 - tokens/s against the monitor-off engine in the same round, median over "
        "rounds, the 95% bootstrap confidence interval of that median (rounds resampled, "
        "seeded), [quartiles] (min..max); plugin ms/step: the plugin's thread CPU time per "
        "forward pass on the model runner's thread (its % of the monitor-off ITL)",
        f"{'execution':<19}{'mode':<{width}}{'tokens/s':>10}{'ITL ms':>8}{'loss':>8}"
        f"{'  95% CI':<18}{'[q1, q3] (min..max)':<28}{'idle CPU':>9}{'captured':>10}"
        f"{'acked':>8}{'dropped':>9}{'plugin ms/step':>16}",
    ]
    for execution, rows in result["execution"].items():
        for mode, row in rows.items():
            loss = ci = spread = ""
            if mode != "off":
                loss = f"{row['loss_pct_median']:.2f}%"
                ci = f"  {_ci(row)}"
                spread = (
                    f"[{row['loss_pct_q1']:.1f}, {row['loss_pct_q3']:.1f}] "
                    f"({row['loss_pct_min']:.1f}..{row['loss_pct_max']:.1f})"
                )
            plugin = row.get("plugin_ms_per_step")
            plugin_text = (
                "" if plugin is None else f"{plugin:.3f} ({row['plugin_pct_of_off_itl']:.1f}%)"
            )
            lines.append(
                f"{execution:<19}{mode:<{width}}{row['tokens_per_s']:>10.1f}"
                f"{row['itl_ms_p50']:>8.2f}{loss:>8}{ci:<18}{spread:<28}"
                f"{row['idle_cpu_pct']:>8.1f}%{row['steps_captured']:>10}"
                f"{row['acked']:>8}{row['dropped']:>9}{plugin_text:>16}"
            )
    for execution, rows in result["execution"].items():
        if "rounds_seconds" in rows.get("off", {}):
            lines.append(
                f"{execution}: warm-up and rounds {rows['off']['rounds_seconds']:.0f} s (the "
                "engines' start apart)"
            )
        for mode, row in rows.items():
            same = row.get("same_engine")
            if same is None:
                continue
            lines.append(
                f"{execution}: same engine, {mode} against {PAUSED_MODE}: loss "
                f"{_loss_text(same)}; ITL {same['itl_ms_paused']:.2f} -> "
                f"{same['itl_ms_up']:.2f} ms"
                # A compiled graph keeps the capture op while paused: its cost is not in this.
                + (
                    ""
                    if execution.startswith("eager")
                    else f" ({PAUSED_MODE} keeps the capture op)"
                )
            )
        pairs = rows.get("sidecar-up", {}).get("same_engine_pairs")
        if pairs is not None:
            lines += _pairs_lines(execution, pairs)
        for mode, row in rows.items():
            other = row.get("against_first_linger")
            if other is None:
                continue
            per_message = row.get("steps_per_message")
            lines.append(
                f"{execution}: same engine, {mode} against sidecar-up (linger "
                f"{other['first_linger_ms']:g} ms): loss {_loss_text(other)}; relay + "
                f"sidecar CPU per engine step {other['monitor_cpu_ms_diff_median']:+.3f} ms "
                f"(95% CI {_ci(other, 'monitor_cpu_ms_diff')})"
                + ("" if per_message is None else f"; {per_message:.2f} steps per message")
            )
    if any(
        "engine_cpu_ms_per_step" in row
        for rows in result["execution"].values()
        for row in rows.values()
    ):
        lines += [
            "",
            "CPU ms per engine step (on-CPU time, schedstat; median over rounds): the engine's "
            "own processes during the run; its capture relay and the sidecar during the run and "
            "the flush after it; engine +%: the engine's CPU per step against the off engine's "
            "in the same round, median [quartiles]; pinned runs only: on CPU, the engine's "
            "on-CPU time over the run's wall time, median (lowest run), below 1 when the engine "
            "was idle or preempted, and rq wait, its threads' run-queue wait per step (median, "
            "ms; about a step's time from its own processes taking turns on one CPU, longer "
            "when another process preempts them)",
            f"{'execution':<19}{'mode':<{width}}{'engine':>9}{'engine +%':>11}"
            f"{'  [q1, q3]':<18}{'relay':>8}{'sidecar':>9}{'on CPU':>14}{'rq wait':>9}",
        ]
        for execution, rows in result["execution"].items():
            for mode, row in rows.items():
                if "engine_cpu_ms_per_step" not in row:
                    continue
                extra = spread = ""
                if mode != "off":
                    extra = f"{row['engine_cpu_extra_pct_median']:.2f}%"
                    spread = (
                        f"  [{row['engine_cpu_extra_pct_q1']:.1f}, "
                        f"{row['engine_cpu_extra_pct_q3']:.1f}]"
                    )
                on_cpu = wait = ""
                # Unpinned, the engine may use every CPU: its share says nothing there.
                if "engine_cpu_share_median" in row and not execution.endswith("/unpinned"):
                    on_cpu = (
                        f"{row['engine_cpu_share_median']:.2f} ({row['engine_cpu_share_min']:.2f})"
                    )
                    wait = f"{row['engine_run_queue_ms_per_step']:.2f}"
                lines.append(
                    f"{execution:<19}{mode:<{width}}{row['engine_cpu_ms_per_step']:>9.3f}"
                    f"{extra:>11}{spread:<18}{row['relay_cpu_ms_per_step']:>8.3f}"
                    f"{row['sidecar_cpu_ms_per_step']:>9.3f}{on_cpu:>14}{wait:>9}"
                )
    return "\n".join(lines)
