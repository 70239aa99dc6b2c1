"""Feature names and descriptions for the review page, from feature packs' metadata.

Only the safetensors header is read (no tensors, no torch): the review process stays small.
The header layout is the pack format's (`monitor/features/pack.py`, key `safety_monitor.pack`);
tests build a real pack and check this reader against it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PACK_METADATA_KEY = "safety_monitor.pack"  # = monitor.features.pack.METADATA_KEY
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit on the header
_FIELDS = ("description", "category", "label", "hook_point", "source", "neuronpedia_id")


class PackMetadataError(ValueError):
    """A pack file whose header cannot be read."""


def read_pack_features(path: Path) -> dict[str, dict[str, str]]:
    """`'<pack>/<feature>'` -> its metadata (description, category, label, ...)."""
    try:
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size <= MAX_HEADER_BYTES:
                raise PackMetadataError(f"{path}: not a safetensors file")
            header = json.loads(f.read(size))
    except (OSError, ValueError) as exc:
        raise PackMetadataError(f"{path}: cannot read pack header: {exc}") from exc
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    try:
        document = json.loads((metadata or {})[PACK_METADATA_KEY])
        name = str(document["name"])
        hook_points = document["hook_points"]
    except (KeyError, TypeError, ValueError) as exc:
        raise PackMetadataError(f"{path}: not a safety-monitor pack ({exc})") from exc
    out: dict[str, dict[str, str]] = {}
    for entry in hook_points.values():
        for feature in entry.get("features", []):
            info: dict[str, Any] = feature if isinstance(feature, dict) else {}
            fname = str(info.get("name", ""))
            if fname:
                out[f"{name}/{fname}"] = {k: str(info.get(k) or "") for k in _FIELDS}
    return out


def read_all(paths: Sequence[Path]) -> dict[str, dict[str, str]]:
    """The union over several packs (a later pack wins on the same qualified name)."""
    out: dict[str, dict[str, str]] = {}
    for path in paths:
        out.update(read_pack_features(path))
    return out
