"""Process-wide structlog set-up (sidecar, relay, CLI, demo, bench): JSON lines in production, a
readable console on a TTY."""

from __future__ import annotations

import logging
import sys
from typing import Literal, TextIO

import structlog

from monitor.escape import escape_text

LogFormat = Literal["auto", "json", "console"]


def _escaped(value: object) -> object:
    if isinstance(value, str):
        return escape_text(value)
    if isinstance(value, list | tuple):
        return [_escaped(item) for item in value]
    if isinstance(value, dict):
        return {_escaped(k): _escaped(v) for k, v in value.items()}
    return value


def escape_control_characters(
    logger: object, method: str, event: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """Conversation ids, models and rule output come from clients: never let them carry
    terminal escape sequences (C0 and C1), forged lines (newlines), bidi overrides or
    invisible characters to an operator's console. Nested lists and mappings too."""
    return {str(_escaped(key)): _escaped(value) for key, value in event.items()}


class _CurrentStderr:
    """Writes to whatever `sys.stderr` is when a line is written, not the object it was when
    logging was configured. Loggers are cached on first use, so a stream bound at configure
    time outlives any replacement of `sys.stderr`: when the CLI runs inside another program
    (a test's captured stderr, an embedding application) and that stream is later closed,
    every cached logger would raise "I/O operation on closed file" from then on."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


def configure_logging(
    log_format: LogFormat = "auto", level: str = "info", stream: TextIO | None = None
) -> None:
    """Configure structlog once for the process. Logs go to `stream`, by default to whatever
    `sys.stderr` is when each line is written."""
    stream = stream if stream is not None else _CurrentStderr()  # type: ignore[assignment]
    use_json = log_format == "json" or (log_format == "auto" and not stream.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]
    # Libraries log through the standard library (psycopg: "error ignored in rollback ..."):
    # their lines go through the same processors, so the JSON log stays JSON, escaped.
    handler = logging.StreamHandler(stream)  # type: ignore[arg-type]
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                escape_control_characters,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.getLevelNamesMapping()[level.upper()])
    structlog.configure(
        processors=[*shared, escape_control_characters, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=stream),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
