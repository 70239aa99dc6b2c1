"""One captured step as a ring frame, and back into a StepBatch on the relay's side.

    [FRAME_HEADER][meta: a StepBatch whose tensors carry dtype and shape but no data]
    [tensor bytes, each 64-byte aligned: the layers in order, then the feature blocks]

The metadata is the wire message itself, minus the bytes, so the relay adds the data and
never needs a schema of its own; the tensors are copied straight from the model's output into
shared memory (with the dtype conversion, if any, done by that one copy). This module's
relay half imports no torch.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING

from monitor.capture.ring import FRAME_HEADER, FrameKind, SharedRing, aligned
from monitor.wire.safety_monitor.v1 import monitor_pb2 as pb

if TYPE_CHECKING:
    import torch

    from monitor.capture.steps import CapturedStep

ITEMSIZE = {"BF16": 2, "FP16": 2, "FP32": 4}


class FrameTooLarge(Exception):
    """A step larger than the whole ring; it can never be sent."""


class FrameWriter:
    """The serving process's side: CapturedStep -> frame. One writer at a time (RelayLink
    holds a lock around it)."""

    def __init__(self, ring: SharedRing, doorbell: Callable[[], None] | None = None) -> None:
        self.ring = ring
        self.doorbell = doorbell
        # Metadata of recent steps by their tags: a decode step differs from the one before
        # only in rows and positions, and updating a few fields costs far less (in the
        # serving process, on the model's thread) than building the message again.
        self._templates: OrderedDict[Hashable, pb.StepBatch] = OrderedDict()

    def _metadata(
        self, step: CapturedStep, texts: list[list[str]] | None, tensors: list[_Tensor]
    ) -> bytes:
        key = None
        if step.tags_key is not None:
            key = (step.tags_key, tuple(step.layers), tuple(step.features))
            template = self._templates.get(key)
            if template is not None:
                _update(template, step, texts, tensors)
                return template.SerializeToString()
        batch = _describe(step, texts, tensors)
        if key is not None:
            self._templates[key] = batch
            if len(self._templates) > _TEMPLATES:
                self._templates.popitem(last=False)
        return batch.SerializeToString()

    def write(self, step: CapturedStep, texts: list[list[str]] | None) -> bool:
        """Publish the step; False when the ring has no room for it now."""
        tensors = _tensors(step)
        meta = self._metadata(step, texts, tensors)
        header = aligned(FRAME_HEADER.size + len(meta))
        sizes = [aligned(t.numel() * ITEMSIZE[dtype]) for dtype, t in tensors]
        total = header + sum(sizes)
        if total > self.ring.capacity:
            raise FrameTooLarge(
                f"a {total}-byte step does not fit a {self.ring.capacity}-byte ring"
            )
        room = self.ring.reserve(total)
        if room is None:
            return False
        offset, new_head = room
        FRAME_HEADER.pack_into(self.ring.data, offset, total, FrameKind.STEP, len(meta), step.rows)
        start = offset + FRAME_HEADER.size
        self.ring.data[start : start + len(meta)] = meta
        position = offset + header
        for (dtype, tensor), size in zip(tensors, sizes, strict=True):
            _copy_into(self.ring.data, position, dtype, tensor)
            position += size
        self.ring.publish(new_head)
        if self.doorbell is not None:
            self.doorbell()
        return True


_Tensor = tuple[str, "torch.Tensor"]  # wire dtype, [rows, columns]
_TEMPLATES = 256


def _tensors(step: CapturedStep) -> list[_Tensor]:
    tensors = []
    for tensor in step.layers.values():
        rows = _select_rows(tensor, step.valid)
        tensors.append((_wire_dtype(rows), rows))
    tensors += [("FP32", values.to("cpu")) for values in step.features.values()]
    return tensors


def _describe(
    step: CapturedStep, texts: list[list[str]] | None, tensors: list[_Tensor]
) -> pb.StepBatch:
    batch = pb.StepBatch()
    layers = zip(step.layers, tensors, strict=False)
    for hook_point, (dtype, rows) in layers:
        batch.layers.append(
            pb.Layer(hook_point=hook_point, activations=pb.Tensor(dtype=dtype, shape=rows.shape))
        )
    for (pack, sha, hook_point), (dtype, values) in zip(
        step.features, tensors[len(step.layers) :], strict=True
    ):
        batch.features.append(
            pb.FeatureBlock(
                pack=pack,
                pack_sha256=sha,
                hook_point=hook_point,
                values=pb.Tensor(dtype=dtype, shape=values.shape),
            )
        )
    for index, tag in enumerate(step.sequences):
        batch.sequences.append(
            pb.Sequence(
                conversation_id=tag.conversation_id,
                request_id=tag.request_id,
                rows=tag.rows,
                position=tag.position,
                role=tag.role,
                end=tag.end,
                tokens=texts[index] if texts else (),
                attributes=tag.attributes,
            )
        )
    return batch


def _update(
    batch: pb.StepBatch,
    step: CapturedStep,
    texts: list[list[str]] | None,
    tensors: list[_Tensor],
) -> None:
    """Rows, positions, token text and shapes: all that changes between steps of one tagging."""
    for index, (sequence, tag) in enumerate(zip(batch.sequences, step.sequences, strict=True)):
        sequence.rows = tag.rows
        sequence.position = tag.position
        sequence.end = tag.end
        if texts:
            sequence.tokens[:] = texts[index]
        elif sequence.tokens:
            del sequence.tokens[:]
    messages = [layer.activations for layer in batch.layers]
    messages += [block.values for block in batch.features]
    for message, (dtype, tensor) in zip(messages, tensors, strict=True):
        message.dtype = dtype
        message.shape[:] = tensor.shape


_WIRE_NAMES = {"torch.bfloat16": "BF16", "torch.float16": "FP16", "torch.float32": "FP32"}


def _wire_dtype(tensor: torch.Tensor) -> str:
    """The model's dtype when the wire has it; anything else travels as FP32."""
    return _WIRE_NAMES.get(str(tensor.dtype), "FP32")


