"""Find a transformers model's decoder layers, so users name layers by index only.

Hook point names are canonical: `layers.<i>` is the output of decoder layer i, whatever the
family's module path, so a feature pack and a capture client agree without translation.
"""

from __future__ import annotations

from torch import nn

from monitor.hookpoints import hook_point_name

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


class LayerNotFoundError(ValueError):
    """The model's layer list or a requested layer index could not be found."""


def find_layer_list(model: nn.Module, module_path: str | None = None) -> nn.ModuleList:
    """The model's decoder layers, at `module_path` if given, else by the known paths."""
    paths = (module_path,) if module_path else LAYER_LIST_PATHS
    for path in paths:
        module = _get_path(model, path)
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return module
    candidates = [
        name for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0
    ]
    where = f"at {module_path!r}" if module_path else "at any known path"
    raise LayerNotFoundError(
        f"{type(model).__name__}: no decoder layer list {where}; ModuleLists found: "
        f"{', '.join(candidates) or 'none'} (pass layer_path='...' to name one)"
    )


def select_layers(
    model: nn.Module, indices: list[int], module_path: str | None = None
) -> dict[str, nn.Module]:
    """Map canonical hook point names to the layer modules for `indices`."""
    layer_list = find_layer_list(model, module_path)
    if not indices:
        raise LayerNotFoundError("layers: at least one layer index is required")
    selected: dict[str, nn.Module] = {}
    for index in indices:
        if not -len(layer_list) <= index < len(layer_list):
            raise LayerNotFoundError(
                f"layers: index {index} out of range; {type(model).__name__} has "
                f"{len(layer_list)} layers (0..{len(layer_list) - 1})"
            )
        canonical = index % len(layer_list)
        selected[hook_point_name(canonical)] = layer_list[canonical]
    return selected


def _get_path(root: nn.Module, path: str) -> nn.Module | None:
    module: object = root
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module if isinstance(module, nn.Module) else None
