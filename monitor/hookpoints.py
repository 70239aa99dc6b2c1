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
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

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


# Module paths of the layer list, most common first. Wrappers such as *ForCausalLM put the
# base model under an attribute; we try each path from the top-level model.
LAYER_LIST_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2/3, Gemma2/3, Phi-3
    "model.language_model.layers",  # Gemma3 / multimodal wrappers
    "layers",  # a bare base model (LlamaModel)
    "transformer.h",  # GPT-2, GPT-J
    "h",
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.decoder.layers",  # OPT
    "encoder.layer",  # BERT-style encoders
    "bert.encoder.layer",
)


def layer_list(model: nn.Module, module_path: str | None = None) -> nn.ModuleList | None:
    """The model's decoder layers (a non-empty ModuleList), at `module_path` if given, else at
    the first of LAYER_LIST_PATHS that has them; None when there is none. Layer ``i`` of it
    is hook point ``layers.<i>``."""
    from torch import nn

    for path in (module_path,) if module_path else LAYER_LIST_PATHS:
        module = _get_path(model, path)
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return module
    return None


def _get_path(root: nn.Module, path: str) -> nn.Module | None:
    from torch import nn

    module: object = root
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module if isinstance(module, nn.Module) else None
