"""TopK SAEs in packs: approximate-mode thresholds and how often the approximation disagrees.

Restricted TopK is not exact: whether latent i is among the top k depends on all d_sae
pre-activations. The approximate mode keeps feature i where its own pre-activation exceeds a
per-feature threshold, fitted here on sample activations to best agree with exact TopK.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import torch

from monitor.features.build.sae import SAE, check_indices
from monitor.features.errors import FeatureError


@dataclass(frozen=True)
class TopKAgreement:
    """Approximate vs exact TopK on sample activations (cells are (row, feature) pairs)."""

    rows: int
    features: int
    disagreement_rate: float  # fraction of cells where one mode fires and the other does not
    false_positive_rate: float  # approx fires, exact does not (fraction of all cells)
    false_negative_rate: float  # exact fires, approx does not
    per_feature: list[float]  # disagreement rate of each feature, in column order
    max_abs_diff: float  # largest |approx - exact| over all cells


def fit_topk_thresholds(sae: SAE, indices: Sequence[int], x: torch.Tensor) -> torch.Tensor:
    """Per-feature thresholds for the approximate mode that best reproduce exact TopK on ``x``.

    For each feature, the threshold t minimising #(h > t, not in top k) + #(h <= t, in top k).
    """
    idx = _indices(sae, indices)
    h = sae.pre_activations(x)[:, idx]
    member = sae.encode(x)[:, idx] > 0
    order = torch.argsort(h, dim=0)
    h_sorted = torch.gather(h, 0, order)
    m_sorted = torch.gather(member, 0, order).float()
    # errors if t = h_sorted[i]: members at or below i are missed, non-members above i fire.
    missed = torch.cumsum(m_sorted, dim=0)
    spurious = (1 - m_sorted).flip(0).cumsum(0).flip(0) - (1 - m_sorted)
    best = torch.argmin(missed + spurious, dim=0)
    thresholds = h_sorted.gather(0, best.unsqueeze(0)).squeeze(0)
    # The exact output is zero at or below zero too, so a threshold below 0 never helps.
    return thresholds.clamp(min=0.0)


def topk_disagreement(
    sae: SAE, indices: Sequence[int], x: torch.Tensor, thresholds: torch.Tensor | None
) -> TopKAgreement:
    """How the approximate mode with ``thresholds`` disagrees with exact TopK on ``x``."""
    idx = _indices(sae, indices)
    exact = sae.restrict(idx, topk_mode="exact").encode(x)
    approx = sae.restrict(idx, topk_mode="approx", thresholds=thresholds).encode(x)
    fires_exact, fires_approx = exact > 0, approx > 0
    cells = max(fires_exact.numel(), 1)
    differ = fires_exact != fires_approx
    return TopKAgreement(
        rows=int(x.shape[0]),
        features=len(idx),
        disagreement_rate=float(differ.sum()) / cells,
        false_positive_rate=float((fires_approx & ~fires_exact).sum()) / cells,
        false_negative_rate=float((fires_exact & ~fires_approx).sum()) / cells,
        per_feature=differ.float().mean(dim=0).tolist(),
        max_abs_diff=float((approx - exact).abs().max()) if exact.numel() else 0.0,
    )


def _indices(sae: SAE, indices: Sequence[int]) -> list[int]:
    if not sae.is_topk:
        raise FeatureError(
            f"{sae.architecture!r} SAEs slice exactly; TopK calibration does not apply",
            where=sae.source,
            field="architecture",
        )
    return check_indices(indices, sae.d_sae, sae.source)


def load_activations(path: str | Path, hook_point: str | None = None) -> torch.Tensor:
    """Sample activations ``[rows, d_model]`` from a ``.npy`` file or a safetensors file (the
    tensor named after ``hook_point``, or its only tensor)."""
    path = Path(path)
    try:
        if path.suffix == ".npy":
            return _as_rows(torch.from_numpy(np.load(path, allow_pickle=False)), path, "array")
        with safetensors.safe_open(str(path), framework="pt") as handle:
            names = list(handle.keys())
            name = _pick(names, hook_point, path)
            return _as_rows(handle.get_tensor(name), path, name)
    except FileNotFoundError:
        raise FeatureError("file not found", where=path) from None
    except (OSError, ValueError, safetensors.SafetensorError) as exc:
        raise FeatureError(f"cannot read activations ({exc})", where=path) from exc


def _pick(names: list[str], hook_point: str | None, path: Path) -> str:
    if hook_point is not None and hook_point in names:
        return hook_point
    if len(names) == 1:
        return names[0]
    raise FeatureError(
        f"holds {', '.join(names) or 'no tensors'}; expected one named {hook_point!r}",
        where=path,
        field="tensors",
    )


def _as_rows(tensor: torch.Tensor, path: Path, name: str) -> torch.Tensor:
    if tensor.ndim != 2 or not tensor.is_floating_point():
        raise FeatureError(
            f"expected float [rows, d_model], got {tensor.dtype} {list(tensor.shape)}",
            where=path,
            field=name,
        )
    if not torch.isfinite(tensor.float()).all():
        raise FeatureError("contains NaN or Inf", where=path, field=name)
    return tensor
