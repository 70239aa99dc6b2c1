"""`safety-monitor bench relay`: what the capture relay and the sidecar cost per step at light
load, without an engine.

A synthetic producer in this process publishes steps onto a real shared ring (`RelayLink`,
the capture client's own link) at a fixed rate, shaped like the vLLM bench's decode steps
(`--rows` rows of `--hidden` FP32 columns, one layer, the same persistent buffer each step, so
the frame writer's fast path runs as in compiled vLLM). A real relay process streams them to a
real sidecar. The producer runs on the lowest CPU; the relays and the sidecar on the others,
as in `bench overhead --engine vllm --pinning pinned`.

Modes, run in turn within each round (the order rotating each round) so drift hits both alike:

  current    the relay of this checkout
  no-pacing  the same, blocking until woken for every frame (SAFETY_MONITOR_RELAY_PACE=0)
  baseline   (with `--baseline-tree DIR`) the relay of another checkout, fed by this same
             producer: two relays side by side in one run
  linger-Nms (with `--linger-ms N[,M...]`) this checkout's relay with a linger of N ms
             (several steps per message); the table's `steps/msg` shows how many

Per mode, medians over rounds, per step: the relay process's CPU (schedstat, every thread), its
context switches (voluntary: how often its threads went to sleep, i.e. wake-ups), the sidecar's
CPU (measured until the sidecar has acked the mode's steps), and the producer's own CPU for
`publish` (thread CPU time: the model thread's cost of the ring, eventfd writes included) with
the eventfd writes it made. Then the relays' CPU and wake-ups per second while idle. The
machine's other load shows in these numbers; CPU time is more robust than wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from monitor.bench.machine import describe, render

HOOK_LAYER = 1


def add_bench_relay_command(bench_subparsers: Any) -> None:
    """Register ``relay`` under ``safety-monitor bench``."""
    parser = bench_subparsers.add_parser(
        "relay", help="capture relay and sidecar CPU per step at light load (no engine)"
    )
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=4.0, help="per mode and round")
    parser.add_argument("--rate", type=float, default=125.0, help="steps per second")
    parser.add_argument("--rows", type=int, default=4, help="rows per step (one per request)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--idle-seconds", type=float, default=3.0)
    parser.add_argument(
        "--baseline-tree",
        default=None,
        metavar="DIR",
        help="also run the relay of another checkout (e.g. `git worktree add --detach DIR "
        "main`) on the same producer, as mode `baseline`",
    )
    parser.add_argument(
        "--linger-ms",
        default="",
        metavar="N[,M...]",
        help="also run this relay with each of these lingers (modes linger-Nms)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(handler=_run_command)


def _run_command(args: argparse.Namespace) -> int:
    from monitor.logs import configure_logging

    configure_logging("auto", "warning")
    machine = describe()
    result = run_relay_bench(
        rounds=args.rounds,
        seconds=args.seconds,
        rate=args.rate,
        rows=args.rows,
        hidden=args.hidden,
        idle_seconds=args.idle_seconds,
        baseline_tree=args.baseline_tree,
        lingers=tuple(float(v) for v in args.linger_ms.split(",") if v.strip()),
    )
    print(render(result, args.json, format_relay_table, machine))
    return 0


def run_relay_bench(
    rounds: int = 6,
    seconds: float = 4.0,
    rate: float = 125.0,
    rows: int = 4,
    hidden: int = 256,
    idle_seconds: float = 3.0,
    baseline_tree: str | None = None,
    lingers: tuple[float, ...] = (),
) -> dict[str, Any]:
    """Steps at `rate` per second through each mode's relay to one sidecar, rounds interleaved;
    returns per-mode medians of the per-step costs (see the module docstring)."""
    from monitor.capture.channel.protocol import SenderSettings
    from monitor.capture.link import RelayLink
    from monitor.capture.relay.main import RELAY_CPUS_ENV, RELAY_PACE_ENV

    # mode -> (checkout the relay runs from, None: this one; its extra environment)
    roots: dict[str, tuple[str | None, dict[str, str]]] = {
        "current": (None, {}),
        "no-pacing": (None, {RELAY_PACE_ENV: "0"}),
    }
    if baseline_tree is not None:
        root = Path(baseline_tree).resolve()
        if not (root / "monitor" / "capture" / "relay" / "__main__.py").is_file():
            raise SystemExit(f"{root} holds no monitor/capture/relay: not a checkout")
        roots["baseline"] = (str(root), {})
    linger_of = {f"linger-{linger:g}ms": linger for linger in lingers}
    roots.update({mode: (None, {}) for mode in linger_of})
    cores = sorted(os.sched_getaffinity(0))
    producer_cpus = {cores[0]} if len(cores) > 1 else None
    side_cpus = set(cores[1:]) if len(cores) > 1 else None
    with tempfile.TemporaryDirectory(prefix="safety-monitor-bench-relay-") as tmp:
        sidecar = _start_sidecar(Path(tmp), hidden, side_cpus)
        saved_env = os.environ.get(RELAY_CPUS_ENV)
        if side_cpus is not None:  # the relays read it when they start
            os.environ[RELAY_CPUS_ENV] = ",".join(str(c) for c in sorted(side_cpus))
        links: dict[str, RelayLink] = {}
        previous = os.sched_getaffinity(0)
        try:
            settings = SenderSettings(
                target=sidecar.target,
                model_name="bench-relay",
                max_message_bytes=64 << 20,
                reconnect_backoff=(0.05, 1.0),
                connect_timeout=5.0,
                fail_closed=False,
            )
            for mode, (root, env) in roots.items():
                linger = linger_of.get(mode, 0.0)
                link = RelayLink(
                    dataclasses.replace(settings, linger_ms=linger),
                    16 << 20,
                    1024,
                    lambda event: None,
                )
                if root is not None:
                    link.package_root = root
                link.relay_env = env
                link.start()
                links[mode] = link
            for mode, link in links.items():
                _wait(lambda link=link: link.connected, 60, f"{mode} relay did not connect")
            if producer_cpus is not None:
                os.sched_setaffinity(0, producer_cpus)
            producer = _Producer(rows, hidden)
            producer.run(links["current"], rate, 0.5)  # warm-up: imports, first frames
            for link in links.values():
                producer.run(link, rate, 0.5)
                _wait(lambda link=link: link.unsettled() == 0, 60, "warm-up not acked")
            samples: dict[str, list[dict[str, float]]] = {mode: [] for mode in links}
            order = list(links)
            for round_index in range(rounds):
                turn = order[round_index % len(order) :] + order[: round_index % len(order)]
                for mode in turn:
                    samples[mode].append(
                        _measure(producer, links[mode], sidecar.process.pid, rate, seconds)
                    )
            idle = {mode: _idle(link, idle_seconds) for mode, link in links.items()}
            counters = {mode: dict(link.counters()) for mode, link in links.items()}
        finally:
            os.sched_setaffinity(0, previous)
            for link in links.values():
                link.close(timeout=10)
            if saved_env is None:
                os.environ.pop(RELAY_CPUS_ENV, None)
            else:
                os.environ[RELAY_CPUS_ENV] = saved_env
            sidecar.stop()
    return {
        "config": {
            "rate_per_s": rate,
            "rows_per_step": rows,
            "hidden": hidden,
            "seconds_per_mode": seconds,
            "rounds": rounds,
            "producer_cpus": sorted(producer_cpus) if producer_cpus else "unpinned",
            "relay_and_sidecar_cpus": sorted(side_cpus) if side_cpus else "unpinned",
            "baseline_tree": roots["baseline"][0] if "baseline" in roots else None,
        },
        "modes": {
            mode: {
                **{key: round(statistics.median(s[key] for s in rows_), 4) for key in _KEYS},
                "idle": idle[mode],
                "acked": counters[mode].get("acked", 0),
                # None where the relay does not count messages (a baseline tree from before
                # the linger): the table prints "-" rather than steps / 1.
                "steps_per_message": (
                    round(counters[mode]["sent"] / counters[mode]["messages"], 2)
                    if counters[mode].get("messages") and counters[mode].get("sent")
                    else None
                ),
                "dropped": sum(v for k, v in counters[mode].items() if k not in _NOT_DROPS and v),
            }
            for mode, rows_ in samples.items()
        },
    }


_KEYS = (
    "steps",
    "relay_ms_per_step",
    "relay_switches_per_step",
    "sidecar_ms_per_step",
    "producer_us_per_step",
    "eventfd_writes_per_step",
)
_NOT_DROPS = {"sent", "acked", "rejected", "rows_acked", "reconnects", "messages"}


class _Producer:
    """The model thread's part: one persistent [rows, hidden] buffer, published every step
    with the same tagging (as the vLLM plugin's decode steps)."""

    def __init__(self, rows: int, hidden: int) -> None:
        from monitor.capture.steps import Tagging
        from monitor.hookpoints import hook_point_name

        self.buffer = torch.randn(rows, hidden, generator=torch.Generator().manual_seed(3))
        self.view = self.buffer[:rows]  # the same view object every step, as the plugin's
        self.hook_point = hook_point_name(HOOK_LAYER)
        ids = tuple(f"bench-{i}" for i in range(rows))
        self.tagging = Tagging(ids, ("assistant",) * rows, ids, key=("bench", ids))
        self.rows = [1] * rows
        self.position = 0
        self.cpu_ns = 0
        self.published = 0

    def run(self, link: Any, rate: float, seconds: float) -> int:
        """Publish at `rate` for `seconds`; returns the steps published."""
        from monitor.capture.steps import CapturedStep

        period = 1.0 / rate
        start = time.perf_counter()
        count = int(seconds * rate)
        published = 0
        for index in range(count):
            delay = start + index * period - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            self.position += 1
            step = CapturedStep(
                layers={self.hook_point: self.view},
                tagging=self.tagging,
                rows=self.rows,
                positions=[self.position] * len(self.rows),
                persistent_layers=True,
            )
            before = time.thread_time_ns()
            if link.publish(step, None):
                published += 1
            self.cpu_ns += time.thread_time_ns() - before
        self.published += published
        return published


def _measure(producer: _Producer, link: Any, sidecar_pid: int, rate: float, seconds: float):  # type: ignore[no-untyped-def]
    relay_pid = link._process.pid
    writer = link._channel.writer
    relay_before = _cpu_ns([relay_pid])
    switches_before = _switches(relay_pid)
    sidecar_before = _cpu_ns([sidecar_pid])
    producer_before, writes_before = producer.cpu_ns, getattr(writer, "wakeups_sent", 0)
    steps = producer.run(link, rate, seconds)
    _wait(lambda: link.unsettled() == 0, 60, "steps not acked")
    relay = _cpu_ns([relay_pid]) - relay_before
    switches = _switches(relay_pid) - switches_before
    sidecar = _cpu_ns([sidecar_pid]) - sidecar_before
    per = max(steps, 1)
    return {
        "steps": steps,
        "relay_ms_per_step": relay / per / 1e6,
        "relay_switches_per_step": switches / per,
        "sidecar_ms_per_step": sidecar / per / 1e6,
        "producer_us_per_step": (producer.cpu_ns - producer_before) / per / 1e3,
        "eventfd_writes_per_step": (getattr(writer, "wakeups_sent", 0) - writes_before) / per,
    }


def _idle(link: Any, seconds: float) -> dict[str, float]:
    """The relay's CPU (ms) and context switches per second with nothing to send."""
    pid = link._process.pid
    time.sleep(1.0)  # past the last step's acks
    cpu, switches = _cpu_ns([pid]), _switches(pid)
    time.sleep(seconds)
    return {
        "relay_cpu_ms_per_s": round((_cpu_ns([pid]) - cpu) / 1e6 / seconds, 3),
        "relay_switches_per_s": round((_switches(pid) - switches) / seconds, 1),
    }


def _cpu_ns(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        for tid in _tids(pid):
            with contextlib.suppress(OSError, ValueError, IndexError):
                total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
    return total


def _switches(pid: int) -> int:
    """Voluntary context switches of every thread of `pid`: each is a thread going to sleep."""
    total = 0
    for tid in _tids(pid):
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    total += int(line.split()[1])
    return total


def _tids(pid: int) -> list[str]:
    try:
        return os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []


def _wait(condition: Any, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(message)
        time.sleep(0.01)


def _start_sidecar(workdir: Path, hidden: int, cpus: set[int] | None) -> Any:
    """A sidecar with a 4-feature pack on the hook layer and one `for: 8` rule, as in the
    vLLM overhead bench, pinned to `cpus`."""
    from monitor.features import save_pack
    from monitor.features.build import build_pack_from_sae, load_sae
    from monitor.fixtures import start_sidecar, write_layer_sae

    sae = load_sae(write_layer_sae(workdir / "sae", hidden, 64, HOOK_LAYER, seed=5))
    pack = workdir / "bench.pack.safetensors"
    save_pack(build_pack_from_sae(sae, [0, 1, 2, 3], name="bench"), pack)
    rules = workdir / "rules.yaml"
    rules.write_text(
        "features: {f: bench/0}\nrules:\n"
        "  - rule: sustained\n    severity: info\n    condition: f > 1000\n    for: 8\n"
    )

    def pin() -> None:
        if cpus is not None:
            os.sched_setaffinity(0, cpus)

    return start_sidecar(
        {"packs": [str(pack)], "rules": [str(rules)]},
        workdir,
        preexec_fn=pin,
    )


def format_relay_table(result: dict[str, Any]) -> str:
    """The report as a table."""
    c = result["config"]
    lines = [
        f"capture relay at light load: {c['rate_per_s']:g} steps/s of {c['rows_per_step']} x "
        f"{c['hidden']} FP32, {c['rounds']} rounds x {c['seconds_per_mode']:g} s per mode; "
        f"producer on CPU {c['producer_cpus']}, relays + sidecar on {c['relay_and_sidecar_cpus']}"
        " (per step: medians over rounds)",
        f"{'mode':<12}{'relay ms':>9}{'relay cs':>10}{'sidecar ms':>12}{'producer us':>13}"
        f"{'eventfd':>9}{'idle ms/s':>11}{'idle cs/s':>11}{'acked':>8}{'dropped':>9}"
        f"{'steps/msg':>10}",
    ]
    for mode, row in result["modes"].items():
        lines.append(
            f"{mode:<12}{row['relay_ms_per_step']:>9.3f}{row['relay_switches_per_step']:>10.2f}"
            f"{row['sidecar_ms_per_step']:>12.3f}{row['producer_us_per_step']:>13.1f}"
            f"{row['eventfd_writes_per_step']:>9.2f}{row['idle']['relay_cpu_ms_per_s']:>11.2f}"
            f"{row['idle']['relay_switches_per_s']:>11.1f}{row['acked']:>8}{row['dropped']:>9}"
            + (
                f"{row['steps_per_message']:>10.2f}"
                if row["steps_per_message"] is not None
                else f"{'-':>10}"
            )
        )
    lines.append(
        "relay cs: voluntary context switches of the relay's threads (wake-ups); eventfd: the "
        "producer's wake-up writes (system calls on the model's thread)"
    )
    return "\n".join(lines)
