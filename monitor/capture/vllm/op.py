"""The capture point inside vLLM's compiled graph: a torch custom op.

Forward hooks are Python callbacks on `nn.Module.__call__`; vLLM compiles the model's forward
with torch.compile (and, on GPUs, replays it as CUDA graphs), so hooks registered on decoder
layers never run there. Instead the decoder layer class's `forward` is wrapped (before the
model is first compiled) so that chosen layers call `safety_monitor::capture_residual`:

    residual stream after layer i  =  hidden_states + residual   (what vLLM's Llama-style
                                                                  layers return)

The op writes that sum into a persistent `[max_num_tokens, hidden]` buffer registered on the
layer. Because it declares the buffer as mutated (`Tensor(a!)` in its schema), torch.compile
keeps it in the graph in program order (it cannot be dead-code eliminated or reordered past
the next write), and a CUDA graph records it as one more kernel writing to a fixed address:
replaying the graph refreshes the buffer with no Python involved. After the step, the worker
reads the first `num_tokens` rows (see worker.py). The fake (meta) implementation lets
Dynamo trace it without running it.

Eager mode runs the same op, so both modes capture identically.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

OP_NAME = "safety_monitor::capture_residual"
BUFFER_ATTR = "_safety_monitor_residual"
INDEX_ATTR = "_safety_monitor_layer"

_calls = 0  # how often the op's real implementation ran (tests: proof it ran when compiled)
_calls_lock = threading.Lock()


_MAX_VIEWS = 4096
# (buffer address, rows, columns, dtype) -> buffer[:rows]. Slicing a tensor costs more than the
# addition itself on a decode step; decode steps repeat a few token counts. A cached view keeps
# its buffer's memory alive, so no other buffer can appear at that address while it is cached.
_out_views: dict[tuple[int, int, int, torch.dtype], torch.Tensor] = {}


def capture_residual(hidden: torch.Tensor, residual: torch.Tensor, out: torch.Tensor) -> None:
    """out[:n] = hidden + residual, for the n tokens of this forward (at most out's rows)."""
    global _calls
    rows = hidden.shape[0]
    if rows > out.shape[0]:  # never in vLLM (the buffer holds max_num_tokens rows)
        rows = out.shape[0]
        hidden, residual = hidden[:rows], residual[:rows]
    key = (out.data_ptr(), rows, out.shape[1], out.dtype)
    target = _out_views.get(key)
    if target is None:
        if len(_out_views) >= _MAX_VIEWS:
            _out_views.clear()
        target = _out_views[key] = out[:rows]
    torch.add(hidden, residual, out=target)
    with _calls_lock:
        _calls += 1


# Registered with the low-level `torch.library.Library`, not `torch.library.custom_op`: the
# latter wraps the kernel in three Python layers (autograd, in-place/view bookkeeping, argument
# defaults) that cost several times the add itself on every forward; here the dispatcher's C++
# fallbacks do that bookkeeping (the version counter of `out`, declared mutated by `(a!)`) and
# only the kernel is Python. The op never needs a gradient (inference).
_library = torch.library.Library("safety_monitor", "DEF")
_library.define("capture_residual(Tensor hidden, Tensor residual, Tensor(a!) out) -> ()")
_library.impl("capture_residual", capture_residual, "CompositeExplicitAutograd")


@torch.library.register_fake(OP_NAME)
def _capture_residual_fake(hidden: torch.Tensor, residual: torch.Tensor, out: torch.Tensor) -> None:
    return None


def op_calls() -> int:
    """How many times the op's implementation has run in this process."""
    return _calls


def wrap_layer_class(layer_class: type[nn.Module]) -> None:
    """Wrap the class's forward once: layers carrying a capture buffer call the op on their
    output; every other instance runs exactly as before."""
    if getattr(layer_class.forward, "_safety_monitor_wrapped", False):
        return
    original: Callable[..., Any] = layer_class.forward

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        output = original(self, *args, **kwargs)
        buffer = getattr(self, BUFFER_ATTR, None)
        if buffer is not None:
            hidden, residual = output[0], output[1]
            if residual is None:  # a layer that returns the full stream in hidden_states
                residual = torch.zeros_like(hidden)
            torch.ops.safety_monitor.capture_residual(hidden, residual, buffer)
        return output

    forward._safety_monitor_wrapped = True  # type: ignore[attr-defined]
    forward.__wrapped__ = original  # type: ignore[attr-defined]
    forward.__doc__ = original.__doc__
    layer_class.forward = forward  # type: ignore[method-assign]


def attach_buffer(
    layer: nn.Module, index: int, rows: int, hidden: int, dtype: torch.dtype, device: Any
) -> torch.Tensor:
    """Give one decoder layer its persistent capture buffer (not part of the state dict)."""
    # An engine built again in this process attaches new buffers: drop the cached views,
    # which would otherwise keep the old engine's buffers alive for the life of the process.
    _out_views.clear()
    buffer = torch.zeros(rows, hidden, dtype=dtype, device=device)
    layer.register_buffer(BUFFER_ATTR, buffer, persistent=False)
    setattr(layer, INDEX_ATTR, index)
    wrap_layer_class(type(layer))
    return buffer
