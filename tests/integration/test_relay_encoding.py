"""Local encoding in the capture relay (a CPU model's default), against a real sidecar: the
alerts and their values are those of local encoding in the hook, a relay killed and restarted
keeps encoding, and a pack the relay cannot load costs nothing (the sidecar encodes the
activations). That the relay's feature values do reach the sidecar as features, under the
pack's hash, is shown by test_capture_serving.py's stale-pack test (rejected as a whole)."""

from __future__ import annotations

import os
import signal
import time

import pytest
from prometheus_client import CollectorRegistry

from monitor.capture import CaptureClient
from monitor.fixtures import build_tiny_llama, start_sidecar
from tests.conftest import build_pack_with_cli
from tests.integration.test_capture_relay import relay_pid, wait_for
from tests.integration.test_capture_serving import HIDDEN, generate, tokens, wait_connected

# Counting rules (as in test_capture_serving.py): value-<f>-<L> fires once a conversation has
# shown L tokens, at position L-1, and its value is that token's value of the feature. So equal
# alerts mean equal feature values at every position, bit for bit.
COUNTED = 10
VALUE_RULES = "features: {f0: bars/0, f1: bars/1}\nrules:\n" + "".join(
    f"  - rule: value-{feature}-{length}\n"
    "    category: accounting\n"
    "    severity: info\n"
    f"    condition: abs({feature}) >= 0\n"
    f"    for: {length}\n"
    for feature in ("f0", "f1")
    for length in range(1, COUNTED + 1)
)


@pytest.fixture(scope="module")
def pack_and_sidecar(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("relay-encoding")
    pack = build_pack_with_cli(workdir, d_in=HIDDEN, d_sae=32, hook_layer=1, features=[0, 1])
    rules = workdir / "values.yaml"
    rules.write_text(VALUE_RULES)
    config = {"listen": "127.0.0.1:0", "packs": [str(pack)], "rules": [str(rules)]}
    process = start_sidecar(config, workdir)
    yield pack, process
    process.stop()


def wait_relay_encoder(client: CaptureClient, state: str = "ready") -> None:
    """Until the relay has loaded the pack (or failed to): before that, activations go
    unencoded (the sidecar encodes them), which these tests must not mistake for the relay's."""
    wait_for(lambda: client.relay_encoder == state, timeout=60)


def _assert_nothing_lost(*clients: CaptureClient) -> None:
    for client in clients:
        assert client.stats.batches_rejected == 0
        assert client.stats.dropped.total() == 0


def _alerts(client: CaptureClient, conversation_id: str) -> list[tuple[str, int, float]]:
    return sorted(
        (a.rule, a.position, a.value) for a in client.alerts if a.conversation_id == conversation_id
    )


def _run(client: CaptureClient, model, conversation_id: str) -> list[tuple[str, int, float]]:
    with client.conversation(conversation_id):
        generate(model, tokens([3, 1, 4, 1, 5], [9, 2, 6, 5, 3]), max_new_tokens=6)
    assert client.flush(30)
    return _alerts(client, f"{conversation_id}/0") + _alerts(client, f"{conversation_id}/1")


def test_relay_encoding_sends_what_hook_encoding_sends(pack_and_sidecar):
    pack, sidecar = pack_and_sidecar
    model = build_tiny_llama(hidden=HIDDEN)
    hook = CaptureClient(
        sidecar.target, encode_locally=pack, encode_in="hook", metrics_registry=None
    )
    registry = CollectorRegistry()
    relay = CaptureClient(sidecar.target, encode_locally=pack, metrics_registry=registry)
    try:
        hook.attach(model, layers=[1])
        in_hook = _run(hook, model, "by-hook")
        hook.detach()
        relay.attach(model, layers=[1])
        assert relay.encoding_in == "relay" and hook.encoding_in == "hook"
        assert hook.relay_encoder is None
        wait_relay_encoder(relay)
        assert _encoder_states(registry, relay.target) == {"loading": 0, "ready": 1, "failed": 0}
        in_relay = _run(relay, model, "by-relay")
        assert len(in_hook) == 2 * 2 * COUNTED  # two features, two rows, every counted token
        assert in_relay == in_hook
        assert len({value for _, _, value in in_hook}) > 10  # real feature values, not a constant
        _assert_nothing_lost(hook, relay)
    finally:
        hook.close(timeout=10)
        relay.close(timeout=10)


def test_a_relay_killed_and_restarted_keeps_encoding(pack_and_sidecar):
    pack, sidecar = pack_and_sidecar
    model = build_tiny_llama(hidden=HIDDEN)
    hook = CaptureClient(
        sidecar.target, encode_locally=pack, encode_in="hook", metrics_registry=None
    )
    client = CaptureClient(
        sidecar.target,
        encode_locally=pack,
        reconnect_backoff=(0.05, 0.2),
        metrics_registry=None,
    )
    try:
        hook.attach(model, layers=[1])
        expected = _run(hook, model, "restart")
        hook.detach()
        client.attach(model, layers=[1])
        wait_connected(client)
        wait_relay_encoder(client)
        first = relay_pid(client)
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: client._link._process.pid != first and client.connected)
        # The new relay loads the pack again (a fresh ring: its state starts at "loading").
        wait_relay_encoder(client)
        assert _run(client, model, "restart") == expected
        assert client.stats.batches_rejected == 0
    finally:
        hook.close(timeout=10)
        client.close(timeout=10)


