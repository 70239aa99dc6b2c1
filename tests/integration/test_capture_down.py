"""The sidecar down, then up, in the middle of one conversation (fail-open): every step while
it is down is captured and dropped as `sidecar_unavailable` by the hooks' early exit, the
output is unchanged, and once it is back the conversation's tokens arrive at their true
positions (after the dropped ones), each exactly once. Fail-closed takes no early exit."""

from __future__ import annotations

import time

import torch

from monitor.capture import CaptureClient
from monitor.fixtures import build_tiny_llama, free_port, start_sidecar
from tests.integration.test_capture_serving import (
    HIDDEN,
    generate,
    sidecar_config,
    tokens,
    wait_connected,
)


def _wait_unreachable(client: CaptureClient, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not client._link.unreachable:
        assert time.monotonic() < deadline, "the relay never found the sidecar unreachable"
        time.sleep(0.02)


def test_a_conversation_across_a_sidecar_outage_keeps_its_positions(tmp_path):
    port = free_port()
    model = build_tiny_llama(hidden=HIDDEN)
    prompt = tokens([3, 1, 4, 1, 5])
    expected = generate(model, prompt, max_new_tokens=6, min_new_tokens=6)
    client = CaptureClient(
        f"127.0.0.1:{port}",
        reconnect_backoff=(0.05, 0.2),
        connect_timeout=0.5,
        metrics_registry=None,
    )
    sidecar = None
    try:
        client.attach(model, layers=[1])
        _wait_unreachable(client)
        with client.conversation("outage"):
            assert torch.equal(
                generate(model, prompt, max_new_tokens=6, min_new_tokens=6), expected
            )
        stats = client.stats
        assert stats.steps_captured == 6
        assert stats.dropped == {"sidecar_unavailable": 6}  # all by the early exit
        assert client.queue_depth == 0  # nothing was put on the ring
        assert client._last_tagging is None  # nor assembled: the hooks' early exit
        # A conversation that ends while the sidecar is still down: its end is counted as an
        # assembled end would be (captured, dropped), though no step of it was assembled.
        with client.conversation("gone"):
            generate(model, prompt, max_new_tokens=2, min_new_tokens=2)
        client.end_conversation("gone")
        assert client.stats.steps_captured == 6 + 2 + 1
        assert client.stats.dropped == {"sidecar_unavailable": 6 + 2 + 1}

        sidecar = start_sidecar(sidecar_config(tmp_path, port), tmp_path)
        wait_connected(client)
        with client.conversation("outage"):  # the same conversation goes on
            assert torch.equal(
                generate(model, prompt, max_new_tokens=6, min_new_tokens=6), expected
            )
        assert client.flush(30)
        assert client.stats.batches_acked == 6
        # The sidecar first saw the conversation at position 10 (5 + 6 - 1 tokens dropped):
        # the counting rule seen-L fires at the L-th token it saw, at its true position.
        fired = sorted(
            (int(a.rule.removeprefix("seen-")), a.position)
            for a in client.alerts
            if a.conversation_id == "outage"
        )
        assert fired == [(length, 10 + length - 1) for length in range(1, 5 + 6)]
    finally:
        client.close(timeout=10)
        if sidecar is not None:
            sidecar.stop()


def test_fail_closed_takes_no_early_exit():
    client = CaptureClient(
        f"127.0.0.1:{free_port()}",
        on_full="block",
        block_timeout=0.05,
        queue_size=2,
        reconnect_backoff=(0.05, 0.2),
        connect_timeout=0.5,
        metrics_registry=None,
    )
    model = build_tiny_llama(hidden=HIDDEN)
    try:
        client.attach(model, layers=[1])
        _wait_unreachable(client)
        with client.conversation("closed"):
            generate(model, tokens([1, 2, 3]), max_new_tokens=4, min_new_tokens=4)
        stats = client.stats
        assert stats.steps_captured == 4
        assert "sidecar_unavailable" not in stats.dropped  # it waited for room, then dropped
        assert sum(stats.dropped.values()) + client.queue_depth == 4
    finally:
        client.close(timeout=10)
