"""Sidecar configuration and start-up errors: one clear line, exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from monitor.sidecar.config import ConfigError, Limits, load_config
from tests.conftest import REPO_ROOT, build_pack_with_cli


def _serve(config_path):
    return subprocess.run(
        [sys.executable, "-m", "monitor.cli", "serve", "--config", str(config_path)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )


def test_valid_config_resolves_paths_relative_to_the_file(tmp_path):
    (tmp_path / "p.safetensors").write_bytes(b"x")
    (tmp_path / "rules").mkdir()
    path = tmp_path / "sidecar.yaml"
    path.write_text(
        "listen: 0.0.0.0:7000\nmetrics_port: 9100\npacks: [p.safetensors]\nrules: rules\n"
        "limits: {max_rows_per_batch: 32}\nsingle_thread_rows: 0\n"
    )
    config = load_config(path)
    assert config.single_thread_rows == 0
    assert config.listen == "0.0.0.0:7000"
    assert config.metrics_port == 9100
    assert config.packs == ((tmp_path / "p.safetensors").resolve(),)
    assert config.rules == ((tmp_path / "rules").resolve(),)
    assert config.limits == Limits(max_rows_per_batch=32)
    assert config.metrics_bind_host == "0.0.0.0"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("packs: [p]\nlisen: 1:2\n", "lisen: unknown key"),
        ("packs: [p]\nlisten: nowhere\n", "listen: expected 'host:port'"),
        ("packs: [p]\nlisten: 'h:99999'\n", "listen: port must be 0-65535"),
        ("packs: [p]\nmetrics_port: yes\n", "metrics_port: expected an integer"),
        ("packs: [missing.safetensors]\n", "packs: missing.safetensors: no such file"),
        ("packs: [p]\nrules: [nope.yaml]\n", "rules: nope.yaml: no such file"),
        ("packs: [p]\nlimits: {max_rows: 3}\n", "limits.max_rows: unknown key"),
        ("packs: [p]\nlimits: {max_rows_per_batch: 0}\n", "limits.max_rows_per_batch"),
        ("packs: [p]\nlog_format: xml\n", "log_format: expected one of"),
        ("packs: [p]\nsingle_thread_rows: -1\n", "single_thread_rows: expected an integer"),
        ("listen: 'a:1'\n", "packs: at least one feature pack is required"),
        ("- just\n- a list\n", "expected a mapping"),
        ("packs: [p\n", "invalid YAML"),
    ],
)
def test_bad_config_is_one_located_line(tmp_path, text, message):
    (tmp_path / "p").write_bytes(b"x")
    path = tmp_path / "sidecar.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert str(raised.value).startswith(f"{path}: ")
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_serve_exits_2_with_one_line_on_bad_config(tmp_path):
    path = tmp_path / "sidecar.yaml"
    path.write_text("packs: [missing.safetensors]\n")
    result = _serve(path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "packs: missing.safetensors: no such file" in result.stderr


def test_serve_exits_2_on_a_corrupt_pack(tmp_path):
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    path = tmp_path / "sidecar.yaml"
    path.write_text("packs: [broken.safetensors]\n")
    result = _serve(path)
    assert result.returncode == 2
    assert "broken.safetensors" in result.stderr
    assert result.stderr.strip().count("\n") == 0


def test_serve_exits_2_on_a_rule_naming_an_unknown_feature(tmp_path):
    pack = build_pack_with_cli(tmp_path, d_in=16, d_sae=32, hook_layer=0, features=[3, 17])
    (tmp_path / "rules.yaml").write_text(
        "features: {x: bars/18}\nrules:\n"
        "  - {rule: r, category: misuse, severity: info, condition: x > 1}\n"
    )
    path = tmp_path / "sidecar.yaml"
    path.write_text(f"packs: [{pack}]\nrules: [rules.yaml]\n")
    result = _serve(path)
    assert result.returncode == 2
    assert "rules.yaml:1:" in result.stderr
    assert "bars/18" in result.stderr
    assert result.stderr.strip().count("\n") == 0


def test_pack_build_rejects_bad_indices(tmp_path):
    from monitor.fixtures import write_layer_sae

    sae = write_layer_sae(tmp_path / "sae", 8, 16, 0, seed=0)
    for features, text in [("1,x", "--features"), ("1,99", "99"), ("2,2", "2")]:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "monitor.cli",
                "pack",
                "build",
                "--sae",
                str(sae),
                "--features",
                features,
                "--out",
                str(tmp_path / "p.safetensors"),
            ],
            capture_output=True,
            text=True,
            cwd=REPO_ROOT,
            timeout=120,
        )
        assert result.returncode == 2, features
        assert text in result.stderr, (features, result.stderr)
        assert not (tmp_path / "p.safetensors").exists()
