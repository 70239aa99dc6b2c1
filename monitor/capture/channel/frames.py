"""One captured step as a ring frame, and back into a StepBatch on the relay's side.

    [FRAME_HEADER][metadata][tensor bytes, each 64-byte aligned: the layers in order, then
    the feature blocks]

The metadata is the wire message itself, minus the tensor bytes, so the relay adds the data
and needs no schema of its own. It comes in two forms:

- STEP: a serialised StepBatch (tensors with dtype and shape, no data);
- TEMPLATED_STEP: `[u32 n][n bytes: a StepBatch][pad to 8][u64 rows × sequences]
  [u64 positions × sequences]`. Steps of one tagging differ only in rows, positions and the
  tensors' row counts, so the serving process serialises the StepBatch once per tagging and
  each step adds two short arrays; the relay fills them in. Turn-end flags belong to the
  tagging (`Tagging.turn_ends`), so they travel inside the serialised StepBatch: a marked
  step is a step of another tagging, and an unmarked one costs nothing more. Every frame is
  whole in itself: the relay keeps no state between frames, so frames it skips or a relay
  restart lose nothing.

Tensors are copied straight from the model's output into shared memory (after a dtype
conversion, if the wire lacks the model's dtype). This module's relay half imports no torch.
"""

from __future__ import annotations

import ctypes
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from monitor.capture.channel.ring import (
    FRAME_HEADER,
    SLOT_WAITING,
    Frame,
    FrameKind,
    SharedRing,
    aligned,
    full_fence,
)
from monitor.wire.safety_monitor.v1 import monitor_pb2 as pb

if TYPE_CHECKING:
    import torch

    from monitor.capture.steps import CapturedStep

ITEMSIZE = {"BF16": 2, "FP16": 2, "FP32": 4}
_U32 = struct.Struct("<I")
_TEMPLATES = 256


class FrameTooLarge(Exception):
    """A step larger than the whole ring; it can never be sent."""


@dataclass(slots=True)
class _Tensor:
    """One tensor of a step, ready to be copied: C-contiguous, in host memory, in a wire
    dtype. `tensor` keeps the memory at `address` alive until the copy."""

    dtype: str  # wire name
    columns: int
    nbytes: int
    address: int
    tensor: torch.Tensor


class _Template:
    """A tagging's serialised StepBatch, and how to add one step's rows and positions."""

    def __init__(self, message: bytes, sequences: int, signature: list[tuple[Any, ...]]) -> None:
        head = _U32.pack(len(message)) + message
        self.prefix = head + bytes(-len(head) % 8)
        self.counts = struct.Struct(f"<{2 * sequences}Q")
        self.size = len(self.prefix) + self.counts.size
        self.signature = signature

    def write(self, data: memoryview, start: int, rows: list[int], positions: list[int]) -> None:
        end = start + len(self.prefix)
        data[start:end] = self.prefix
        self.counts.pack_into(data, end, *rows, *positions)


@dataclass(slots=True)
class _Layout:
    """A templated frame's layout, kept for the next step of the same tagging and the same
    persistent layer views (see `CapturedStep.persistent_layers`): only the rows, positions
    and tensor bytes change from one such step to the next, and only the positions when the
    rows are those of the step it was made for (a vLLM decode run: one row per request)."""

    tagging: Any
    sources: tuple[Any, ...]  # the step's layer views (identity is what is compared)
    layers: dict[str, Any]  # the step's `layers` dict itself (`FrameWriter.write_again`)
    template: _Template
    total: int
    tensors_at: int
    # Per tensor with bytes: where its bytes go in the frame (start, stop) and its memory as
    # a byte memoryview. Copied by slice assignment: on a cold cache (a step every few ms)
    # that costs a fraction of a `ctypes.memmove` call, and it is bounds-checked.
    copies: tuple[tuple[int, int, memoryview], ...]
    rows: list[int]  # the rows per sequence of the step it was made for
    # What a frame of those rows starts with: the frame header, the template's prefix and the
    # rows; the positions follow (`positions`, one u64 each). One copy instead of three packs.
    head: bytes
    positions: struct.Struct


