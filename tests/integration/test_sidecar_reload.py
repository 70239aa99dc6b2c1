"""Rule hot reload in a running sidecar: on file change and on SIGHUP, atomically between
batches, keeping the running set when the new file is broken."""

from __future__ import annotations

import signal
import time

import grpc

from monitor.wire import pb, pb_grpc
from tests.conftest import build_pack_with_cli
from tests.integration.test_bad_batches import good_batch

RULE = (
    "features: {{one: bars/1}}\n"
    "rules:\n"
    "  - {{rule: {name}, severity: info, condition: one > -1000}}\n"
)


def _status(target: str) -> pb.StatusResponse:
    with grpc.insecure_channel(target) as channel:
        return pb_grpc.SafetyMonitorStub(channel).GetStatus(pb.StatusRequest(), timeout=5)


def _fired(target: str, conversation: str) -> list[str]:
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.SafetyMonitorStub(channel)
        events = list(stub.Monitor(iter([good_batch(1, conversation=conversation)]), timeout=30))
    return [e.alert.rule for e in events if e.HasField("alert")]


def _wait(predicate, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def test_rules_reload_on_change_and_on_sighup(tmp_path, sidecar_factory):
    pack = build_pack_with_cli(tmp_path, d_in=32, d_sae=64, hook_layer=1, features=[1])
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULE.format(name="first"))
    sidecar = sidecar_factory(
        {"packs": [str(pack)], "rules": [str(rules)], "rules_reload_seconds": 0.2}
    )
    first_hash = _status(sidecar.target).rule_files[0].sha256
    assert _fired(sidecar.target, "c1") == ["first"]

    rules.write_text(RULE.format(name="second"))
    _wait(lambda: _status(sidecar.target).rule_files[0].sha256 != first_hash)
    assert _fired(sidecar.target, "c2") == ["second"]
    assert sidecar.metric("safety_monitor_rule_reloads_total", result="ok") == 1

    # A broken file: the running rules stay, the error is logged with its location.
    rules.write_text(RULE.format(name="third").replace("one > -1000", "one >"))
    _wait(lambda: sidecar.metric("safety_monitor_rule_reloads_total", result="error") == 1)
    assert _fired(sidecar.target, "c3") == ["second"]
    errors = [e for e in sidecar.log_events() if e.get("event", "").startswith("rule reload")]
    assert f"{rules}:3:" in errors[-1]["error"]


def test_sighup_reloads_when_polling_is_off(tmp_path, sidecar_factory):
    pack = build_pack_with_cli(tmp_path, d_in=32, d_sae=64, hook_layer=1, features=[1])
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULE.format(name="before"))
    sidecar = sidecar_factory(
        {"packs": [str(pack)], "rules": [str(rules)], "rules_reload_seconds": 0}
    )
    rules.write_text(RULE.format(name="after"))
    time.sleep(0.5)
    assert _fired(sidecar.target, "h1") == ["before"]  # no polling: nothing changes by itself
    sidecar.process.send_signal(signal.SIGHUP)
    _wait(lambda: _fired(sidecar.target, f"h-{time.monotonic()}") == ["after"])
