"""Where a transformers model keeps its decoder layers: the layer list whose layer ``i`` is hook
point ``layers.<i>`` (`monitor.hookpoints`). Used by the capture client to hook layers and by
probe fitting to read them, so both find the same modules. torch is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

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