class FrameWriter:
    """The serving process's side: CapturedStep -> frame. One writer at a time (RelayLink
    holds a lock around it). After each publish: the doorbell, if given (CPUs that reorder
    stores), else a write to `wakeup_fd` when the relay has said it is waiting (ring.py)."""

    def __init__(
        self,
        ring: SharedRing,
        doorbell: Callable[[], None] | None = None,
        wakeup_fd: int | None = None,
    ) -> None:
        import torch

        self.ring = ring
        self.doorbell = doorbell
        self.wakeup_fd = wakeup_fd
        self.wakeups_sent = 0  # eventfd writes: the system calls this writer made
        self._fence = threading.Lock()
        self._wire = {torch.float32: "FP32", torch.float16: "FP16", torch.bfloat16: "BF16"}
        self._fp32 = torch.float32
        self._templates: OrderedDict[Hashable, _Template] = OrderedDict()
        self._layout: _Layout | None = None

    def write(self, step: CapturedStep, texts: list[list[str]] | None) -> bool:
        """Publish the step; False when the ring has no room for it now."""
        layout = self._layout
        if (
            layout is not None
            and step.tagging is layout.tagging
            and step.persistent_layers
            and not texts
            and not step.features
            and step.valid is None
            and _same_objects(step.layers.values(), layout.sources)
        ):
            return self._write_again(layout, step.rows, step.positions)
        tensors, signature = self._tensors(step)
        template = None if texts else self._template(step, tensors, signature)
        if template is None:
            kind = FrameKind.STEP
            meta = _describe(step, texts, tensors).SerializeToString()
            meta_size = len(meta)
        else:
            kind, meta_size = FrameKind.TEMPLATED_STEP, template.size
        tensors_at = aligned(FRAME_HEADER.size + meta_size)
        total = tensors_at + sum(aligned(t.nbytes) for t in tensors)
        if total > self.ring.capacity:
            raise FrameTooLarge(
                f"a {total}-byte step does not fit a {self.ring.capacity}-byte ring"
            )
        room = self.ring.reserve(total)
        if room is None:
            return False
        offset, new_head = room
        data = self.ring.data
        rows = step.total_rows
        FRAME_HEADER.pack_into(data, offset, total, kind, meta_size, rows)
        start = offset + FRAME_HEADER.size
        if template is None:
            data[start : start + meta_size] = meta
        else:
            template.write(data, start, step.rows, step.positions)
        # Bounds: `reserve` gave `total` bytes from `offset`, and the tensors' aligned sizes
        # add up to what is left of it after the metadata.
        address = self.ring.data_address + offset + tensors_at
        for tensor in tensors:
            if tensor.nbytes:  # an empty tensor's data pointer may be null
                ctypes.memmove(address, tensor.address, tensor.nbytes)
            address += aligned(tensor.nbytes)
        self.ring.publish(new_head)
        self._announce()
        if template is not None and step.persistent_layers and not step.features:
            self._keep_layout(step, template, total, tensors_at, tensors)
        return True

    def _keep_layout(
        self,
        step: CapturedStep,
        template: _Template,
        total: int,
        tensors_at: int,
        tensors: list[_Tensor],
    ) -> None:
        """Remember this frame's layout for the next step with the same tagging and views,
        unless a tensor had to be converted or selected first (its copy would not outlive
        this step)."""
        sources = tuple(step.layers.values())
        if step.valid is not None or any(
            t.tensor is not s for t, s in zip(tensors, sources, strict=True)
        ):
            self._layout = None
            return
        copies = []
        start = tensors_at
        for t in tensors:
            if t.nbytes:  # the views are kept in `sources`: their memory outlives the layout
                copies.append((start, start + t.nbytes, _memory(t.address, t.nbytes)))
            start += aligned(t.nbytes)
        rows = list(step.rows)
        head = FRAME_HEADER.pack(total, FrameKind.TEMPLATED_STEP, template.size, sum(rows))
        head += template.prefix + _counts(len(rows)).pack(*rows)
        self._layout = _Layout(
            step.tagging,
            sources,
            step.layers,
            template,
            total,
            tensors_at,
            tuple(copies),
            rows,
            head,
            _counts(len(rows)),
        )

    def write_again(self, step: CapturedStep, positions: list[int]) -> bool:
        """`write` of `step` with `positions` in place of its own, for a step that repeats the
        last one written: the same tagging and the very `layers` dict (of persistent views)
        the last frame's layout was made for. Integrations whose steps repeat one layout
        (vLLM's decode runs) then build no step object per step. False, with nothing
        written, when the layout does not fit or the ring has no room: `write` then decides
        (it also lays the frame out anew)."""
        layout = self._layout
        if (
            layout is None
            or step.layers is not layout.layers
            or step.tagging is not layout.tagging
            or not step.persistent_layers
            or step.features
            or step.valid is not None
            or not _same_objects(step.layers.values(), layout.sources)  # a dict refilled
        ):
            return False
        return self._write_again(layout, step.rows, positions)

    def _write_again(self, layout: _Layout, rows: list[int], positions: list[int]) -> bool:
        """`write` for a step whose frame is laid out as the last one's: the header, this
        step's rows and positions, and the tensor bytes from the same buffers."""
        ring = self.ring
        room = ring.reserve(layout.total)
        if room is None:
            return False
        offset, new_head = room
        data = ring.data
        if rows == layout.rows:  # the header, prefix and rows are the layout's own bytes
            end = offset + len(layout.head)
            data[offset:end] = layout.head
            layout.positions.pack_into(data, end, *positions)
        else:
            template = layout.template
            FRAME_HEADER.pack_into(
                data, offset, layout.total, FrameKind.TEMPLATED_STEP, template.size, sum(rows)
            )
            template.write(data, offset + FRAME_HEADER.size, rows, positions)
        for start, stop, memory in layout.copies:
            data[offset + start : offset + stop] = memory
        ring.publish(new_head)
        self._announce()
        return True

    def _announce(self) -> None:
        """Tell the relay a frame is there, if it needs telling. x86-64 may let the load of
        WAITING pass the store of HEAD in `publish` (and the relay's store of WAITING and load
        of HEAD likewise), so that both sides miss each other: the fence between them forbids
        it. Were a wake-up lost all the same, the relay's bounded first sleep
        (`FrameSource._wait`) delays that frame by LOST_WAKEUP_BOUND at most."""
        if self.doorbell is not None:
            self.doorbell()
            return
        if self.wakeup_fd is None:
            return
        full_fence(self._fence)
        if self.ring.slots[SLOT_WAITING]:
            try:  # not contextlib.suppress: this runs on the model's thread, every step
                os.eventfd_write(self.wakeup_fd, 1)
                self.wakeups_sent += 1
            except BlockingIOError:
                pass  # non-blocking: only a counter at 2**64 - 2 refuses, never reached

    def _tensors(self, step: CapturedStep) -> tuple[list[_Tensor], list[tuple[Any, ...]]]:
        """The step's tensors as host arrays (rows selected), and what a template must match:
        names, wire dtypes and columns."""
        tensors = []
        signature: list[tuple[Any, ...]] = []
        valid = step.valid
        for name, tensor in step.layers.items():
            if valid is not None and tensor.dim() == 3:
                tensor = tensor[valid]
            tensors.append(self._host_array(tensor))
            signature.append((name, tensors[-1].dtype, tensors[-1].columns))
        for key, values in step.features.items():
            if values.is_cuda or values.dtype != self._fp32:  # feature values travel as FP32
                values = values.to("cpu", self._fp32)
            tensors.append(self._host_array(values))
            signature.append((key, "FP32", tensors[-1].columns))
        return tensors, signature

    def _host_array(self, tensor: torch.Tensor) -> _Tensor:
        if not tensor.is_cpu:  # a raw copy must never read a device pointer
            tensor = tensor.cpu()
        wire = self._wire.get(tensor.dtype)
        if wire is None:  # any other dtype travels as FP32
            tensor = tensor.to(self._fp32)
            wire = "FP32"
        if not tensor.is_contiguous():
            tensor = tensor.contiguous()
        return _Tensor(wire, tensor.shape[-1], tensor.nbytes, tensor.data_ptr(), tensor)

    def _template(
        self, step: CapturedStep, tensors: list[_Tensor], signature: list[tuple[Any, ...]]
    ) -> _Template | None:
        key = step.tagging.key
        if key is None:
            return None
        template = self._templates.get(key)
        if template is None or template.signature != signature:
            message = _describe(step, None, tensors).SerializeToString()
            template = _Template(message, len(step.rows), signature)
            self._templates[key] = template
            if len(self._templates) > _TEMPLATES:
                self._templates.popitem(last=False)
        return template


