"""The vLLM benches' working directory: removed after a completed run, kept (and named) after a
failed one (monitor/bench/workdir.py)."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import pytest

from monitor.bench.workdir import ENV_KEEP, bench_workdir, engine_tmp_env, keep_workdir


def test_keep_rule() -> None:
    assert keep_workdir(None, {}) is False
    assert keep_workdir(None, {ENV_KEEP: ""}) is False
    assert keep_workdir(None, {ENV_KEEP: "0"}) is False
    assert keep_workdir(None, {ENV_KEEP: "1"}) is True
    # A failure keeps it whatever the environment says: its logs explain the failure.
    assert keep_workdir(RuntimeError("engine exited"), {}) is True
    assert keep_workdir(KeyboardInterrupt(), {ENV_KEEP: "0"}) is True


def test_completed_run_removes_its_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_KEEP, raising=False)
    out = io.StringIO()
    with bench_workdir("sm-test-workdir-", stream=out) as path:
        (path / "sidecar.log").write_text("log")
        (path / "compiled").mkdir()
        (path / "compiled" / "off.log").write_text("log")
        assert path.parent == Path(tempfile.gettempdir())
    assert not path.exists()
    assert out.getvalue() == ""


def test_failed_run_keeps_its_directory_and_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_KEEP, raising=False)
    out = io.StringIO()
    with (
        pytest.raises(RuntimeError, match="engine exited"),
        bench_workdir("sm-test-workdir-", stream=out) as path,
    ):
        (path / "sidecar.log").write_text("the sidecar's last words")
        raise RuntimeError("engine exited")
    try:
        assert (path / "sidecar.log").read_text() == "the sidecar's last words"
        assert str(path) in out.getvalue() and "failed" in out.getvalue()
    finally:
        for child in path.iterdir():
            child.unlink()
        path.rmdir()


def test_keep_env_keeps_a_completed_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_KEEP, "1")
    out = io.StringIO()
    with bench_workdir("sm-test-workdir-", stream=out) as path:
        pass
    try:
        assert path.is_dir()
        assert str(path) in out.getvalue() and ENV_KEEP in out.getvalue()
    finally:
        path.rmdir()


def test_engine_tmp_env_points_vllm_into_the_workdir(tmp_path: Path) -> None:
    env = engine_tmp_env(tmp_path, {})
    assert env["TMPDIR"] == env["VLLM_RPC_BASE_PATH"] == str(tmp_path / "tmp")
    assert (tmp_path / "tmp").is_dir()
    # The inductor cache stays where torch keeps it without the TMPDIR change (reused by the
    # next run), unless the user chose one.
    cache = env["TORCHINDUCTOR_CACHE_DIR"]
    assert Path(cache).parent == Path(tempfile.gettempdir())
    assert Path(cache).name.startswith("torchinductor_")
    assert "TORCHINDUCTOR_CACHE_DIR" not in engine_tmp_env(
        tmp_path, {"TORCHINDUCTOR_CACHE_DIR": "/somewhere"}
    )
    assert os.environ.get("TMPDIR") != env["TMPDIR"]  # the bench's own process is untouched
