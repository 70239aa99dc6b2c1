"""Shared pytest fixtures and markers. The builders themselves (tiny models, synthetic SAEs,
the sidecar launcher) are in `monitor.fixtures`, shared with the demo and the benches.

Tests under tests/unit/ are marked `unit` (no servers, mostly in-process); tests under
tests/integration/ are marked `integration` (real sidecar processes, gRPC, databases,
browsers). `make test-fast` runs `-m unit`."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

from monitor.fixtures import SidecarProcess, start_sidecar, write_layer_sae

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTS_DIR = Path(__file__).resolve().parent


def load_script(name: str) -> Iterator[ModuleType]:
    """`scripts/<name>.py` imported as a module for a fixture to yield (the scripts are not a
    package), registered in `sys.modules` while it is in use (dataclasses look it up there)
    and removed after. Usage: `yield from load_script("pool_vllm_rounds")`."""
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)


@pytest.fixture
def sidecar_factory(tmp_path: Path) -> Iterator[Callable[[dict], SidecarProcess]]:
    started: list[SidecarProcess] = []

    def factory(config: dict) -> SidecarProcess:
        sidecar = start_sidecar(config, tmp_path, cwd=REPO_ROOT)
        started.append(sidecar)
        return sidecar

    yield factory
    for sidecar in started:
        if sidecar.process.poll() is None:
            sidecar.process.kill()
            sidecar.process.wait(10)


def build_pack_with_cli(
    tmp_path: Path,
    *,
    d_in: int,
    d_sae: int,
    hook_layer: int,
    features: list[int],
    name: str = "bars",
    seed: int = 5,
) -> Path:
    """Write a SAELens SAE and compile a pack from it with the real CLI."""
    sae_dir = write_layer_sae(tmp_path / f"{name}-sae", d_in, d_sae, hook_layer, seed=seed)
    out = tmp_path / f"{name}.pack.safetensors"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "monitor.cli",
            "pack",
            "build",
            "--sae",
            str(sae_dir),
            "--features",
            ",".join(map(str, features)),
            "--name",
            name,
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    """A real PostgreSQL server for the module (tests/pg_server.py), as a URL."""
    from tests.pg_server import start_pg_server

    server = start_pg_server()
    try:
        yield server.url
    finally:
        server.stop()


def pytest_configure(config: pytest.Config) -> None:
    """Plain JSON logs for code that runs inside the test process. structlog's default console
    renderer draws exceptions with rich, locals of every frame included: the grouping tests
    log an internal error per oversized step, and drawing those took minutes per test."""
    from monitor.logs import configure_logging

    configure_logging("json", "debug")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test by its folder, so `-m unit` / `-m integration` select them."""
    for item in items:
        parts = Path(str(item.fspath)).relative_to(TESTS_DIR).parts
        if parts[0] in ("unit", "integration"):
            item.add_marker(getattr(pytest.mark, parts[0]))