def _memory(address: int, nbytes: int) -> memoryview:
    """The `nbytes` bytes at `address` as a byte memoryview (it does not keep them alive)."""
    return memoryview((ctypes.c_char * nbytes).from_address(address)).cast("B")


def _same_objects(values: Any, kept: tuple[Any, ...]) -> bool:
    """Whether `values` are exactly the objects in `kept`, in order."""
    count = 0
    for value in values:
        if count >= len(kept) or value is not kept[count]:
            return False
        count += 1
    return count == len(kept)


def _describe(
    step: CapturedStep, texts: list[list[str]] | None, tensors: list[_Tensor]
) -> pb.StepBatch:
    batch = pb.StepBatch()
    rows = step.total_rows
    for hook_point, tensor in zip(step.layers, tensors, strict=False):
        shape = (rows, tensor.columns)
        batch.layers.append(
            pb.Layer(hook_point=hook_point, activations=pb.Tensor(dtype=tensor.dtype, shape=shape))
        )
    for (pack, sha, hook_point), tensor in zip(
        step.features, tensors[len(step.layers) :], strict=True
    ):
        batch.features.append(
            pb.FeatureBlock(
                pack=pack,
                pack_sha256=sha,
                hook_point=hook_point,
                values=pb.Tensor(dtype=tensor.dtype, shape=(rows, tensor.columns)),
            )
        )
    tagging = step.tagging
    turn_ends = tagging.turn_ends or (False,) * len(tagging.conversation_ids)
    for index, cid in enumerate(tagging.conversation_ids):
        batch.sequences.append(
            pb.Sequence(
                conversation_id=cid,
                request_id=tagging.request_ids[index],
                rows=step.rows[index],
                position=step.positions[index],
                role=tagging.roles[index],
                end=tagging.end,
                tokens=texts[index] if texts else (),
                attributes=tagging.attributes,
                turn_end=turn_ends[index],
            )
        )
    return batch


