"""Canonical hook point names.

A hook point is always ``layers.<i>``: the residual stream after decoder layer ``i``. SAE
libraries and model families spell it differently; mapping them here means a pack and a
capture client agree without the user translating.
"""

from __future__ import annotations

import re

from monitor.features.errors import FeatureError

_CANONICAL = re.compile(r"layers\.(\d+)")
# sparsify names modules under model.base_model; HF paths add one or two 'model.' prefixes.
_MODULE_PATH = re.compile(r"(?:(?:model|base_model)\.)*layers\.(\d+)")
# TransformerLens: resid_post of block i is the output of layer i.
_TL_RESID_POST = re.compile(r"blocks\.(\d+)\.hook_resid_post")
# TransformerLens: resid_pre of block i is the output of layer i-1 (block 0 reads embeddings).
_TL_RESID_PRE = re.compile(r"blocks\.(\d+)\.hook_resid_pre")


def canonical_hook_point(name: str) -> str:
    """Map a hook point name from any supported convention onto ``layers.<i>``."""
    if not isinstance(name, str):
        raise FeatureError(f"expected a string, got {type(name).__name__}", field="hook_point")
    for pattern in (_CANONICAL, _MODULE_PATH, _TL_RESID_POST):
        match = pattern.fullmatch(name)
        if match:
            return f"layers.{int(match.group(1))}"
    match = _TL_RESID_PRE.fullmatch(name)
    if match and int(match.group(1)) > 0:
        return f"layers.{int(match.group(1)) - 1}"
    raise FeatureError(
        f"{name!r} is not a residual-stream hook point "
        "(expected layers.<i>, model.layers.<i> or blocks.<i>.hook_resid_post)",
        field="hook_point",
    )
