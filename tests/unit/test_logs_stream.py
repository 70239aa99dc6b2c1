"""Logging follows the current stderr: a stream that was stderr when logging was configured
may be closed later (the CLI run inside a test's captured output, or inside another program)."""

from __future__ import annotations

import io
import json
import sys

import structlog

from monitor.logs import configure_logging


def test_cached_loggers_write_to_the_current_stderr_after_the_old_one_is_closed() -> None:
    saved, saved_config = sys.stderr, structlog.get_config()
    first, second = io.StringIO(), io.StringIO()
    try:
        sys.stderr = first
        configure_logging("json", "info")
        log = structlog.get_logger("test.logs.stream")
        log.warning("one")  # cached now, while `first` is stderr
        sys.stderr = second
        first.close()
        log.warning("two")  # raised "I/O operation on closed file" when `first` was bound
    finally:
        sys.stderr = saved
        structlog.configure(**saved_config)
    assert json.loads(second.getvalue())["event"] == "two"
