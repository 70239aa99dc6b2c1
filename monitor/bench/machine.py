"""The machine a bench ran on, in one line and in its JSON.

Bench numbers only compare between runs on the same kind of machine: the machines these
benches run on differ about 2x in speed, and whether two usable CPUs are SMT siblings of one
core (so that the model's core and the sidecar's compete for one core's execution units)
explained many earlier differences. Every bench prints this in its header and puts it in its
``--json`` under ``machine``.

Everything is read from /proc and /sys at the time of the call; a file that is missing or
unreadable (another OS, a container that hides /sys) gives "unknown" for that field rather
than an error, so a bench never fails for the sake of its header.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

UNKNOWN = "unknown"
CPUINFO = Path("/proc/cpuinfo")
CPU_SYSFS = Path("/sys/devices/system/cpu")

# The cpuinfo keys that name the CPU, in order of preference: x86 has "model name"; some ARM
# kernels give only "Hardware" or "CPU part", POWER gives "cpu".
_MODEL_KEYS = ("model name", "hardware", "cpu model", "cpu")


@dataclass(frozen=True)
class Machine:
    """What a bench's numbers depend on, as read when the bench started."""

    cpu_model: str
    # The CPUs this process may run on (its affinity mask), not all the machine's CPUs: a
    # bench pinned by taskset to 2 of 64 CPUs runs on 2.
    usable_cpus: tuple[int, ...]
    # The most hardware threads any usable CPU's core has (1: no SMT); None when unknown.
    threads_per_core: int | None
    # Whether two of the usable CPUs are hardware threads of one core; None when unknown.
    smt_siblings_usable: bool | None
    kernel: str
    torch: str

    def summary(self) -> str:
        """One line: CPU, usable CPUs, SMT, kernel, torch."""
        cpus = format_cpu_list(self.usable_cpus) if self.usable_cpus else UNKNOWN
        if self.threads_per_core is None:
            smt = "SMT unknown"
        else:
            plural = "s" if self.threads_per_core != 1 else ""
            smt = f"{self.threads_per_core} thread{plural}/core"
            if self.threads_per_core == 1:
                smt += " (no SMT)"
            if self.smt_siblings_usable is True:
                smt += ", some usable CPUs are SMT siblings"
            elif self.smt_siblings_usable is False and self.threads_per_core > 1:
                smt += ", no two usable CPUs are SMT siblings"
        return (
            f"machine: {self.cpu_model}; {len(self.usable_cpus)} usable CPUs ({cpus}), {smt}; "
            f"kernel {self.kernel}; torch {self.torch}"
        )

    def as_dict(self) -> dict[str, object]:
        """For a bench's JSON: the fields and the summary line."""
        fields = asdict(self)
        fields["usable_cpus"] = list(self.usable_cpus)
        fields["summary"] = self.summary()
        return fields


def describe(cpuinfo: Path = CPUINFO, cpu_sysfs: Path = CPU_SYSFS) -> Machine:
    """The machine this process runs on (paths overridable so a test can point them at
    files of its own, or at nothing)."""
    try:
        usable = tuple(sorted(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        usable = tuple(range(os.cpu_count() or 0))
    siblings: dict[int, frozenset[int]] = {}
    for cpu in usable:
        text = _read(cpu_sysfs / f"cpu{cpu}" / "topology" / "thread_siblings_list")
        if text is None:
            continue
        try:
            siblings[cpu] = frozenset(parse_cpu_list(text))
        except ValueError:
            continue
    threads, shared = smt_of(siblings, usable)
    info = _read(cpuinfo)
    return Machine(
        cpu_model=cpu_model(info) if info is not None else UNKNOWN,
        usable_cpus=usable,
        threads_per_core=threads,
        smt_siblings_usable=shared,
        kernel=platform.release() or UNKNOWN,
        torch=_version("torch"),
    )


def parse_cpu_list(text: str) -> set[int]:
    """The CPUs of a kernel CPU list such as ``0-3,8,10-11`` (the format of
    thread_siblings_list); ValueError if it is not one."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        first, _, last = part.partition("-")
        low, high = int(first), int(last) if last else int(first)
        if low < 0 or high < low:
            raise ValueError(f"CPU list: bad range {part!r}")
        cpus.update(range(low, high + 1))
    if not cpus:
        raise ValueError(f"CPU list: empty {text!r}")
    return cpus


def format_cpu_list(cpus: Iterable[int]) -> str:
    """The kernel's notation for a set of CPUs: ``0-3,8``."""
    ranges: list[list[int]] = []
    for cpu in sorted(set(cpus)):
        if ranges and cpu == ranges[-1][1] + 1:
            ranges[-1][1] = cpu
        else:
            ranges.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


def smt_of(
    siblings: Mapping[int, Iterable[int]], usable: Iterable[int]
) -> tuple[int | None, bool | None]:
    """Threads per core (the largest sibling list among the usable CPUs) and whether two
    usable CPUs share a core, from each usable CPU's thread siblings; (None, None) when no
    usable CPU's siblings are known. A CPU whose list is missing counts as unknown, so
    "no siblings" is only claimed when every usable CPU's list was read."""
    usable_set = set(usable)
    known = {cpu: set(s) | {cpu} for cpu, s in siblings.items() if cpu in usable_set}
    if not known:
        return None, None
    threads = max(len(s) for s in known.values())
    if any(len(s & usable_set) > 1 for s in known.values()):
        return threads, True
    return threads, False if len(known) == len(usable_set) else None


def cpu_model(cpuinfo_text: str) -> str:
    """The CPU's name from /proc/cpuinfo's text ("unknown" if it names none)."""
    found: dict[str, str] = {}
    for line in cpuinfo_text.splitlines():
        key, sep, value = line.partition(":")
        key, value = key.strip().lower(), value.strip()
        if sep and value and key in _MODEL_KEYS and key not in found:
            found[key] = value
    for key in _MODEL_KEYS:
        if key in found:
            return found[key]
    return UNKNOWN


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _version(package: str) -> str:
    # The installed distribution's version, without importing it (torch takes seconds to
    # import, and the rules bench does not otherwise need it).
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return UNKNOWN


def render(
    result: dict[str, Any], as_json: bool, table: Callable[[dict[str, Any]], str], machine: Machine
) -> str:
    """A bench's output: its JSON with the machine under ``machine``, or the machine's line
    above its table. `machine` is described when the bench starts, before a bench pins
    itself to fewer CPUs."""
    if as_json:
        return json.dumps({**result, "machine": machine.as_dict()}, indent=2)
    return machine.summary() + "\n" + table(result)
