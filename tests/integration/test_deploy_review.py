"""The review page in deploy/: its container, config, Service and the PostgreSQL variant agree
with each other, with the sidecar's volumes and with the review config validation."""

from __future__ import annotations

import copy
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from monitor.audit.review.config import parse_review_config
from tests.integration.test_deploy import (
    K8S,
    PG_COMPONENT,
    REVIEW_PORT,
    _generated_file,
    _generator,
    _load_all,
    _pod_spec,
    _resources,
    _sidecar,
)


def _review() -> dict[str, Any]:
    matches = [c for c in _pod_spec()["containers"] if c["name"] == "review"]
    assert len(matches) == 1, "no container named 'review' in the model-server pod"
    return matches[0]


def _review_configs() -> dict[str, Path]:
    base = _generator(K8S, "configMapGenerator", "safety-monitor-review-config")
    pg = _generator(PG_COMPONENT, "secretGenerator", "safety-monitor-review-config")
    return {
        "sqlite": K8S / _generated_file(base, "review.yaml"),
        "postgres": PG_COMPONENT / _generated_file(pg, "review.yaml"),
    }


def _mount(path: str, mounts: list[dict[str, Any]]) -> dict[str, Any]:
    target = PurePosixPath(path)
    under = [m for m in mounts if target == PurePosixPath(m["mountPath"])
             or PurePosixPath(m["mountPath"]) in target.parents]  # fmt: skip
    assert under, f"{path} lies under no volumeMount of the review container"
    return max(under, key=lambda m: len(m["mountPath"]))


def test_review_container_runs_audit_serve_with_its_config() -> None:
    review = _review()
    command = review["command"]
    assert command[:4] == ["safety-monitor", "audit", "serve", "--config"]
    mount = _mount(command[4], review["volumeMounts"])
    assert mount["name"] == "review-config" and mount["subPath"] == "review.yaml"
    assert review["image"] == _sidecar()["image"]  # one image, two processes
    ports = {p["name"]: p["containerPort"] for p in review["ports"]}
    assert ports == {"review": REVIEW_PORT}
    for probe in ("readinessProbe", "livenessProbe"):
        assert review[probe]["httpGet"] == {"path": "/healthz", "port": "review"}
    context = review["securityContext"]
    assert context["runAsNonRoot"] and context["readOnlyRootFilesystem"]
    assert context["capabilities"]["drop"] == ["ALL"] and not context["allowPrivilegeEscalation"]
    assert "memory" in review["resources"]["limits"]


def test_review_service_selects_the_pod_and_port() -> None:
    (service,) = [s for s in _resources("Service") if s["metadata"]["name"].endswith("review")]
    labels = next(iter(_resources("Deployment")))["spec"]["template"]["metadata"]
    assert service["spec"]["selector"].items() <= labels["labels"].items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "review" and port["port"] == REVIEW_PORT


@pytest.mark.parametrize("variant", ["sqlite", "postgres"])
def test_review_config_passes_validation_and_paths_lie_on_mounts(variant, tmp_path) -> None:
    raw = yaml.safe_load(_review_configs()[variant].read_text())
    mounts = _review()["volumeMounts"]
    volumes = {v["name"]: v for v in _pod_spec()["volumes"]}
    rewritten = copy.deepcopy(raw)

    def local(container_path: str) -> Path:
        path = tmp_path / PurePosixPath(container_path).relative_to("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    for pack in raw["packs"]:
        mount = _mount(pack, mounts)
        assert mount["name"] == "packs" and mount["readOnly"]
        # The same packs the sidecar loads (feature names and descriptions must match).
    sidecar_config = yaml.safe_load((K8S / "sidecar.yaml").read_text())
    assert raw["packs"] == sidecar_config["packs"]
    assert raw["redact_patterns"] == sidecar_config["audit"]["redact_patterns"]
    rewritten["packs"] = []
    for i, entry in enumerate(raw["auth"]["tokens"]):
        mount = _mount(entry["token_file"], mounts)
        assert "secret" in volumes[mount["name"]], "review tokens must come from a Secret"
        local(entry["token_file"]).write_text("x" * 32)
        rewritten["auth"]["tokens"][i]["token_file"] = str(local(entry["token_file"]))
    secret = raw["auth"]["session_secret_file"]
    assert "secret" in volumes[_mount(secret, mounts)["name"]]
    local(secret).write_text("k" * 32)
    rewritten["auth"]["session_secret_file"] = str(local(secret))
    if variant == "sqlite":
        db = raw["store"].removeprefix("sqlite:///")
        # The store the sidecar writes, on a read-write mount (WAL readers need the -shm file).
        assert raw["store"] == sidecar_config["audit"]["url"]
        mount = _mount(db, mounts)
        assert mount["name"] == "audit" and not mount.get("readOnly")
        assert _mount(db, _sidecar()["volumeMounts"])["name"] == "audit"
        rewritten["store"] = f"sqlite:///{local(db)}"
    else:
        pg_sidecar = yaml.safe_load((PG_COMPONENT / "sidecar.yaml").read_text())
        assert raw["store"] == pg_sidecar["audit"]["url"]
    config = parse_review_config(rewritten, tmp_path, "review.yaml")
    assert config.port == REVIEW_PORT and config.host == "0.0.0.0"
    assert not config.auth.allow_anonymous


def test_postgres_review_config_differs_only_in_store() -> None:
    configs = {k: yaml.safe_load(p.read_text()) for k, p in _review_configs().items()}
    for config in configs.values():
        config.pop("store")
    assert configs["sqlite"] == configs["postgres"]
    patch = _load_all(PG_COMPONENT / "deployment-patch.yaml")[0]
    volumes = {v["name"]: v for v in patch["spec"]["template"]["spec"]["volumes"]}
    assert volumes["review-config"]["secret"]["secretName"] == "safety-monitor-review-config"
