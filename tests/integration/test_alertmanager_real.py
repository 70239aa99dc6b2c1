"""A fired rule reaches a real Alertmanager (Debian's prometheus-alertmanager, installed by
.ci/run) through the sidecar, and is listed by Alertmanager's own API."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request

import grpc
import pytest

from monitor.fixtures import free_port
from monitor.wire import pb_grpc
from tests.integration.test_sidecar_audit import _batch, _config

SKIP_ENV = "SAFETY_MONITOR_SKIP_ALERTMANAGER"


@pytest.fixture
def alertmanager(tmp_path):
    binary = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    if binary is None:
        message = "prometheus-alertmanager not found (apt-get install prometheus-alertmanager)"
        if os.environ.get(SKIP_ENV) == "1":
            pytest.skip(f"{message}; {SKIP_ENV}=1")
        pytest.fail(f"{message}, or set {SKIP_ENV}=1 to skip", pytrace=False)
    config = tmp_path / "alertmanager.yml"
    config.write_text("route: {receiver: nobody}\nreceivers: [{name: nobody}]\n")
    port = free_port()
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.path={tmp_path / 'am-data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "alertmanager.log").open("wb"),
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=1):
                break
        except OSError:
            time.sleep(0.1)
    else:
        process.kill()
        pytest.fail("alertmanager did not become ready")
    yield url
    process.terminate()
    process.wait(10)


def _listed(url: str) -> list[dict]:
    with urllib.request.urlopen(f"{url}/api/v2/alerts", timeout=5) as reply:
        return json.loads(reply.read())


def test_rule_firing_is_listed_by_a_real_alertmanager(tmp_path, sidecar_factory, alertmanager):
    sidecar = sidecar_factory(_config(tmp_path, alertmanager={"url": alertmanager}))
    with grpc.insecure_channel(sidecar.target) as channel:
        stub = pb_grpc.SafetyMonitorStub(channel)
        list(stub.Monitor(iter([_batch(1, "real-am", 0, ["a"])]), timeout=30))
    deadline = time.monotonic() + 20
    while not _listed(alertmanager) and time.monotonic() < deadline:
        time.sleep(0.2)
    alerts = _listed(alertmanager)
    assert len(alerts) == 1
    assert alerts[0]["labels"]["alertname"] == "always-audited"
    assert alerts[0]["labels"]["severity"] == "critical"
    assert alerts[0]["annotations"]["conversation_id"] == "real-am"
    assert alerts[0]["status"]["state"] == "active"
