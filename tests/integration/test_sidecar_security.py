"""TLS, mutual TLS and bearer-token auth on the sidecar's gRPC port, with certificates made by
openssl for 127.0.0.1, a real sidecar process and the real capture client."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from monitor.capture import CaptureClient
from monitor.fixtures import build_tiny_llama
from monitor.sidecar.config import ConfigError, load_config
from monitor.wire import pb, pb_grpc
from tests.conftest import build_pack_with_cli

HIDDEN = 64


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by it."""
    d = tmp_path_factory.mktemp("certs")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
             "ca.crt", "-days", "2", "-subj", "/CN=test-ca", cwd=d)  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                 f"{name}.csr", "-subj", f"/CN={name}", cwd=d)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", "san.ext",
                 cwd=d)  # fmt: skip
    return d


def _config(tmp_path: Path, security: dict) -> dict:
    pack = build_pack_with_cli(tmp_path, d_in=HIDDEN, d_sae=32, hook_layer=1, features=[0])
    return {"packs": [str(pack)], "security": security}


def _stream_one_forward(client: CaptureClient, connects: bool = True) -> None:
    model = build_tiny_llama(hidden=HIDDEN)
    client.attach(model, layers=[1])
    deadline = time.monotonic() + 10
    while connects and not client.connected and time.monotonic() < deadline:
        time.sleep(0.05)
    with client.conversation("secure"), torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    client.flush(15)
    client.close(timeout=5)


def test_tls_client_with_the_ca_is_served(tmp_path, sidecar_factory, certs):
    security = {"tls_cert": str(certs / "server.crt"), "tls_key": str(certs / "server.key")}
    sidecar = sidecar_factory(_config(tmp_path, security))
    client = CaptureClient(sidecar.target, tls_ca=certs / "ca.crt", metrics_registry=None)
    _stream_one_forward(client)
    assert client.stats.batches_acked == 1

    plaintext = CaptureClient(sidecar.target, connect_timeout=0.5, metrics_registry=None)
    _stream_one_forward(plaintext, connects=False)
    assert plaintext.stats.batches_acked == 0
    assert plaintext.stats.dropped.total() == 1


def test_mutual_tls_requires_a_client_certificate(tmp_path, sidecar_factory, certs):
    security = {
        "tls_cert": str(certs / "server.crt"),
        "tls_key": str(certs / "server.key"),
        "tls_client_ca": str(certs / "ca.crt"),
    }
    sidecar = sidecar_factory(_config(tmp_path, security))
    with_cert = CaptureClient(
        sidecar.target,
        tls_ca=certs / "ca.crt",
        tls_cert=certs / "client.crt",
        tls_key=certs / "client.key",
        metrics_registry=None,
    )
    _stream_one_forward(with_cert)
    assert with_cert.stats.batches_acked == 1

    without_cert = CaptureClient(
        sidecar.target, tls_ca=certs / "ca.crt", connect_timeout=0.5, metrics_registry=None
    )
    _stream_one_forward(without_cert, connects=False)
    assert without_cert.stats.batches_acked == 0


def test_bearer_token_on_every_call_but_health(tmp_path, sidecar_factory):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    sidecar = sidecar_factory(_config(tmp_path, {"token_file": str(token_file)}))
    with grpc.insecure_channel(sidecar.target) as channel:
        stub = pb_grpc.SafetyMonitorStub(channel)
        with pytest.raises(grpc.RpcError) as denied:
            stub.GetStatus(pb.StatusRequest(), timeout=5)
        assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as wrong:
            stub.GetStatus(pb.StatusRequest(), timeout=5, metadata=[("authorization", "Bearer x")])
        assert wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = stub.GetStatus(
            pb.StatusRequest(), timeout=5, metadata=[("authorization", "Bearer s3cret-token")]
        )
        assert ok.packs[0].name == "bars"
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING  # probes carry no token

    good = CaptureClient(sidecar.target, token="s3cret-token", metrics_registry=None)
    _stream_one_forward(good)
    assert good.stats.batches_acked == 1
    bad = CaptureClient(sidecar.target, token="guess", metrics_registry=None)
    _stream_one_forward(bad)
    assert bad.stats.batches_acked == 0 and bad.stats.dropped["disconnected"] == 1


def test_half_a_tls_config_is_refused(tmp_path):
    (tmp_path / "p").write_bytes(b"x")
    (tmp_path / "server.crt").write_text("x")
    config = tmp_path / "sidecar.yaml"
    config.write_text("packs: [p]\nsecurity: {tls_cert: server.crt}\n")
    with pytest.raises(ConfigError, match="tls_cert and tls_key go together"):
        load_config(config)
    config.write_text("packs: [p]\nsecurity: {token_file: missing}\n")
    with pytest.raises(ConfigError, match=r"security\.token_file: missing: no such file"):
        load_config(config)
