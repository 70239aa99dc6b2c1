"""Safe readers shared by the SAE loaders: JSON configs, safetensors, npz and torch state dicts.

Every failure becomes an :class:`SAEFormatError` naming the file and the field. Nothing here
unpickles: npz loads with ``allow_pickle=False`` and ``.pt`` with ``weights_only=True``.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import torch

from monitor.features.errors import SAEFormatError


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`; SAEFormatError naming the file for anything else."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SAEFormatError("file not found", where=path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SAEFormatError(f"cannot read: {exc}", where=path) from exc
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SAEFormatError(f"invalid JSON: {exc}", where=path) from exc
    if not isinstance(cfg, dict):
        raise SAEFormatError("expected a JSON object at top level", where=path)
    return cfg


def read_safetensors(
    path: Path, names: list[str], optional: tuple[str, ...] = ()
) -> dict[str, torch.Tensor]:
    """Only the named tensors (a 1M-latent decoder would otherwise cost gigabytes)."""
    if not path.is_file():
        raise SAEFormatError("file not found", where=path)
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            present = set(handle.keys())
            missing = [name for name in names if name not in present]
            if missing:
                raise SAEFormatError("missing tensor", where=path, field=missing[0])
            wanted = [*names, *(n for n in optional if n in present)]
            return {name: handle.get_tensor(name) for name in wanted}
    except (safetensors.SafetensorError, OSError) as exc:
        raise SAEFormatError(f"corrupt or unreadable safetensors ({exc})", where=path) from exc


def read_npz(path: Path) -> dict[str, torch.Tensor]:
    """The arrays of an .npz file as tensors (pickles refused)."""
    if not path.is_file():
        raise SAEFormatError("file not found", where=path)
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: torch.from_numpy(np.array(data[name])) for name in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise SAEFormatError(f"corrupt or unreadable npz ({exc})", where=path) from exc


def read_state_dict(path: Path) -> dict[str, Any]:
    """A torch state dict loaded with `weights_only=True`: tensors and plain containers, never
    arbitrary pickled objects.
    """
    if not path.is_file():
        raise SAEFormatError("file not found", where=path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or pickled-object files
        raise SAEFormatError(
            f"corrupt or not a weights-only state dict ({exc})", where=path
        ) from exc
    if not isinstance(state, dict):
        raise SAEFormatError(f"expected a state dict, got {type(state).__name__}", where=path)
    return state


def take(tensors: dict[str, Any], name: str, shape: tuple[int, ...], path: Path) -> torch.Tensor:
    """``tensors[name]`` as finite float32 of ``shape``."""
    if name not in tensors:
        raise SAEFormatError("missing tensor", where=path, field=name)
    return check_tensor(tensors[name], shape, path, name)


def check_tensor(tensor: Any, shape: tuple[int, ...], path: Path, name: str) -> torch.Tensor:
    """`tensor` if it is a float tensor of `shape`, else SAEFormatError naming the file and key."""
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        kind = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise SAEFormatError(f"expected a float tensor, got {kind}", where=path, field=name)
    if tuple(tensor.shape) != shape:
        raise SAEFormatError(
            f"shape {list(tensor.shape)} does not match the config's sizes {list(shape)}",
            where=path,
            field=name,
        )
    tensor = tensor.float()
    if not torch.isfinite(tensor).all():
        raise SAEFormatError("contains NaN or Inf", where=path, field=name)
    return tensor


def positive_int(cfg: dict[str, Any], key: str, path: Path, field: str | None = None) -> int:
    """`cfg[key]` as a positive integer (a one-element integer tensor counts), else
    SAEFormatError."""
    if key not in cfg:
        raise SAEFormatError("missing", where=path, field=field or key)
    value = cfg[key]
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value)  # dictionary_learning keeps k as a buffer
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise SAEFormatError(
            f"expected a positive integer, got {value!r}", where=path, field=field or key
        )
    return value


def optional_str(cfg: dict[str, Any], key: str, path: Path, field: str | None = None) -> str | None:
    """`cfg[key]` when it is a string, None when absent, else SAEFormatError."""
    value = cfg.get(key)
    if value is not None and not isinstance(value, str):
        raise SAEFormatError(f"expected a string, got {value!r}", where=path, field=field or key)
    return value


def as_bool(cfg: dict[str, Any], key: str, path: Path, *, default: bool) -> bool:
    """`cfg[key]` as a boolean (`default` when absent), else SAEFormatError."""
    value = cfg.get(key, default)
    if not isinstance(value, bool):
        raise SAEFormatError(f"expected true or false, got {value!r}", where=path, field=key)
    return value
