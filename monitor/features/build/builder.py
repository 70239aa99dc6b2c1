"""Building packs: from SAE features (`build_pack_from_sae`, `sae_segment`) and from several
sources at once (`assemble_pack`). Moved out of `features/pack.py`, which keeps the file
format, validation, saving and loading that the runtime needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from monitor.features.build.sae import SAE
from monitor.features.encoder import combine, segments
from monitor.features.errors import FeatureError, PackError
from monitor.features.pack import FeatureInfo, FeaturePack, HookPointEncoder
from monitor.hookpoints import canonical_hook_point


@dataclass(frozen=True)
class FeatureSpec:
    """One SAE feature to put in a pack, with the metadata a selection file gives it."""

    index: int
    name: str | None = None  # default: the index
    label: str = ""
    category: str = ""
    description: str = ""
    neuronpedia_id: str = ""


def build_pack_from_sae(
    sae: SAE,
    indices: Sequence[int],
    name: str,
    hook_point: str | None = None,
    topk_mode: str | None = None,
    thresholds: torch.Tensor | None = None,
) -> FeaturePack:
    """A one-hook-point pack of ``indices`` of ``sae``; ``hook_point`` overrides the SAE's.

    TopK SAEs need ``topk_mode`` ('exact' or 'approx', see :meth:`SAE.restrict`).
    """
    entry = sae_segment(
        sae,
        [FeatureSpec(int(i)) for i in _indices(sae, indices)],
        hook_point,
        topk_mode,
        thresholds,
    )
    return FeaturePack(name=name, hook_points={entry.hook_point: entry})


def _indices(sae: SAE, indices: Sequence[int]) -> list[int]:
    from monitor.features.build.sae import check_indices

    return check_indices(indices, sae.d_sae, sae.source)


def sae_segment(
    sae: SAE,
    specs: Sequence[FeatureSpec],
    hook_point: str | None = None,
    topk_mode: str | None = None,
    thresholds: torch.Tensor | None = None,
) -> HookPointEncoder:
    """The encoder and feature metadata for ``specs`` of ``sae`` at one hook point."""
    hp = resolve_hook_point(sae, hook_point)
    encoder = sae.restrict([s.index for s in specs], topk_mode, thresholds)  # checks indices
    floors = encoder.column_floors()
    features = [
        _sae_feature(sae, spec, hp, floor) for spec, floor in zip(specs, floors, strict=True)
    ]
    return HookPointEncoder(hp, encoder, features)


def resolve_hook_point(sae: SAE, hook_point: str | None) -> str:
    """The canonical hook point: `hook_point` if given, else the SAE's own; FeatureError if
    neither."""
    if hook_point is None and sae.hook_point is None:
        raise FeatureError(
            "the SAE config names no hook point; pass --hook-point (e.g. layers.12)",
            where=sae.source,
            field="hook_point",
        )
    hp = canonical_hook_point(hook_point) if hook_point is not None else sae.hook_point
    assert hp is not None
    return hp


def _sae_feature(sae: SAE, spec: FeatureSpec, hook_point: str, floor: float) -> FeatureInfo:
    index = spec.index
    activation = {"standard": "relu", "gated": "jumprelu"}.get(sae.architecture, sae.architecture)
    threshold: float | None = None
    if sae.architecture == "jumprelu":
        assert sae.threshold is not None
        threshold = float(sae.threshold[index])
    elif activation in ("jumprelu", "topk") and floor > 0:
        threshold = floor  # gated gate, or a TopK approximate-mode threshold
    neuronpedia = spec.neuronpedia_id or (
        f"{sae.neuronpedia_id}/{index}" if sae.neuronpedia_id else ""
    )
    # A Neuronpedia feature id ('<model>/<layer>-<set>/<index>') is more useful than a path.
    source = f"saelens:{sae.neuronpedia_id}/{index}" if sae.neuronpedia_id else sae.source
    return FeatureInfo(
        name=spec.name or str(index),
        hook_point=hook_point,
        activation=activation,
        sae_index=index,
        category=spec.category,
        description=spec.description,
        source=source,
        threshold=threshold,
        label=spec.label,
        neuronpedia_id=neuronpedia,
    )


def assemble_pack(name: str, entries: Sequence[HookPointEncoder]) -> FeaturePack:
    """One pack from several sources: entries at the same hook point are concatenated (and
    sliced ones with the same normalisation merged into one matrix)."""
    grouped: dict[str, list[HookPointEncoder]] = {}
    for entry in entries:
        grouped.setdefault(entry.hook_point, []).append(entry)
    hook_points = {}
    for hp, group in grouped.items():
        parts = [part for entry in group for part in segments(entry.encoder)]
        features = [f for entry in group for f in entry.features]
        try:
            encoder = combine(parts)
        except FeatureError as exc:
            raise PackError(exc.detail, where=f"pack {name!r}", field=f"hook_points.{hp}") from None
        hook_points[hp] = HookPointEncoder(hp, encoder, features)
    return FeaturePack(name=name, hook_points=hook_points)
