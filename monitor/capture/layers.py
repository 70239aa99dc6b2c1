"""Find a transformers model's decoder layers, so users name layers by index only.

Hook point names are canonical: `layers.<i>` is the output of decoder layer i, whatever the
family's module path, so a feature pack and a capture client agree without translation.
"""

from __future__ import annotations

from torch import nn

from monitor import layerlist
from monitor.hookpoints import hook_point_name


class LayerNotFoundError(ValueError):
    """The model's layer list or a requested layer index could not be found."""


def find_layer_list(model: nn.Module, module_path: str | None = None) -> nn.ModuleList:
    """The model's decoder layers, at `module_path` if given, else by the known paths."""
    found = layerlist.layer_list(model, module_path)
    if found is not None:
        return found
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