def read_step(ring: SharedRing, frame: Frame) -> pb.StepBatch:
    """The relay's side: a step frame -> StepBatch with its tensor bytes (copied out of the
    ring, so the frame can be released). Raises ValueError on a malformed frame."""
    meta = frame_meta(ring, frame)
    if frame.kind == FrameKind.TEMPLATED_STEP:
        batch = _from_template(meta, frame.rows)
    else:
        batch = pb.StepBatch.FromString(meta)
    fill_tensors(ring, frame, tensor_messages(batch))
    return batch


def frame_meta(ring: SharedRing, frame: Frame) -> memoryview:
    """A frame's metadata, in place on the ring (valid until the frame is released)."""
    start = frame.offset + FRAME_HEADER.size
    return ring.data[start : start + frame.meta]


def tensor_messages(batch: pb.StepBatch) -> list[pb.Tensor]:
    """A StepBatch's tensors in frame order: the layers', then the feature blocks'."""
    messages = [layer.activations for layer in batch.layers]
    messages += [block.values for block in batch.features]
    return messages


def fill_tensors(ring: SharedRing, frame: Frame, messages: list[pb.Tensor]) -> None:
    """Copy the frame's tensor bytes into a StepBatch's tensors (`tensor_messages`), which
    must describe them (dtype and shape); ValueError if they run past the frame or name an
    unknown dtype."""
    position = frame.offset + aligned(FRAME_HEADER.size + frame.meta)
    end = frame.offset + frame.size
    data = ring.data
    for message in messages:
        count = 1
        for dim in message.shape:
            count *= dim
        itemsize = ITEMSIZE.get(message.dtype)
        if itemsize is None:
            raise ValueError(f"frame tensor has unknown dtype {message.dtype!r}")
        size = count * itemsize
        if position + size > end:
            raise ValueError("frame tensors run past the end of the frame")
        message.data = data[position : position + size].tobytes()
        position += aligned(size)


def split_template(meta: memoryview) -> tuple[memoryview, tuple[int, ...]]:
    """TEMPLATED_STEP metadata -> (the serialised StepBatch, this step's rows per sequence
    followed by its positions). Raises ValueError if the parts do not fit the metadata."""
    if len(meta) < _U32.size:
        raise ValueError("templated frame: metadata too short")
    (length,) = _U32.unpack_from(meta, 0)
    counts_at = _U32.size + length
    counts_at += -counts_at % 8
    if counts_at > len(meta) or (len(meta) - counts_at) % 16:
        raise ValueError("templated frame: the rows and positions do not fit the metadata")
    counts = _counts((len(meta) - counts_at) // 8)
    return meta[_U32.size : _U32.size + length], counts.unpack_from(meta, counts_at)


def _counts(values: int) -> struct.Struct:
    """The struct of `values` little-endian u64s (cached: building one parses its format)."""
    counts = _COUNTS.get(values)
    if counts is None:
        counts = struct.Struct(f"<{values}Q")
        if len(_COUNTS) < 1024:
            _COUNTS[values] = counts
    return counts


_COUNTS: dict[int, struct.Struct] = {}


def _from_template(meta: memoryview, total_rows: int) -> pb.StepBatch:
    """TEMPLATED_STEP metadata -> the StepBatch, this step's rows and positions filled in."""
    template, values = split_template(meta)
    batch = pb.StepBatch.FromString(template)
    sequences = len(batch.sequences)
    if len(values) != 2 * sequences:
        raise ValueError("templated frame: the rows and positions do not fit the metadata")
    if sum(values[:sequences]) != total_rows:
        raise ValueError("templated frame: the sequences' rows do not add up to the frame's")
    for sequence, rows, position in zip(
        batch.sequences, values[:sequences], values[sequences:], strict=True
    ):
        sequence.rows = rows
        sequence.position = position
    for message in tensor_messages(batch):
        if len(message.shape) != 2:
            raise ValueError("templated frame: tensors must be [rows, columns]")
        message.shape[0] = total_rows
    return batch
