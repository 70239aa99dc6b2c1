"""CPU lists for pinning the capture relay (`SAFETY_MONITOR_RELAY_CPUS`) and the vLLM overhead
bench's split of the machine: engines on one CPU, the monitor's processes on the rest."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from monitor.bench.vllm_overhead import plan_cpus
from monitor.capture.relay.main import parse_cpu_list


def test_cpu_lists():
    assert parse_cpu_list("3") == {3}
    assert parse_cpu_list("2,3") == {2, 3}
    assert parse_cpu_list("0-2, 5") == {0, 1, 2, 5}


@pytest.mark.parametrize("text", ["", ",", "x", "3-1", "-1", "0-4000000000", "8192"])
def test_bad_cpu_lists_are_refused(text):
    with pytest.raises(ValueError):
        parse_cpu_list(text)


def test_bench_cpu_plan():
    assert plan_cpus({0}) == (None, None)
    assert plan_cpus({0, 1}) == ({0}, {1})
    assert plan_cpus({5, 2, 7}) == ({2}, {5, 7})


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to pin to one")
def test_the_relay_pins_itself_before_it_starts_anything():
    cpu = min(os.sched_getaffinity(0))
    code = (
        "import os\n"
        "from monitor.logs import configure_logging\n"
        "from monitor.capture.relay.main import _pin_to_cpus\n"
        "configure_logging('auto', 'warning')\n"
        "_pin_to_cpus()\n"
        "print(sorted(os.sched_getaffinity(0)))\n"
    )
    env = {**os.environ, "SAFETY_MONITOR_RELAY_CPUS": str(cpu)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.stdout.strip() == f"[{cpu}]", out.stderr
    # A bad value is ignored (logged): pinning must never stop capture.
    env["SAFETY_MONITOR_RELAY_CPUS"] = "nonsense"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and out.stdout.strip() == str(sorted(os.sched_getaffinity(0)))
    assert "not pinned" in out.stderr
