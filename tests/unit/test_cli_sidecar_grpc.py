"""`safety-monitor serve` runs gRPC's older server I/O path unless the user chose otherwise."""

from __future__ import annotations

import os
import subprocess
import sys

from monitor.cli import SIDECAR_GRPC_EXPERIMENTS, sidecar_grpc_environment

# A `serve` with a config that does not exist: main() fails on the config after it chose the
# gRPC settings; the child prints what its environment holds then and whether gRPC had been
# imported before main() ran (then the setting would come too late).
_CHILD = (
    "import os, sys\n"
    "from monitor import cli\n"
    "imported_early = 'grpc' in sys.modules\n"
    "code = cli.main(sys.argv[1:])\n"
    "print(imported_early, code, os.environ.get('GRPC_EXPERIMENTS', '<unset>'))\n"
)


def _run(args: list[str], environ: dict[str, str]) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, *args],
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return done.stdout.split()


def _environ(**extra: str) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    environ.update(extra)
    return environ


def test_serve_sets_the_experiments_before_grpc_is_imported() -> None:
    imported_early, code, value = _run(["serve", "--config", "/nonexistent.yaml"], _environ())
    assert imported_early == "False"
    assert code == "2"  # the config does not exist
    assert value == SIDECAR_GRPC_EXPERIMENTS


def test_a_users_own_setting_is_kept() -> None:
    out = _run(["serve", "--config", "/nonexistent.yaml"], _environ(GRPC_EXPERIMENTS="x"))
    assert out[-1] == "x"


def test_other_commands_leave_grpc_alone() -> None:
    out = _run(["rules", "check", "/nonexistent.yaml"], _environ())
    assert out[-1] == "<unset>"


def test_environment_helper() -> None:
    environ: dict[str, str] = {}
    sidecar_grpc_environment(environ)
    assert environ == {"GRPC_EXPERIMENTS": SIDECAR_GRPC_EXPERIMENTS}
    environ = {"GRPC_EXPERIMENTS": "-event_engine_client"}
    sidecar_grpc_environment(environ)
    assert environ == {"GRPC_EXPERIMENTS": "-event_engine_client"}