def _copy_into(ring_bytes: memoryview, position: int, dtype: str, tensor: torch.Tensor) -> None:
    """One memcpy into shared memory (after a conversion if the dtype is not the wire's)."""
    import torch

    count = tensor.numel()
    if count == 0:
        return
    if _WIRE_NAMES.get(str(tensor.dtype)) != dtype:
        tensor = tensor.to(torch.float32)
    # numpy has no bfloat16: move the bits as 16-bit integers.
    bits = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
    ring_bytes[position : position + count * ITEMSIZE[dtype]] = (
        bits.contiguous().numpy().data.cast("B")
    )


def _select_rows(tensor: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """[batch, seq, d] -> [rows, d]: the real-token rows, sequences concatenated in order."""
    if tensor.dim() == 2:
        return tensor
    if valid is None:
        return tensor.reshape(-1, tensor.shape[-1])
    return tensor[valid]


def read_step(ring: SharedRing, offset: int, meta_bytes: int) -> pb.StepBatch:
    """The relay's side: a STEP frame -> StepBatch with its tensor bytes (copied out of the
    ring, so the frame can be released). Raises ValueError on a malformed frame."""
    start = offset + FRAME_HEADER.size
    batch = pb.StepBatch.FromString(ring.data[start : start + meta_bytes])
    position = offset + aligned(FRAME_HEADER.size + meta_bytes)
    messages = [layer.activations for layer in batch.layers]
    messages += [block.values for block in batch.features]
    for message in messages:
        count = 1
        for dim in message.shape:
            count *= dim
        itemsize = ITEMSIZE.get(message.dtype)
        if itemsize is None:
            raise ValueError(f"frame tensor has unknown dtype {message.dtype!r}")
        size = count * itemsize
        message.data = ring.data[position : position + size].tobytes()
        position += aligned(size)
    return batch
