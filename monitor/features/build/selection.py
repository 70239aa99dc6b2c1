"""Selection files: one YAML document naming the features of a multi-source pack.

```yaml
name: safety-gemma2            # pack name (the CLI's --name overrides it)
sources:
  - sae: saes/gemma-scope-res-l12   # paths are relative to this file
    format: gemma-scope             # optional, auto-detected
    hook_point: layers.12           # optional, overrides the SAE's own
    topk_mode: exact                # TopK SAEs only: exact | approx
    calibration_activations: acts.safetensors  # approx only: fits per-feature thresholds
    features:
      - 6642                        # a bare index: named '6642'
      - index: 1234
        name: secrecy
        label: Keeping secrets
        category: deception
        description: Fires when the assistant plans to hide information.
        neuronpedia_id: gemma-2-2b/12-gemmascope-res-16k/1234
  - pack: probes.pack.safetensors   # all features of an existing pack (e.g. from `pack fit`)
```
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from monitor.features.build.builder import FeatureSpec, assemble_pack, sae_segment
from monitor.features.build.sae import TOPK_MODES, load_sae
from monitor.features.errors import FeatureError, PackError
from monitor.features.pack import FeaturePack, HookPointEncoder, load_pack

_SAE_KEYS = {"sae", "format", "hook_point", "topk_mode", "calibration_activations", "features"}
_FEATURE_KEYS = {"index", "name", "label", "category", "description", "neuronpedia_id"}


@dataclass
class SAESource:
    """One SAE of a selection file and the features taken from it."""

    path: Path
    features: list[FeatureSpec]
    format: str | None = None
    hook_point: str | None = None
    topk_mode: str | None = None
    calibration_activations: Path | None = None


@dataclass
class PackSource:
    """An existing pack of a selection file, merged in whole."""

    path: Path


@dataclass
class Selection:
    """A parsed selection file: the pack name and its sources, in order."""

    name: str | None
    sources: list[SAESource | PackSource] = field(default_factory=list)


def load_selection(path: str | Path) -> Selection:
    """Parse and check a selection file; errors name the file and the field."""
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FeatureError("file not found", where=path) from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise FeatureError(f"cannot read YAML ({exc})", where=path) from exc
    where = _Where(path)
    if not isinstance(document, dict):
        raise where.error("", "expected a mapping with 'sources'")
    where.unknown(document, {"name", "sources"}, "")
    name = where.optional_str(document, "name", "")
    sources = document.get("sources")
    if not isinstance(sources, list) or not sources:
        raise where.error("sources", "expected a non-empty list")
    return Selection(
        name, [_source(item, where, f"sources[{i}]") for i, item in enumerate(sources)]
    )


def build_from_selection(selection: Selection, name: str | None = None) -> FeaturePack:
    """Compile every source of ``selection`` into one pack."""
    pack_name = name or selection.name
    if not pack_name:
        raise FeatureError(
            "no pack name: give 'name' in the selection file or --name", field="name"
        )
    entries: list[HookPointEncoder] = []
    for source in selection.sources:
        if isinstance(source, PackSource):
            entries.extend(load_pack(source.path).hook_points.values())
        else:
            entries.append(_sae_entry(source))
    try:
        return assemble_pack(pack_name, entries)
    except PackError as exc:
        hint = " (give the features distinct 'name's)" if "duplicate" in exc.detail else ""
        raise PackError(exc.detail + hint, where=exc.where, field=exc.field) from None


def _sae_entry(source: SAESource) -> HookPointEncoder:
    from monitor.features.build.topk import fit_topk_thresholds, load_activations

    sae = load_sae(source.path, source.format)
    thresholds = None
    if source.calibration_activations is not None and sae.is_topk:
        x = load_activations(source.calibration_activations, source.hook_point or sae.hook_point)
        thresholds = fit_topk_thresholds(sae, [s.index for s in source.features], x)
    return sae_segment(sae, source.features, source.hook_point, source.topk_mode, thresholds)


class _Where:
    """Builds located errors: '<file>: sources[0].features[2].index: <detail>'."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def error(self, field: str, detail: str) -> FeatureError:
        return FeatureError(detail, where=self.path, field=field or None)

    def unknown(self, obj: dict[str, Any], allowed: set[str], at: str) -> None:
        extra = sorted(set(map(str, obj)) - allowed)
        if extra:
            raise self.error(
                _join(at, extra[0]), f"unknown key (expected {', '.join(sorted(allowed))})"
            )

    def optional_str(self, obj: dict[str, Any], key: str, at: str) -> str | None:
        value = obj.get(key)
        if value is not None and not isinstance(value, str):
            raise self.error(_join(at, key), f"expected a string, got {value!r}")
        return value

    def path_of(self, obj: dict[str, Any], key: str, at: str) -> Path | None:
        value = self.optional_str(obj, key, at)
        return None if value is None else (self.path.parent / value)


def _join(at: str, key: str) -> str:
    return f"{at}.{key}" if at else key


def _source(item: Any, where: _Where, at: str) -> SAESource | PackSource:
    if not isinstance(item, dict):
        raise where.error(at, "expected a mapping with 'sae' or 'pack'")
    if "pack" in item:
        where.unknown(item, {"pack"}, at)
        path = where.path_of(item, "pack", at)
        assert path is not None
        return PackSource(path)
    if "sae" not in item:
        raise where.error(at, "expected 'sae' or 'pack'")
    where.unknown(item, _SAE_KEYS, at)
    topk_mode = where.optional_str(item, "topk_mode", at)
    if topk_mode is not None and topk_mode not in TOPK_MODES:
        raise where.error(
            f"{at}.topk_mode", f"{topk_mode!r}, expected one of {', '.join(TOPK_MODES)}"
        )
    features = item.get("features")
    if not isinstance(features, list) or not features:
        raise where.error(f"{at}.features", "expected a non-empty list")
    sae_path = where.path_of(item, "sae", at)
    assert sae_path is not None
    return SAESource(
        path=sae_path,
        features=[_feature(f, where, f"{at}.features[{i}]") for i, f in enumerate(features)],
        format=where.optional_str(item, "format", at),
        hook_point=where.optional_str(item, "hook_point", at),
        topk_mode=topk_mode,
        calibration_activations=where.path_of(item, "calibration_activations", at),
    )


def _feature(item: Any, where: _Where, at: str) -> FeatureSpec:
    if not isinstance(item, dict):
        item = {"index": item}
    where.unknown(item, _FEATURE_KEYS, at)
    index = item.get("index")
    if isinstance(index, bool) or not isinstance(index, int):
        raise where.error(f"{at}.index", f"expected an integer SAE index, got {index!r}")
    texts = {k: where.optional_str(item, k, at) or "" for k in _FEATURE_KEYS - {"index", "name"}}
    return FeatureSpec(index=index, name=where.optional_str(item, "name", at), **texts)
