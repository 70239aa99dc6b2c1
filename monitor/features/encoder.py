"""The restricted encoders: the run-time kernels of a feature pack.

Compile-time algebra leaves one GEMM plus an epilogue per message:
``(x - b_dec) @ W + b_enc == x @ W + (b_enc - b_dec @ W)``, and ReLU / JumpReLU / gated /
identity all become "keep h where h > floor, else 0".

Three encoder kinds share one small interface (``d_in``, ``k``, ``encode``, ``to``):
- :class:`RestrictedEncoder`: the sliced columns (exact for ReLU, JumpReLU, gated; the
  approximate mode of TopK SAEs).
- :class:`TopKExactEncoder`: a TopK SAE's full encoder, so membership in the top k is decided
  over all latents, then only the selected columns are returned.
- :class:`ConcatEncoder`: several of the above at one hook point (several SAEs, or SAE features
  plus probes that need different input normalisations), outputs side by side.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from monitor.features.errors import FeatureError

# Per-token input normalisations that cannot fold into the weights.
RUNTIME_NORMALIZATIONS = ("none", "constant_norm_rescale", "layer_norm")
# SAELens (and OpenAI's LN) add this to the std in the layer_norm prologue.
LAYER_NORM_EPS = 1e-5
_FP32 = torch.float32


def normalize_input(x: torch.Tensor, normalization: str) -> torch.Tensor:
    """Apply SAELens's run-time input normalisation to float32 rows ``x``."""
    if normalization == "none":
        return x
    if normalization == "constant_norm_rescale":
        return x * (math.sqrt(x.shape[-1]) / x.norm(dim=-1, keepdim=True))
    if normalization == "layer_norm":
        mean = x.mean(dim=-1, keepdim=True)
        std = x.std(dim=-1, keepdim=True)  # unbiased, as torch's default and SAELens
        return (x - mean) / (std + LAYER_NORM_EPS)
    raise FeatureError(
        f"unknown normalization {normalization!r}, expected one of {RUNTIME_NORMALIZATIONS}",
        field="normalization",
    )


