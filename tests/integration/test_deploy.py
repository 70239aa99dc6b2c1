"""Deployment files (deploy/): they parse, agree with each other and with the code.

- the Kubernetes kustomization lists files that exist; the sidecar config in its ConfigMap passes
  the project's own config validation, and every path in it lies under a volume the Deployment
  mounts; ports, probes, health service names, the native sidecar and its securityContext;
- every metric (and label) the Prometheus rules and the Grafana dashboard use is one the code
  registers;
- `promtool check rules` / `promtool test rules` (Debian package `prometheus`); without promtool
  these fail unless SAFETY_MONITOR_SKIP_PROMTOOL=1.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path, PurePosixPath
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from monitor.capture.metrics import register_client
from monitor.outputs.metrics import SidecarMetrics
from monitor.sidecar.config import SidecarConfig, parse_config
from tests.conftest import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
PG_COMPONENT = K8S / "components" / "postgres-audit"
PROM_RULES = DEPLOY / "prometheus" / "safety-monitor-rules.yaml"
PROM_TESTS = DEPLOY / "prometheus" / "safety-monitor-rules.test.yaml"
DASHBOARD = DEPLOY / "grafana" / "safety-monitor-dashboard.json"
DOCKERFILE = DEPLOY / "Dockerfile"

SIDECAR_CONTAINER = "safety-monitor"
GRPC_PORT = 50051
METRICS_PORT = 9464
REVIEW_PORT = 8088  # the review page's container (tests/integration/test_deploy_review.py)
# Labels Prometheus (prometheus-operator's PodMonitor) puts on every scraped series.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "container", "endpoint"}


# ---------------------------------------------------------------------------------- helpers


def _load_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _kustomization(directory: Path) -> dict[str, Any]:
    (doc,) = _load_all(directory / "kustomization.yaml")
    return doc


def _resources(kind: str) -> list[dict[str, Any]]:
    docs = []
    for name in _kustomization(K8S)["resources"]:
        docs.extend(d for d in _load_all(K8S / name) if d.get("kind") == kind)
    return docs


def _deployment() -> dict[str, Any]:
    (deployment,) = _resources("Deployment")
    return deployment


def _pod_spec() -> dict[str, Any]:
    return _deployment()["spec"]["template"]["spec"]


def _sidecar() -> dict[str, Any]:
    matches = [c for c in _pod_spec().get("initContainers", []) if c["name"] == SIDECAR_CONTAINER]
    assert len(matches) == 1, f"no initContainers entry named {SIDECAR_CONTAINER!r}"
    return matches[0]


def _generator(directory: Path, key: str, name: str) -> dict[str, Any]:
    matches = [g for g in _kustomization(directory).get(key, []) if g["name"] == name]
    assert len(matches) == 1, f"{directory}/kustomization.yaml: no {key} entry named {name!r}"
    return matches[0]


def _generated_file(generator: dict[str, Any], key: str) -> str:
    """The file behind ConfigMap/Secret key `key` (`files: [path]` or `files: [key=path]`)."""
    for item in generator["files"]:
        name, _, path = item.rpartition("=")
        if (name or PurePosixPath(path).name) == key:
            return path
    raise AssertionError(f"generator {generator['name']!r} has no key {key!r}")


def _sidecar_configs() -> dict[str, Path]:
    base = _generator(K8S, "configMapGenerator", "safety-monitor-config")
    pg = _generator(PG_COMPONENT, "secretGenerator", "safety-monitor-config")
    return {
        "sqlite": K8S / _generated_file(base, "sidecar.yaml"),
        "postgres": PG_COMPONENT / _generated_file(pg, "sidecar.yaml"),
    }


def _mount_for(path: str, mounts: list[dict[str, Any]]) -> dict[str, Any]:
    """The volumeMount a container path lies under (the deepest one)."""
    target = PurePosixPath(path)
    under = [
        m
        for m in mounts
        if target == PurePosixPath(m["mountPath"])
        or PurePosixPath(m["mountPath"]) in target.parents
    ]
    assert under, f"{path} lies under no volumeMount of the {SIDECAR_CONTAINER} container"
    return max(under, key=lambda m: len(m["mountPath"]))


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _final_stage() -> list[tuple[str, str]]:
    instructions = _dockerfile_instructions()
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


# ---------------------------------------------------------------------------------- parsing


def test_every_deploy_file_parses():
    yamls = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
    assert len(yamls) >= 8, yamls
    for path in yamls:
        try:
            docs = _load_all(path)
        except yaml.YAMLError as exc:
            pytest.fail(f"{path.relative_to(REPO_ROOT)}: {exc}")
        assert docs, f"{path}: empty"
    for path in DEPLOY.rglob("*.json"):
        json.loads(path.read_text())


@pytest.mark.parametrize("directory", [K8S, PG_COMPONENT], ids=["base", "postgres-audit"])
def test_kustomization_lists_files_that_exist(directory):
    doc = _kustomization(directory)
    listed = list(doc.get("resources", [])) + list(doc.get("components", []))
    for key in ("configMapGenerator", "secretGenerator"):
        for generator in doc.get(key, []):
            listed += [item.rpartition("=")[2] for item in generator.get("files", [])]
    listed += [p["path"] for p in doc.get("patches", []) if "path" in p]
    assert listed
    for item in listed:
        assert (directory / item).exists(), f"{directory}/kustomization.yaml lists missing {item}"
    # The component is offered (commented out) from the base: keep that pointer true.
    assert PG_COMPONENT.relative_to(K8S).as_posix() in (K8S / "kustomization.yaml").read_text()


def test_kustomize_builds_base_and_postgres_component(tmp_path):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: `kubectl kustomize` not run")
    built = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60
    )
    assert built.returncode == 0, built.stderr
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(built.stdout) if d)
    assert kinds == [
        "ConfigMap",
        "ConfigMap",
        "ConfigMap",
        "Deployment",
        "PersistentVolumeClaim",
        "PersistentVolumeClaim",
        "PodMonitor",
        "Service",
    ]
    # With the component enabled the config is a Secret and the SQLite volume is gone.
    copy_dir = tmp_path / "kubernetes"
    shutil.copytree(K8S, copy_dir)
    kustomization = _kustomization(copy_dir)
    kustomization["components"] = [PG_COMPONENT.relative_to(K8S).as_posix()]
    (copy_dir / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    built = subprocess.run(
        [kubectl, "kustomize", str(copy_dir)], capture_output=True, text=True, timeout=60
    )
    assert built.returncode == 0, built.stderr
    docs = [d for d in yaml.safe_load_all(built.stdout) if d]
    names = {(d["kind"], d["metadata"]["name"].rsplit("-", 1)[0]) for d in docs}
    assert ("Secret", "safety-monitor-config") in names
    assert ("ConfigMap", "safety-monitor-config") not in names
    assert not any(d["metadata"]["name"] == "safety-monitor-audit" for d in docs)
    (deployment,) = (d for d in docs if d["kind"] == "Deployment")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert set(volumes["config"]) == {"name", "secret"}
    assert "persistentVolumeClaim" not in volumes["audit"]


# ---------------------------------------------------------------------------- sidecar config


@pytest.mark.parametrize("variant", ["sqlite", "postgres"])
def test_configmap_sidecar_yaml_passes_config_validation(variant, tmp_path):
    path = _sidecar_configs()[variant]
    raw = yaml.safe_load(path.read_text())
    mounts = _sidecar()["volumeMounts"]
    rules_keys = [
        PurePosixPath(item.rpartition("=")[2]).name
        for item in _generator(K8S, "configMapGenerator", "safety-monitor-rules")["files"]
    ]

    # Absolute container paths move under tmp_path, each created as the volumes would provide.
    def local(container_path: str) -> Path:
        return tmp_path / PurePosixPath(container_path).relative_to("/")

    rewritten = copy.deepcopy(raw)
    packs = [raw["packs"]] if isinstance(raw["packs"], str) else raw["packs"]
    rewritten["packs"] = []
    for pack in packs:
        assert PurePosixPath(pack).is_absolute(), f"{path}: packs: {pack} is not absolute"
        mount = _mount_for(pack, mounts)
        assert mount["name"] == "packs" and mount.get("readOnly"), mount
        local(pack).parent.mkdir(parents=True, exist_ok=True)
        local(pack).write_bytes(b"pack")
        rewritten["packs"].append(str(local(pack)))
    rules = [raw["rules"]] if isinstance(raw["rules"], str) else raw["rules"]
    rewritten["rules"] = []
    for rules_dir in rules:
        mount = _mount_for(rules_dir, mounts)
        assert mount["name"] == "rules" and "subPath" not in mount, (
            "rules must be a directory mount (no subPath) so that edits reach the sidecar"
        )
        local(rules_dir).mkdir(parents=True, exist_ok=True)
        for key in rules_keys:
            (local(rules_dir) / key).write_text("rules: []\n")
        rewritten["rules"].append(str(local(rules_dir)))
    url = raw["audit"]["url"]
    if variant == "sqlite":
        db = url.removeprefix("sqlite:///")
        assert url.startswith("sqlite:///") and PurePosixPath(db).is_absolute(), url
        mount = _mount_for(db, mounts)
        assert not mount.get("readOnly"), f"the audit store {db} is on a read-only mount"
        volume = {v["name"]: v for v in _pod_spec()["volumes"]}[mount["name"]]
        assert "persistentVolumeClaim" in volume, "a SQLite audit trail on an emptyDir is lost"
        local(db).parent.mkdir(parents=True, exist_ok=True)
        rewritten["audit"]["url"] = f"sqlite:///{local(db)}"
    else:
        assert url.startswith("postgresql://"), url

    config = parse_config(rewritten, base_dir=tmp_path, origin=str(path))

    assert config.listen == f"0.0.0.0:{GRPC_PORT}"
    assert config.metrics_port == METRICS_PORT
    assert config.metrics_bind_host == "0.0.0.0"
    assert config.rules_reload_seconds > 0
    grace = _pod_spec()["terminationGracePeriodSeconds"]
    assert config.shutdown_grace_seconds < grace
    assert set(raw) <= {f.name for f in SidecarConfig.__dataclass_fields__.values()}


def test_postgres_config_differs_from_the_configmap_only_in_audit_url():
    configs = {k: yaml.safe_load(p.read_text()) for k, p in _sidecar_configs().items()}
    for config in configs.values():
        config["audit"].pop("url")
    assert configs["sqlite"] == configs["postgres"]


def test_deploy_rules_are_the_repository_rules():
    generator = _generator(K8S, "configMapGenerator", "safety-monitor-rules")
    copies = {PurePosixPath(item.rpartition("=")[2]) for item in generator["files"]}
    shipped = sorted(p.name for p in (REPO_ROOT / "rules").glob("*.yaml"))
    assert sorted(p.name for p in copies) == shipped
    for relative in copies:
        original = REPO_ROOT / "rules" / relative.name
        assert (K8S / relative).read_bytes() == original.read_bytes(), (
            f"deploy/kubernetes/{relative} differs from rules/{relative.name}: "
            f"cp rules/{relative.name} deploy/kubernetes/{relative}"
        )


# ------------------------------------------------------------------------------- deployment


def test_safety_monitor_is_a_native_sidecar_of_the_model_server():
    spec = _pod_spec()
    sidecar = _sidecar()
    assert sidecar.get("restartPolicy") == "Always"
    # The model server is a regular container and reaches the sidecar over loopback.
    assert spec["containers"], "no model server container"
    assert all(c["name"] != SIDECAR_CONTAINER for c in spec["containers"])
    env = {e["name"]: e.get("value") for c in spec["containers"] for e in c.get("env", [])}
    assert f"127.0.0.1:{GRPC_PORT}" in env.values()
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert ports == {"grpc": GRPC_PORT, "metrics": METRICS_PORT}
    image = sidecar["image"].rpartition(":")[0]
    assert image in {i["name"] for i in _kustomization(K8S).get("images", [])}


def test_probes_are_grpc_health_checks_on_the_grpc_port():
    from monitor.sidecar.process import AUDIT_HEALTH_SERVICE
    from monitor.wire import SERVICE_NAME

    served = {"", SERVICE_NAME, AUDIT_HEALTH_SERVICE}
    sidecar = _sidecar()
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert probe in sidecar, f"{probe} missing"
        grpc = sidecar[probe].get("grpc")
        assert grpc, f"{probe} is not a gRPC probe"
        assert grpc["port"] == GRPC_PORT
        assert grpc.get("service", "") in served, f"{probe}: unknown service {grpc['service']!r}"
    # An audit store outage must not take the model out of its Service.
    assert sidecar["readinessProbe"]["grpc"].get("service") == SERVICE_NAME


def test_sidecar_runs_non_root_with_a_read_only_root_filesystem_and_resources():
    sidecar = _sidecar()
    pod = _pod_spec()["securityContext"]
    ctx = sidecar["securityContext"]
    assert ctx["runAsNonRoot"] is True and pod["runAsNonRoot"] is True
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"]["drop"] == ["ALL"]
    assert ctx["runAsUser"] != 0
    # The image's USER is the same numeric uid, so files the image owns line up.
    (user,) = [rest for word, rest in _final_stage() if word == "USER"]
    assert user.split(":")[0] == str(ctx["runAsUser"])
    resources = sidecar["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"]
    assert resources["limits"]["memory"]
    # A read-only root needs a writable /tmp.
    tmp = _mount_for("/tmp", sidecar["volumeMounts"])
    volume = {v["name"]: v for v in _pod_spec()["volumes"]}[tmp["name"]]
    assert "emptyDir" in volume


def test_volumes_mounts_and_claims_line_up():
    spec = _pod_spec()
    volumes = {v["name"]: v for v in spec["volumes"]}
    for container in [*spec.get("initContainers", []), *spec["containers"]]:
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in volumes, f"{container['name']}: no volume {mount['name']!r}"
    claims = {d["metadata"]["name"] for d in _resources("PersistentVolumeClaim")}
    config_maps = {g["name"] for g in _kustomization(K8S)["configMapGenerator"]}
    for volume in volumes.values():
        if "persistentVolumeClaim" in volume:
            assert volume["persistentVolumeClaim"]["claimName"] in claims
        if "configMap" in volume:
            assert volume["configMap"]["name"] in config_maps


def test_image_cmd_reads_the_mounted_config():
    stage = _final_stage()
    (entrypoint,) = [json.loads(rest) for word, rest in stage if word == "ENTRYPOINT"]
    (cmd,) = [json.loads(rest) for word, rest in stage if word == "CMD"]
    assert entrypoint == ["safety-monitor"]
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "safety-monitor" in scripts
    assert cmd[:2] == ["serve", "--config"]
    config_path = cmd[2]
    mount = _mount_for(config_path, _sidecar()["volumeMounts"])
    assert mount["name"] == "config"
    assert mount["mountPath"] == config_path and mount["subPath"] == "sidecar.yaml"
    exposed = {
        int(p.split("/")[0]) for word, rest in stage if word == "EXPOSE" for p in rest.split()
    }
    assert exposed == {GRPC_PORT, METRICS_PORT, REVIEW_PORT}
    # COPY sources (from the build context, not other stages) exist in the repository.
    for word, rest in _dockerfile_instructions():
        if word == "COPY" and "--from" not in rest:
            for source in shlex.split(rest)[:-1]:
                assert (REPO_ROOT / source).exists(), f"Dockerfile copies missing {source}"


def test_podmonitor_scrapes_the_metrics_port_as_job_safety_monitor():
    (monitor,) = _resources("PodMonitor")
    labels = _deployment()["spec"]["template"]["metadata"]["labels"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items(), "the PodMonitor selects no pod of the Deployment"
    endpoints = {e["port"]: e for e in monitor["spec"]["podMetricsEndpoints"]}
    assert "metrics" in endpoints
    jobs = [
        r["replacement"]
        for r in endpoints["metrics"].get("relabelings", [])
        if r.get("targetLabel") == "job"
    ]
    assert jobs == ["safety-monitor"]
    # Every named port scraped exists on some container of the pod.
    spec = _pod_spec()
    ports = {p["name"] for c in [*spec["initContainers"], *spec["containers"]] for p in c["ports"]}
    assert set(endpoints) <= ports


# ---------------------------------------------------------------------- metric names in use


class _FakeClient:
    """Just enough of a CaptureClient for the capture collector to list its labels."""

    target = "127.0.0.1:50051"
    queue_depth = 0
    relay_encoder = "ready"  # a client whose relay encodes lists that gauge too

    def __init__(self) -> None:
        self.stats = SimpleNamespace(
            steps_captured=0,
            batches_sent=0,
            batches_acked=0,
            batches_rejected=0,
            reconnects=0,
            messages_sent=0,
            dropped={"queue_full": 0},
        )


def _registered_metrics() -> dict[str, set[str]]:
    """Every series name the code exposes -> its label names (histograms add `le`)."""
    metrics = SidecarMetrics()
    series: dict[str, set[str]] = {}
    wrappers = [m for m in vars(metrics).values() if hasattr(m, "_labelnames")]
    for wrapper in wrappers:
        (family,) = wrapper.describe()
        labels = set(wrapper._labelnames)
        suffixes = {
            "counter": ["_total"],
            "gauge": [""],
            "histogram": ["_bucket", "_sum", "_count"],
            "summary": ["", "_sum", "_count"],
            "info": ["_info"],
        }[family.type]
        for suffix in suffixes:
            series[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    for sample in (s for f in metrics.registry.collect() for s in f.samples):
        if not sample.name.endswith("_created"):
            series.setdefault(sample.name, set()).update(sample.labels)
    assert "safety_monitor_build_info" in series and "safety_monitor_tokens_total" in series

    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    client = _FakeClient()
    register_client(client, registry)  # type: ignore[arg-type]
    for family in registry.collect():
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    assert "safety_monitor_capture_dropped_total" in series
    return series


_METRIC = re.compile(r"\bsafety_monitor_[a-z0-9_]+\b")
_SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")


def _check_expr(expr: str, known: dict[str, set[str]], where: str) -> set[str]:
    """Metric names in a PromQL expression; fails on an unknown metric or label."""
    names = set(_METRIC.findall(expr))
    unknown = names - set(known)
    assert not unknown, f"{where}: unknown metrics {sorted(unknown)} in {expr!r}"
    allowed = set(TARGET_LABELS)
    for name in names:
        allowed |= known[name]
    for metric, matchers in _SELECTOR.findall(expr):
        labels = set(_MATCHER.findall(matchers))
        own = known.get(metric, set()) | TARGET_LABELS
        assert labels <= own, f"{where}: {metric} has no label {sorted(labels - own)}"
    for group in _GROUPING.findall(expr):
        labels = {label.strip() for label in group.split(",") if label.strip()}
        assert labels <= allowed, f"{where}: no metric here has labels {sorted(labels - allowed)}"
    return names


def _rule_exprs() -> list[tuple[str, str]]:
    (doc,) = _load_all(PROM_RULES)
    return [
        (rule.get("alert") or rule["record"], rule["expr"])
        for group in doc["groups"]
        for rule in group["rules"]
    ]


def _dashboard_exprs() -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            where = node.get("title") or node.get("name") or where
            for key, value in node.items():
                if key in ("expr", "definition") and isinstance(value, str):
                    found.append((where, value))
                else:
                    walk(value, where)
        elif isinstance(node, list):
            for item in node:
                walk(item, where)

    walk(json.loads(DASHBOARD.read_text()), "dashboard")
    return found


def test_prometheus_rules_use_only_registered_metrics():
    known = _registered_metrics()
    used: set[str] = set()
    for alert, expr in _rule_exprs():
        used |= _check_expr(expr, known, f"{PROM_RULES.name}: {alert}")
    assert any(re.search(r'\bup\{job="safety-monitor"\}', e) for _, e in _rule_exprs())
    expected = {
        "safety_monitor_batches_rejected_total",
        "safety_monitor_position_gaps_total",
        "safety_monitor_audit_writes_total",
        "safety_monitor_alertmanager_sends_total",
        "safety_monitor_alerts_withheld_total",
        "safety_monitor_batch_seconds_bucket",
        "safety_monitor_capture_dropped_total",
    }
    assert expected <= used, f"no alert on {sorted(expected - used)}"
    # The unit tests feed series the code really exposes.
    (tests,) = _load_all(PROM_TESTS)
    for test in tests["tests"]:
        for series in test.get("input_series", []):
            _check_expr(series["series"], known, f"{PROM_TESTS.name}: {test['name']}")


def test_grafana_dashboard_uses_only_registered_metrics():
    known = _registered_metrics()
    used: set[str] = set()
    exprs = _dashboard_exprs()
    assert len(exprs) > 20
    for title, expr in exprs:
        used |= _check_expr(expr, known, f"{DASHBOARD.name}: {title}")
    expected = {
        "safety_monitor_tokens_total",
        "safety_monitor_alerts_total",
        "safety_monitor_batches_rejected_total",
        "safety_monitor_encode_seconds_bucket",
        "safety_monitor_rules_seconds_bucket",
        "safety_monitor_batch_seconds_bucket",
        "safety_monitor_active_streams",
        "safety_monitor_conversations",
        "safety_monitor_audit_writes_total",
        "safety_monitor_capture_dropped_total",
    }
    assert expected <= used, f"no panel shows {sorted(expected - used)}"
    # Every panel target has a refId and a datasource; panel ids are unique.
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            assert target["refId"] and target["datasource"]


# ---------------------------------------------------------------------------------- promtool


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        message = (
            "promtool not found: install Debian's `prometheus` package (apt-get install "
            "prometheus), or set SAFETY_MONITOR_SKIP_PROMTOOL=1 to skip the promtool checks"
        )
        if os.environ.get("SAFETY_MONITOR_SKIP_PROMTOOL") == "1":
            pytest.skip(message)
        pytest.fail(message)
    return path


def _run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_promtool(), *args],
        capture_output=True,
        text=True,
        cwd=PROM_RULES.parent,
        timeout=120,
    )


def test_promtool_check_rules():
    result = _run_promtool("check", "rules", PROM_RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_test_rules():
    result = _run_promtool("test", "rules", PROM_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    # Every alert has a unit test.
    (tests,) = _load_all(PROM_TESTS)
    tested = {case["alertname"] for t in tests["tests"] for case in t.get("alert_rule_test", [])}
    alerts = {name for name, _ in _rule_exprs()}
    assert alerts <= tested, f"alerts without a promtool test: {sorted(alerts - tested)}"


def test_promtool_parses_the_dashboard_queries(tmp_path):
    """Each dashboard query, with Grafana's variables filled in, as a recording rule."""
    substitutions = {
        "$__rate_interval": "5m",
        "$__range": "6h",
        "$namespace": ".*",
        "$pod": ".*",
    }
    rules = []
    for i, (title, expr) in enumerate(_dashboard_exprs()):
        if expr.startswith("label_values("):
            expr = expr.removeprefix("label_values(").rsplit(",", 1)[0]
        for variable, value in substitutions.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"{title}: unknown Grafana variable in {expr!r}"
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = _run_promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