def test_a_pack_the_relay_cannot_load_leaves_encoding_to_the_sidecar(pack_and_sidecar, tmp_path):
    pack, sidecar = pack_and_sidecar
    copy = tmp_path / "bars.pack.safetensors"
    copy.write_bytes(pack.read_bytes())
    model = build_tiny_llama(hidden=HIDDEN)
    registry = CollectorRegistry()
    client = CaptureClient(sidecar.target, encode_locally=copy, metrics_registry=registry)
    hook = CaptureClient(
        sidecar.target, encode_locally=pack, encode_in="hook", metrics_registry=registry
    )
    try:
        copy.unlink()  # gone before the relay first needs it
        client.attach(model, layers=[1])
        assert client.encoding_in == "relay"
        wait_relay_encoder(client, "failed")
        # An operator sees it in the client's metrics, not only in the relay's log; a client
        # that encodes in its hooks reports no relay encoder at all.
        assert _encoder_states(registry, client.target) == {"loading": 0, "ready": 0, "failed": 1}
        samples = [
            sample
            for metric in registry.collect()
            if metric.name == "safety_monitor_capture_relay_encoder"
            for sample in metric.samples
        ]
        assert len(samples) == 3  # the relay-encoding client's states only
        got = _run(client, model, "no-pack")
        client.detach()
        hook.attach(model, layers=[1])
        # The sidecar encoded the activations with the pack it serves: the same alerts.
        assert got == _run(hook, model, "no-pack")
        _assert_nothing_lost(client)
    finally:
        client.close(timeout=10)
        hook.close(timeout=10)


def _encoder_states(registry: CollectorRegistry, target: str) -> dict[str, float | None]:
    return {
        state: registry.get_sample_value(
            "safety_monitor_capture_relay_encoder", {"target": target, "state": state}
        )
        for state in ("loading", "ready", "failed")
    }


def test_relay_encoding_needs_a_pack_path(pack_and_sidecar):
    pack, sidecar = pack_and_sidecar
    from monitor.features import load_pack

    with pytest.raises(ValueError, match="encode_in='relay': pass encode_locally as the pack"):
        CaptureClient(
            sidecar.target,
            encode_locally=load_pack(pack),
            encode_in="relay",
            metrics_registry=None,
        )
    with pytest.raises(ValueError, match="encode_in: expected one of"):
        CaptureClient(sidecar.target, encode_in="gpu", metrics_registry=None)
    # A pack object with the default: encoded in the hook, as before.
    client = CaptureClient(sidecar.target, encode_locally=load_pack(pack), metrics_registry=None)
    try:
        client.attach(build_tiny_llama(hidden=HIDDEN), layers=[1])
        assert client.encoding_in == "hook"
    finally:
        client.close(timeout=10)


def test_a_lingering_relay_does_not_hold_back_the_steps_it_encodes(pack_and_sidecar):
    """Encoded steps carry feature blocks, which never merge: with a linger each would wait
    it out alone (1 s a step here, about 6 s for this generate); they go as they come."""
    pack, sidecar = pack_and_sidecar
    model = build_tiny_llama(hidden=HIDDEN)
    client = CaptureClient(
        sidecar.target, encode_locally=pack, linger_ms=1000, metrics_registry=None
    )
    try:
        client.attach(model, layers=[1])
        wait_connected(client)
        wait_relay_encoder(client)
        with client.conversation("lingering"):
            generate(model, tokens([3, 1, 4]), max_new_tokens=6, min_new_tokens=6)
        started = time.monotonic()
        # Lingering, the 6 steps would take at least 6 s; a wide margin for a busy machine.
        settled = wait_settled_within(client, 4.5)
        assert settled, f"6 steps not settled {time.monotonic() - started:.1f} s after generate"
        assert client.stats.batches_acked == 6
    finally:
        client.close(timeout=10)


def wait_settled_within(client: CaptureClient, seconds: float) -> bool:
    """Whether every step is settled within `seconds`, without asking the relay to hurry
    (`flush` would end its linger)."""
    deadline = time.monotonic() + seconds
    while client.queue_depth or client._link.unsettled():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True
