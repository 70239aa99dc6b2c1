"""Start a throwaway PostgreSQL server on 127.0.0.1 for tests.

PostgreSQL refuses to run as root; when the tests run as root (as in this project's container)
the server runs as the `postgres` OS user through runuser, with its data directory in a fresh
temporary directory owned by that user. Missing binaries fail loudly, unless
SAFETY_MONITOR_SKIP_PG=1 says to skip.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from monitor.fixtures import free_port

SKIP_ENV = "SAFETY_MONITOR_SKIP_PG"
START_TIMEOUT_S = 30


def _bin_dir() -> Path | None:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[4]))
    for directory in reversed(candidates):
        if Path(directory, "initdb").exists():
            return Path(directory)
    found = shutil.which("initdb")
    return Path(found).resolve().parent if found else None


@dataclass
class PgServer:
    data_dir: Path
    bin_dir: Path
    port: int
    user_prefix: list[str]

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        subprocess.run(
            [*self.user_prefix, *args], check=True, capture_output=True, timeout=START_TIMEOUT_S
        )

    def kill(self) -> None:
        """Stop the server at once (as a crash would), keeping its data for `restart`."""
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "immediate", "stop")

    def restart(self) -> None:
        """Start the server again on the same port and data after `kill`."""
        root = self.data_dir.parent
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {root} -c fsync=off"
        try:
            self._run(
                str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-o", options, "-w",
                "-t", str(START_TIMEOUT_S), "-l", str(root / "server.log"), "start",
            )  # fmt: skip
        except subprocess.CalledProcessError as exc:
            log = (root / "server.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"restart failed: {exc.stderr!r} {exc.stdout!r}\n{log}") from exc

    def stop(self) -> None:
        """Stop the server (if running) and delete its data."""
        try:
            self._run(
                str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "immediate", "stop"
            )
        except subprocess.CalledProcessError:
            pass  # already stopped by kill()
        finally:
            shutil.rmtree(self.data_dir.parent, ignore_errors=True)


def start_pg_server(port: int | None = None) -> PgServer:
    """Start a server, or fail (skip with SAFETY_MONITOR_SKIP_PG=1) when PostgreSQL is missing."""
    bin_dir = _bin_dir()
    if bin_dir is None:
        message = "PostgreSQL server binaries (initdb, pg_ctl) not found; install postgresql"
        if os.environ.get(SKIP_ENV) == "1":
            pytest.skip(f"{message} ({SKIP_ENV}=1)")
        pytest.fail(f"{message}, or set {SKIP_ENV}=1 to skip the PostgreSQL tests", pytrace=False)
    root = Path(tempfile.mkdtemp(prefix="safety-monitor-pg-"))  # not under pytest's 0700 tmp
    prefix: list[str] = []
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    server = PgServer(root / "data", bin_dir, port or free_port(), prefix)
    server._run(
        str(bin_dir / "initdb"), "-D", str(server.data_dir), "-A", "trust", "-U", "postgres",
        "--no-sync", "-E", "UTF8",
    )  # fmt: skip
    options = f"-c listen_addresses=127.0.0.1 -p {server.port} -k {root} -c fsync=off"
    server._run(
        str(bin_dir / "pg_ctl"), "-D", str(server.data_dir), "-o", options, "-w",
        "-t", str(START_TIMEOUT_S), "-l", str(root / "server.log"), "start",
    )  # fmt: skip
    return server
