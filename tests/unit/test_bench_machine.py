"""`monitor.bench.machine`: the machine line every bench prints, from sample /proc and /sys
text, and with the files missing."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from monitor.bench.encoder import add_bench_encoder_command
from monitor.bench.machine import (
    UNKNOWN,
    Machine,
    cpu_model,
    describe,
    format_cpu_list,
    parse_cpu_list,
    smt_of,
)

X86_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13 64-Core Processor
flags\t\t: fpu vme

processor\t: 1
model name\t: AMD EPYC 7B13 64-Core Processor
"""
ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 50.00
CPU part\t: 0xd0c

Hardware\t: Ampere Altra
"""


@pytest.mark.parametrize(
    ("text", "cpus"),
    [
        ("0\n", {0}),
        ("0-1\n", {0, 1}),
        ("0,32\n", {0, 32}),
        ("0-3,8,10-11", {0, 1, 2, 3, 8, 10, 11}),
    ],
)
def test_parse_cpu_list(text: str, cpus: set[int]) -> None:
    assert parse_cpu_list(text) == cpus
    assert parse_cpu_list(format_cpu_list(cpus)) == cpus


@pytest.mark.parametrize("text", ["", "\n", "3-1", "a", "0-x", "-1"])
def test_parse_cpu_list_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_cpu_list(text)


def test_format_cpu_list_ranges() -> None:
    assert format_cpu_list([7, 0, 1, 2, 5, 8]) == "0-2,5,7-8"
    assert format_cpu_list([]) == ""


def test_cpu_model_from_cpuinfo() -> None:
    assert cpu_model(X86_CPUINFO) == "AMD EPYC 7B13 64-Core Processor"
    assert cpu_model(ARM_CPUINFO) == "Ampere Altra"
    assert cpu_model("processor : 0\nflags : fpu\n") == UNKNOWN
    assert cpu_model("") == UNKNOWN


def test_smt_of_siblings() -> None:
    # Two usable CPUs that are the two threads of one core (the earlier sessions' machines).
    assert smt_of({0: {0, 1}, 1: {0, 1}}, [0, 1]) == (2, True)
    # Two-thread cores, but the process may use one thread of each: no sharing between them.
    assert smt_of({0: {0, 32}, 1: {1, 33}}, [0, 1]) == (2, False)
    # One thread per core (this session's machine).
    assert smt_of({0: {0}, 1: {1}}, [0, 1]) == (1, False)
    # One CPU's list unread: sharing cannot be ruled out.
    assert smt_of({0: {0}}, [0, 1]) == (1, None)
    # Nothing read at all.
    assert smt_of({}, [0, 1]) == (None, None)
    # Lists of CPUs outside the mask do not count.
    assert smt_of({5: {5, 6}}, [0]) == (None, None)


def _sysfs(root: Path, lists: dict[int, str]) -> Path:
    for cpu, text in lists.items():
        topology = root / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "thread_siblings_list").write_text(text)
    return root


def test_describe_reads_sample_files(tmp_path: Path) -> None:
    import os

    usable = sorted(os.sched_getaffinity(0))
    # Every usable CPU paired with CPU 0's: siblings among the usable CPUs when there are two.
    lists = {cpu: f"{usable[0]},{cpu}" if cpu != usable[0] else str(cpu) for cpu in usable}
    if len(usable) > 1:
        lists[usable[0]] = f"{usable[0]},{usable[1]}"
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(X86_CPUINFO)
    machine = describe(cpuinfo, _sysfs(tmp_path / "cpu", lists))
    assert machine.cpu_model == "AMD EPYC 7B13 64-Core Processor"
    assert machine.usable_cpus == tuple(usable)
    if len(usable) > 1:
        assert machine.threads_per_core == 2 and machine.smt_siblings_usable is True
        assert "some usable CPUs are SMT siblings" in machine.summary()
    line = machine.summary()
    assert line.startswith("machine: AMD EPYC 7B13") and "\n" not in line
    assert f"{len(usable)} usable CPUs" in line


def test_describe_with_files_missing(tmp_path: Path) -> None:
    machine = describe(tmp_path / "no-cpuinfo", tmp_path / "no-sysfs")
    assert machine.cpu_model == UNKNOWN
    assert machine.threads_per_core is None and machine.smt_siblings_usable is None
    line = machine.summary()
    assert "machine: unknown;" in line and "SMT unknown" in line
    data = machine.as_dict()
    assert data["summary"] == line and data["threads_per_core"] is None
    json.dumps(data)  # a bench's JSON holds it


def test_summary_no_smt() -> None:
    machine = Machine("X", (0, 1), 1, False, "6.1", "2.5")
    assert machine.summary() == (
        "machine: X; 2 usable CPUs (0-1), 1 thread/core (no SMT); kernel 6.1; torch 2.5"
    )


def test_bench_command_prints_the_machine(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_bench_encoder_command(parser.add_subparsers())
    argv = ["encoder", "--rows", "8", "--d-model", "16", "--d-sae", "64", "--k", "4"]
    args = parser.parse_args([*argv, "--repeats", "1", "--json"])
    assert args.handler(args) == 0
    machine = json.loads(capsys.readouterr().out)["machine"]
    assert machine["summary"].startswith("machine: ") and machine["usable_cpus"]
    args = parser.parse_args([*argv, "--repeats", "1"])
    assert args.handler(args) == 0
    assert capsys.readouterr().out.splitlines()[0] == machine["summary"]
