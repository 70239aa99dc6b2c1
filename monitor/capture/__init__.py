"""Capture client: hooks a transformers model in the serving process and streams activations.

Names are imported on first use, so the relay process (`monitor.capture.relay`) starts
without torch or transformers."""

from typing import Any

_EXPORTS = {
    "CaptureClient": "monitor.capture.client",
    "ReceivedAlert": "monitor.capture.client",
    "LayerNotFoundError": "monitor.capture.layers",
    "find_layer_list": "monitor.capture.layers",
    "select_layers": "monitor.capture.layers",
    "CaptureStats": "monitor.capture.steps",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'monitor.capture' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