class Encoder(Protocol):
    """What a hook point's encoder offers the pack."""

    normalization: str

    @property
    def d_in(self) -> int:
        """Width of the activations it reads (the model's d_model)."""
        ...

    @property
    def k(self) -> int:
        """Number of features (output columns)."""
        ...

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``[rows, d_in]`` activations to ``[rows, k]`` float32 feature values."""
        ...

    def to(self, device: str | torch.device) -> Encoder:
        """The same encoder on `device`."""
        ...


def check_activations(x: torch.Tensor, d_in: int) -> None:
    """FeatureError unless `x` is a float ``[rows, d_in]`` tensor."""
    if x.ndim != 2 or x.shape[1] != d_in or not x.is_floating_point():
        raise FeatureError(
            f"expected float [rows, {d_in}], got {x.dtype} {list(x.shape)}",
            field="activations",
        )


def _check_normalization(normalization: str) -> None:
    if normalization not in RUNTIME_NORMALIZATIONS:
        raise FeatureError(
            f"{normalization!r}, expected one of {RUNTIME_NORMALIZATIONS}",
            field="normalization",
        )


def _check_float(name: str, tensor: torch.Tensor, shape: tuple[int, ...] | int) -> None:
    """float32 with the given shape (an int means: that many dimensions)."""
    ok = tensor.dtype == torch.float32 and (
        tensor.ndim == shape if isinstance(shape, int) else tuple(tensor.shape) == shape
    )
    if not ok:
        want = f"{shape}-d" if isinstance(shape, int) else str(list(shape))
        raise FeatureError(
            f"expected float32 {want}, got {tensor.dtype} {list(tensor.shape)}", field=name
        )


@dataclass
class RestrictedEncoder:
    """``k`` selected features of one hook point, ready to encode ``[rows, d_in]`` activations."""

    weight: torch.Tensor  # [d_in, k] float32, contiguous
    bias: torch.Tensor  # [k] float32, decoder bias already folded in
    floor: torch.Tensor  # [k] float32: output h where h > floor, else 0
    normalization: str  # 'none' | 'constant_norm_rescale' | 'layer_norm'
    # (floor tensor, its in-place version, the one value all its columns share or None):
    # see `_shared_floor`.
    _floor_seen: tuple[Any, int, float | None] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        _check_float("weight", self.weight, 2)
        k = self.weight.shape[1]
        _check_float("bias", self.bias, (k,))
        _check_float("floor", self.floor, (k,))
        _check_normalization(self.normalization)
        # addmm reads the weight with a fixed stride; a transposed view would be slow.
        self.weight = self.weight.contiguous()

    @property
    def d_in(self) -> int:
        """Width of the activations it reads."""
        return int(self.weight.shape[0])

    @property
    def k(self) -> int:
        """Number of features (output columns)."""
        return int(self.weight.shape[1])

    @property
    def device(self) -> torch.device:
        """Where the weights live (and where `encode` computes)."""
        return self.weight.device

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Encode ``[rows, d_in]`` activations of any float dtype into ``[rows, k]`` float32.

        The result is on this encoder's device (``x`` is moved there if needed).
        """
        weight = self.weight
        if (
            x.dtype is _FP32
            and x.is_cpu
            and weight.is_cpu
            and self.normalization == "none"
            and x.ndim == 2
            and x.shape[1] == weight.shape[0]
        ):
            # CPU float32 rows, no normalisation: a capture client encoding on the model's
            # thread (`encode_locally`) every decode step, and the sidecar's CPU encode too.
            # `encode_torch`'s very calls minus the ones that do nothing here (the move, the
            # dtype conversion, the normalisation), and with a floor shared by every column
            # (ReLU packs) one in-place threshold instead of a compare and a masked fill. Each
            # torch call costs 5-15 us on the model's cold caches (README, Local encoding:
            # the encode of a 4-row step in the model's hook, 181 -> 118 us, one scratch
            # observation). Same values, bit for bit (tests/unit/test_encoder_fast_path.py).
            h = torch.addmm(self.bias, x, weight)
            floor = self._shared_floor()
            if floor is None:
                return h.masked_fill_(h <= self.floor, 0.0)
            # threshold_: h if h > floor else 0, as `h <= floor` masks it (NaN kept).
            return torch.threshold_(h, floor, 0.0)
        check_activations(x, self.d_in)
        x = x.to(self.device, non_blocking=True)
        if x.is_cuda:
            from monitor.features.triton_encoder import triton_available, triton_encode

            if triton_available():
                return triton_encode(x, self.weight, self.bias, self.floor, self.normalization)
        return self.encode_torch(x)

    def encode_torch(self, x: torch.Tensor) -> torch.Tensor:
        """The torch path: one ``addmm`` and an in-place epilogue."""
        x = normalize_input(x.float(), self.normalization)
        h = torch.addmm(self.bias, x, self.weight)
        return h.masked_fill_(h <= self.floor, 0.0)

    def _shared_floor(self) -> float | None:
        """The floor of every column when they all share one, else None. Worked out once per
        floor tensor: the tensor's version counter says when it was changed in place."""
        floor = self.floor
        seen = self._floor_seen
        if seen is not None and seen[0] is floor and seen[1] == floor._version:
            return seen[2]
        value = None
        if len(floor) and bool((floor == floor[0]).all()):
            value = float(floor[0])
        self._floor_seen = (floor, floor._version, value)
        return value

    def to(self, device: str | torch.device) -> RestrictedEncoder:
        """The same encoder with its tensors on `device`."""
        return RestrictedEncoder(
            weight=self.weight.to(device),
            bias=self.bias.to(device),
            floor=self.floor.to(device),
            normalization=self.normalization,
        )

    def column_floors(self) -> list[float]:
        """Per column, the value an output must exceed to count as active (else it is 0)."""
        return self.floor.tolist()

    def subset(self, columns: Sequence[int], multiple: int = 1) -> RestrictedEncoder:
        """An encoder of only ``columns`` (in that order), on the same device: its output
        column ``i`` is this encoder's column ``columns[i]`` (each output column depends only
        on its own weight column, bias and floor). Zero columns (always 0 out) pad the width
        to a multiple of ``multiple``; they follow the selected ones."""
        index = torch.as_tensor(list(columns), dtype=torch.int64, device=self.device)
        if len(index) and not 0 <= int(index.min()) <= int(index.max()) < self.k:
            raise FeatureError(f"out of range [0, {self.k})", field="columns")
        weight = self.weight.index_select(1, index)
        bias, floor = self.bias.index_select(0, index), self.floor.index_select(0, index)
        pad = -len(index) % multiple
        if pad:
            weight = torch.cat([weight, weight.new_zeros(self.d_in, pad)], dim=1)
            bias = torch.cat([bias, bias.new_zeros(pad)])
            floor = torch.cat([floor, floor.new_zeros(pad)])
        return RestrictedEncoder(weight, bias, floor, self.normalization)


