"""Canonical hook point names, the one convention both sides use.

A hook point is always ``layers.<i>``: the residual stream after decoder layer ``i``. SAE
libraries and model families spell it differently; mapping them here means a pack and a
capture client agree without the user translating. The capture client names the layers it
hooks with `hook_point_name`; packs, SAE loaders and the sidecar read names through
`canonical_hook_point`.

    >>> hook_point_name(12)
    'layers.12'
    >>> canonical_hook_point("blocks.12.hook_resid_post")
    'layers.12'
"""

from __future__ import annotations

import re

_CANONICAL = re.compile(r"layers\.(\d+)")
# sparsify names modules under model.base_model; HF paths add one or two 'model.' prefixes.
_MODULE_PATH = re.compile(r"(?:(?:model|base_model)\.)*layers\.(\d+)")
# TransformerLens: resid_post of block i is the output of layer i.
_TL_RESID_POST = re.compile(r"blocks\.(\d+)\.hook_resid_post")
# TransformerLens: resid_pre of block i is the output of layer i-1 (block 0 reads embeddings).
_TL_RESID_PRE = re.compile(r"blocks\.(\d+)\.hook_resid_pre")


def hook_point_name(index: int) -> str:
    """The canonical name of the output of decoder layer ``index``: ``layers.<index>``."""
    return f"layers.{index}"


def canonical_hook_point(name: str) -> str:
    """Map a hook point name from any supported convention onto ``layers.<i>``.

    Raises `monitor.features.FeatureError` (field ``hook_point``) for anything else.
    """
    # Imported here so the capture side can use this module without loading features.
    from monitor.features.errors import FeatureError

    if not isinstance(name, str):
        raise FeatureError(f"expected a string, got {type(name).__name__}", field="hook_point")
    for pattern in (_CANONICAL, _MODULE_PATH, _TL_RESID_POST):
        match = pattern.fullmatch(name)
        if match:
            return hook_point_name(int(match.group(1)))
    match = _TL_RESID_PRE.fullmatch(name)
    if match and int(match.group(1)) > 0:
        return hook_point_name(int(match.group(1)) - 1)
    raise FeatureError(
        f"{name!r} is not a residual-stream hook point "
        "(expected layers.<i>, model.layers.<i> or blocks.<i>.hook_resid_post)",
        field="hook_point",
    )
