"""Capture client: hooks a transformers model in the serving process and streams activations."""

from monitor.capture.client import CaptureClient, ReceivedAlert
from monitor.capture.layers import LayerNotFoundError, find_layer_list, select_layers
from monitor.capture.steps import CaptureStats

__all__ = [
    "CaptureClient",
    "CaptureStats",
    "LayerNotFoundError",
    "ReceivedAlert",
    "find_layer_list",
    "select_layers",
]