@dataclass
class TopKExactEncoder:
    """Exact restricted TopK: full pre-activations, the k-th value per row, selected columns.

    ``weight``/``bias`` cover all ``d_sae`` latents with the decoder bias and any per-latent
    scale (SAELens ``rescale_acts_by_decoder_norm``) folded in; the scale is a norm, so it is
    non-negative and commutes with ReLU and with the ordering TopK depends on.
    """

    weight: torch.Tensor  # [d_in, d_sae] float32
    bias: torch.Tensor  # [d_sae] float32
    indices: torch.Tensor  # [k] int64: the selected latents, in column order
    top_k: int  # the SAE's k (latents kept per row)
    relu_first: bool  # sparsify / dictionary_learning: ReLU before TopK
    normalization: str

    def __post_init__(self) -> None:
        _check_float("weight", self.weight, 2)
        d_sae = self.weight.shape[1]
        _check_float("bias", self.bias, (d_sae,))
        if self.indices.dtype != torch.int64 or self.indices.ndim != 1:
            raise FeatureError(f"expected int64 [k], got {self.indices.dtype}", field="indices")
        if (
            len(self.indices)
            and not 0 <= int(self.indices.min()) <= int(self.indices.max()) < d_sae
        ):
            raise FeatureError(f"out of range [0, {d_sae})", field="indices")
        if not 0 < self.top_k <= d_sae:
            raise FeatureError(f"{self.top_k} not in [1, {d_sae}]", field="k")
        _check_normalization(self.normalization)
        self.weight = self.weight.contiguous()

    @property
    def d_in(self) -> int:
        """Width of the activations it reads."""
        return int(self.weight.shape[0])

    @property
    def d_sae(self) -> int:
        """Number of SAE latents the TopK runs over."""
        return int(self.weight.shape[1])

    @property
    def k(self) -> int:
        """Number of selected features (output columns)."""
        return int(self.indices.shape[0])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``[rows, d_in]`` activations to ``[rows, k]`` float32: a selected latent keeps its value
        when it is positive and among the row's top latents, else 0.
        """
        check_activations(x, self.d_in)
        x = normalize_input(x.to(self.weight.device).float(), self.normalization)
        h = torch.addmm(self.bias, x, self.weight)
        if self.relu_first:
            h.relu_()
        # The k-th largest value per row decides membership; ties at it are measure-zero for
        # real activations, and a member at or below zero is zeroed by the final ReLU anyway.
        kth = torch.topk(h, self.top_k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
        selected = h.index_select(1, self.indices)
        return selected.masked_fill_((selected < kth) | (selected <= 0), 0.0)

    def to(self, device: str | torch.device) -> TopKExactEncoder:
        """The same encoder with its tensors on `device`."""
        return TopKExactEncoder(
            weight=self.weight.to(device),
            bias=self.bias.to(device),
            indices=self.indices.to(device),
            top_k=self.top_k,
            relu_first=self.relu_first,
            normalization=self.normalization,
        )

    def column_floors(self) -> list[float]:
        """All 0: a TopK latent's activity is decided by rank, not by a floor."""
        return [0.0] * self.k


SegmentEncoder = RestrictedEncoder | TopKExactEncoder


@dataclass
class ConcatEncoder:
    """Several encoders of one hook point; their columns side by side, in order."""

    parts: list[SegmentEncoder] = field(default_factory=list)
    normalization: str = "mixed"

    def __post_init__(self) -> None:
        if not self.parts:
            raise FeatureError("needs at least one part", field="parts")
        widths = {p.d_in for p in self.parts}
        if len(widths) != 1:
            raise FeatureError(f"parts disagree on d_in: {sorted(widths)}", field="parts")

    @property
    def d_in(self) -> int:
        """Width of the activations it reads (the same for every part)."""
        return self.parts[0].d_in

    @property
    def k(self) -> int:
        """Number of features, all parts together."""
        return sum(p.k for p in self.parts)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Each part's columns, side by side in order."""
        check_activations(x, self.d_in)
        return torch.cat([p.encode(x) for p in self.parts], dim=1)

    def to(self, device: str | torch.device) -> ConcatEncoder:
        """The same encoder with every part on `device`."""
        return ConcatEncoder([p.to(device) for p in self.parts])

    def column_floors(self) -> list[float]:
        """The parts' column floors, in order."""
        return [f for p in self.parts for f in p.column_floors()]


AnyEncoder = RestrictedEncoder | TopKExactEncoder | ConcatEncoder


def segments(encoder: AnyEncoder) -> list[SegmentEncoder]:
    """The plain encoders inside ``encoder``, in column order."""
    return list(encoder.parts) if isinstance(encoder, ConcatEncoder) else [encoder]


def combine(parts: list[SegmentEncoder]) -> AnyEncoder:
    """One encoder for ``parts``: adjacent sliced parts with the same normalisation merge into
    one matrix, so the common case stays a single GEMM."""
    merged: list[SegmentEncoder] = []
    for part in parts:
        last = merged[-1] if merged else None
        if (
            isinstance(part, RestrictedEncoder)
            and isinstance(last, RestrictedEncoder)
            and last.normalization == part.normalization
        ):
            merged[-1] = RestrictedEncoder(
                weight=torch.cat([last.weight, part.weight], dim=1),
                bias=torch.cat([last.bias, part.bias]),
                floor=torch.cat([last.floor, part.floor]),
                normalization=part.normalization,
            )
        else:
            merged.append(part)
    return merged[0] if len(merged) == 1 else ConcatEncoder(merged)
