"""A bench's working directory in /tmp: removed when the bench completes, kept when it fails.

The vLLM bench (`bench overhead --engine vllm`) and `scripts/vllm_plugin_step_cost.py` write
the sidecar's configuration and log, the engines' logs and (through `engine_tmp_env`) the
files vLLM and torch would otherwise leave in /tmp (`vllm_dist_*` file stores, uuid-named
ZeroMQ IPC sockets) into one directory. A run that completes removes it; a run that fails
keeps it and says where, since the sidecar's and the engines' logs are what explains the
failure. `SAFETY_MONITOR_KEEP_WORKDIR=1` keeps it after a run that completes too.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TextIO

ENV_KEEP = "SAFETY_MONITOR_KEEP_WORKDIR"


def keep_workdir(error: BaseException | None, env: Mapping[str, str] | None = None) -> bool:
    """Whether a bench's working directory stays after the bench: always after a failure
    (`error`: what ended it, an interrupt included, since its logs explain it), after a
    completed run only if `SAFETY_MONITOR_KEEP_WORKDIR` is set to something other than
    empty or 0."""
    if error is not None:
        return True
    value = (os.environ if env is None else env).get(ENV_KEEP, "").strip()
    return value not in ("", "0")


@contextlib.contextmanager
def bench_workdir(prefix: str, stream: TextIO | None = None) -> Iterator[Path]:
    """A fresh directory under the system's temporary directory for the block: removed when
    the block completes, kept (its path written to `stream`, stderr by default) when the
    block raises, and when `keep_workdir` says so."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    error: BaseException | None = None
    try:
        yield path
    except BaseException as exc:
        error = exc
        raise
    finally:
        if keep_workdir(error):
            why = "the run failed" if error is not None else f"{ENV_KEEP} is set"
            print(
                f"working directory kept ({why}; the sidecar's and engines' logs are there): "
                f"{path}",
                file=stream or sys.stderr,
                flush=True,
            )
        else:
            shutil.rmtree(path, ignore_errors=True)


def engine_tmp_env(workdir: Path, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for a vLLM engine whose temporary files belong in `workdir`: TMPDIR (vLLM's
    `vllm_dist_*` file store for torch.distributed and anything else from `tempfile`) and
    VLLM_RPC_BASE_PATH (its ZeroMQ IPC sockets, which default to the temporary directory). The
    torch inductor cache would follow TMPDIR and start every run cold, so unless the user set
    TORCHINDUCTOR_CACHE_DIR it stays where torch puts it by default (the same rule as torch's
    `default_cache_dir`), and compiled engines keep reusing it."""
    env = os.environ if env is None else env
    tmp = workdir / "tmp"
    tmp.mkdir(exist_ok=True)
    result = {"TMPDIR": str(tmp), "VLLM_RPC_BASE_PATH": str(tmp)}
    if not env.get("TORCHINDUCTOR_CACHE_DIR"):
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = f"uid_{os.getuid()}"
        user = re.sub(r'[\\/:*?"<>|]', "_", user)
        result["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
            tempfile.gettempdir(), f"torchinductor_{user}"
        )
    return result
