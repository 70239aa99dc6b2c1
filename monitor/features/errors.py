"""Typed errors for SAE loading and feature packs.

Every message is one line that names the file (or pack) and the field, so an operator reading
a log or a CLI error knows what to fix without a traceback.
"""

from __future__ import annotations

from pathlib import Path


class FeatureError(ValueError):
    """Base error of the features package: ``str(e)`` is ``'<where>: <field>: <detail>'``."""

    def __init__(
        self, detail: str, *, where: str | Path | None = None, field: str | None = None
    ) -> None:
        self.where = None if where is None else str(where)
        self.field = field
        self.detail = detail
        parts = [p for p in (self.where, field, detail) if p]
        # Multi-line details (e.g. from a wrapped library error) would break log lines.
        super().__init__(" ".join(": ".join(parts).splitlines()))


class SAEFormatError(FeatureError):
    """An SAE on disk is missing, malformed, or uses an unsupported architecture."""


class PackError(FeatureError):
    """A feature pack is malformed, or cannot be read or written."""
