"""The relay process between the serving process and the sidecar: it is restarted when it
dies (its steps counted, never silently lost), it exits when the serving process dies, the
doorbell mode used on CPUs that reorder stores delivers every step, and no gRPC thread runs in
the serving process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from monitor.capture import CaptureClient
from monitor.fixtures import build_tiny_llama, start_sidecar
from tests.integration.test_capture_serving import (
    HIDDEN,
    generate,
    seen_tokens,
    sidecar_config,
    tokens,
    wait_connected,
)


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("capture-relay")
    process = start_sidecar(sidecar_config(workdir), workdir)
    yield process
    process.stop()


def relay_pid(client: CaptureClient) -> int:
    process = client._link._process
    assert process is not None and process.poll() is None, "relay not running"
    return process.pid


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_relay_killed_is_restarted_and_its_steps_are_counted(sidecar):
    model = build_tiny_llama(hidden=HIDDEN)
    prompt = tokens([2, 7, 1, 8])
    expected = generate(model, prompt, max_new_tokens=5, min_new_tokens=5)
    client = CaptureClient(sidecar.target, reconnect_backoff=(0.05, 0.2), metrics_registry=None)
    client.attach(model, layers=[1])
    try:
        wait_connected(client)
        first = relay_pid(client)
        os.kill(first, signal.SIGSTOP)  # frozen: steps wait on the ring
        with client.conversation("held"):
            assert torch.equal(
                generate(model, prompt, max_new_tokens=5, min_new_tokens=5), expected
            )
        assert client.queue_depth == 5
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: client._link._process.pid != first and client.connected)
        assert client.flush(30)
        assert client.stats.dropped["relay_exited"] == 5

        with client.conversation("after"):
            assert torch.equal(
                generate(model, prompt, max_new_tokens=5, min_new_tokens=5), expected
            )
        assert client.flush(30)
        assert seen_tokens(client, "after") == 4 + 5 - 1
        assert client.stats.batches_acked == 5
    finally:
        client.close(timeout=10)


def test_doorbell_mode_delivers_every_step(sidecar):
    """What runs on AArch64: a doorbell byte per frame; forced here on x86-64."""
    model = build_tiny_llama(hidden=HIDDEN)
    client = CaptureClient(sidecar.target, metrics_registry=None)
    client._link.close(timeout=5)  # swap in a doorbell link before anything is captured
    from monitor.capture.link import RelayLink

    client._link = RelayLink(client._link.settings, 1 << 20, 64, client._on_event, doorbell=True)
    client._link.start()
    client.attach(model, layers=[1])
    try:
        with client.conversation("bell"):
            generate(model, tokens([5, 4, 3]), max_new_tokens=6, min_new_tokens=6)
        assert client.flush(30)
        assert client.stats.batches_acked == 6
        assert seen_tokens(client, "bell") == 3 + 6 - 1
    finally:
        client.close(timeout=10)


def test_no_grpc_threads_in_the_serving_process(sidecar):
    """The point of the relay: the serving process holds no gRPC channel or thread."""
    client = CaptureClient(sidecar.target, metrics_registry=None)
    try:
        wait_connected(client)
        names = [thread.name for thread in threading.enumerate()]
        assert "safety-monitor-relay" in names
        # grpc's Python threads are named after their targets (channel_spin, ...).
        assert not [n for n in names if "channel_spin" in n or "consume_request" in n]
        relay = client._link._process
        assert relay is not None and relay.poll() is None
    finally:
        client.close(timeout=10)
    assert relay.poll() is not None, "relay still running after close()"


def test_relay_exits_when_the_serving_process_dies(sidecar, tmp_path):
    script = textwrap.dedent(
        f"""
        import sys, time
        from monitor.capture import CaptureClient
        client = CaptureClient({sidecar.target!r}, metrics_registry=None)
        deadline = time.monotonic() + 30
        while not client.connected and time.monotonic() < deadline:
            time.sleep(0.02)
        print(client._link._process.pid, flush=True)
        time.sleep(60)
        """
    )
    serving = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        relay = int(serving.stdout.readline())
        serving.kill()
        serving.wait(10)
        deadline = time.monotonic() + 10
        while _alive(relay) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(relay), "relay outlived the serving process"
    finally:
        serving.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_step_larger_than_the_ring_is_dropped_and_counted(sidecar):
    model = build_tiny_llama(hidden=HIDDEN)
    client = CaptureClient(sidecar.target, buffer_bytes=4096, metrics_registry=None)
    client.attach(model, layers=[1])
    try:
        with client.conversation("big"), torch.no_grad():
            model(tokens(list(range(1, 40))))  # 39 rows x 64 x 4 bytes > 4 KiB
            model(tokens([1]))
        assert client.flush(30)
        assert client.stats.dropped["too_large"] == 1
        assert client.stats.batches_acked == 1
    finally:
        client.close(timeout=10)
