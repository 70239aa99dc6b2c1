"""Feature packs: the compiled, restricted encoders a sidecar runs, one safetensors file each.

File layout. A hook point whose encoder is one sliced matrix (the common case) is stored as
tensors ``<hp>.weight`` [d_in, k], ``<hp>.bias`` [k] and ``<hp>.floor`` [k] (float32) and a
``normalization`` in the metadata: format version 1, unchanged. A hook point with several
segments (SAEs with different input normalisations, or an exact TopK encoder) stores
``<hp>.<j>.weight`` / ``.bias`` / ``.floor`` (sliced) or ``.weight`` / ``.bias`` /
``.indices`` (exact TopK, full width) per segment and a ``segments`` list in the metadata:
format version 2. The safetensors header metadata key ``safety_monitor.pack`` holds the JSON
document with the pack name and, per hook point, the feature list.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from monitor.escape import needs_escape
from monitor.features.encoder import (
    RUNTIME_NORMALIZATIONS,
    AnyEncoder,
    RestrictedEncoder,
    SegmentEncoder,
    TopKExactEncoder,
    combine,
    segments,
)
from monitor.features.errors import FeatureError, PackError
from monitor.hookpoints import canonical_hook_point

METADATA_KEY = "safety_monitor.pack"
FORMAT_VERSION = 1  # written when every hook point is one sliced matrix
SEGMENTS_FORMAT_VERSION = 2  # written when some hook point has segments
READABLE_VERSIONS = (FORMAT_VERSION, SEGMENTS_FORMAT_VERSION)
ACTIVATIONS = ("relu", "jumprelu", "identity", "topk")
TENSOR_SUFFIXES = ("weight", "bias", "floor")
SEGMENT_KINDS = {"sliced": ("weight", "bias", "floor"), "topk_exact": ("weight", "bias", "indices")}
# Names appear in rule files as '<pack>/<feature>': no slashes, spaces or quotes.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class FeatureInfo:
    """What one output column of a pack means."""

    name: str  # unique within the pack; SAE features default to the SAE index, e.g. '17'
    hook_point: str
    activation: str  # 'relu' | 'jumprelu' | 'identity' | 'topk'
    sae_index: int | None
    category: str = ""
    description: str = ""
    source: str = ""  # the SAE path, 'saelens:<neuronpedia feature id>', or 'probe:<method>'
    threshold: float | None = None  # activation threshold; informational, the encoder uses floor
    label: str = ""  # human-readable label
    neuronpedia_id: str = ""  # '<model>/<layer>-<set>/<index>'
    alert_threshold: float | None = None  # calibrated by `pack calibrate`
    target_fpr: float | None = None  # the false-positive rate alert_threshold was set for
    # How per-token values pool into a conversation score ('max_rolling_mean:8', 'max', 'mean':
    # see features/scoring.py): what a probe was fitted with and a rule should apply.
    aggregation: str = ""
    threshold_pooling: str = ""  # the pooling alert_threshold was calibrated with
    # The roles whose tokens carried the label when `pack fit` trained the probe (sorted;
    # empty: not recorded, as in packs written before it was): what a rule pooling it should
    # name in ``roles:`` and, for a ``,roles`` aggregation, ``window_roles:``.
    labeled_roles: tuple[str, ...] = ()


@dataclass
class HookPointEncoder:
    """The encoder of one hook point and the meaning of each of its columns."""

    hook_point: str
    encoder: AnyEncoder
    features: list[FeatureInfo]  # len == encoder.k, in column order


@dataclass
class FeaturePack:
    """A named set of restricted encoders, one per hook point: what a sidecar (or a capture
    client with `encode_locally`) runs on captured activations.

        from monitor.features import load_pack

        pack = load_pack("deception.pack.safetensors")
        pack.qualified_names("layers.12")            # ['deception/lying', ...] for rule files
        values = pack.encode("layers.12", acts)      # acts [rows, d_model] -> [rows, features]

    Packs are built offline with `safety-monitor pack build` (`monitor.features.build`).
    """

    name: str  # used in rule files as '<pack name>/<feature name>'
    hook_points: dict[str, HookPointEncoder]
    sha256: str = ""  # content hash of the file it was loaded from / written to
    # How the pack was built (fit data digests, held-out metrics): JSON-able, informational.
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        validate_pack(self)

    def d_model(self, hook_point: str) -> int:
        """Width of the activations this pack expects at ``hook_point``."""
        return self._get(hook_point).encoder.d_in

    def encode(self, hook_point: str, x: torch.Tensor) -> torch.Tensor:
        """Feature values ``[rows, k]`` float32 for ``[rows, d_model]`` activations, whatever
        the encoder kind (sliced, exact TopK, several segments), on the pack's device."""
        return self._get(hook_point).encoder.encode(x)

    def qualified_names(self, hook_point: str) -> list[str]:
        """``'<pack>/<feature>'`` for each output column of ``hook_point``, in order."""
        return [f"{self.name}/{f.name}" for f in self._get(hook_point).features]

    @property
    def feature_count(self) -> int:
        """Number of features, all hook points together."""
        return sum(hp.encoder.k for hp in self.hook_points.values())

    def features(self) -> list[FeatureInfo]:
        """Every feature's metadata, hook point by hook point."""
        return [f for entry in self.hook_points.values() for f in entry.features]

    def to(self, device: str | torch.device) -> FeaturePack:
        """A copy on ``device``; on CUDA, sliced encoders run the fused Triton kernel."""
        moved = {
            hp: HookPointEncoder(hp, entry.encoder.to(device), list(entry.features))
            for hp, entry in self.hook_points.items()
        }
        return FeaturePack(
            name=self.name, hook_points=moved, sha256=self.sha256, provenance=self.provenance
        )

    def with_features(self, features: dict[str, FeatureInfo]) -> FeaturePack:
        """A copy with some features' metadata replaced (keyed by feature name)."""
        hook_points = {
            hp: HookPointEncoder(
                hp, entry.encoder, [features.get(f.name, f) for f in entry.features]
            )
            for hp, entry in self.hook_points.items()
        }
        return FeaturePack(name=self.name, hook_points=hook_points, provenance=self.provenance)

    def _get(self, hook_point: str) -> HookPointEncoder:
        entry = self.hook_points.get(hook_point)
        if entry is None:
            # Only a miss pays for translating e.g. 'model.layers.3'.
            entry = self.hook_points.get(canonical_hook_point(hook_point))
        if entry is None:
            raise FeatureError(
                f"no encoder for {hook_point!r} (pack has {', '.join(self.hook_points)})",
                where=f"pack {self.name!r}",
                field="hook_point",
            )
        return entry


# --- validation ---------------------------------------------------------------------------


def validate_pack(pack: FeaturePack) -> None:
    """Check a pack's invariants; tensors are mutable, so saving checks again."""
    where = f"pack {pack.name!r}"
    if not isinstance(pack.name, str) or not NAME_PATTERN.fullmatch(pack.name):
        raise PackError(f"{pack.name!r} must match [A-Za-z0-9_.-]+", where=where, field="name")
    if not pack.hook_points:
        raise PackError("a pack needs at least one hook point", where=where, field="hook_points")
    seen: set[str] = set()
    for key, entry in pack.hook_points.items():
        field = f"hook_points.{key}"
        if entry.hook_point != key or _canonical_or_none(key) != key:
            raise PackError(
                f"key must equal the canonical hook point {entry.hook_point!r}",
                where=where,
                field=field,
            )
        _validate_tensors(entry.encoder, where, field)
        _validate_features(entry, where, field, seen)


def _canonical_or_none(name: str) -> str | None:
    try:
        return canonical_hook_point(name)
    except FeatureError:
        return None


def _validate_tensors(encoder: AnyEncoder, where: str, field: str) -> None:
    parts = segments(encoder)
    for j, part in enumerate(parts):
        at = field if len(parts) == 1 else f"{field}.{j}"
        for suffix in ("weight", "bias"):
            if not torch.isfinite(getattr(part, suffix)).all():
                raise PackError("contains NaN or Inf", where=where, field=f"{at}.{suffix}")
        # -inf is a legitimate floor (identity activation); NaN would make every test false.
        if isinstance(part, RestrictedEncoder) and torch.isnan(part.floor).any():
            raise PackError("contains NaN", where=where, field=f"{at}.floor")


def _validate_features(entry: HookPointEncoder, where: str, field: str, seen: set[str]) -> None:
    if not entry.features:
        raise PackError("no features", where=where, field=f"{field}.features")
    if len(entry.features) != entry.encoder.k:
        raise PackError(
            f"{len(entry.features)} features for {entry.encoder.k} encoder columns",
            where=where,
            field=f"{field}.features",
        )
    floors = entry.encoder.column_floors()
    for column, (info, floor) in enumerate(zip(entry.features, floors, strict=True)):
        at = f"{field}.features[{column}]"
        if not isinstance(info.name, str) or not NAME_PATTERN.fullmatch(info.name):
            raise PackError(f"{info.name!r} must match [A-Za-z0-9_.-]+", where=where, field=at)
        if info.name in seen:
            raise PackError(f"duplicate feature name {info.name!r}", where=where, field=at)
        seen.add(info.name)
        if info.hook_point != entry.hook_point:
            raise PackError(
                f"hook_point {info.hook_point!r} differs from {entry.hook_point!r}",
                where=where,
                field=at,
            )
        for name in ("threshold", "alert_threshold", "target_fpr"):
            value = getattr(info, name)
            if value is not None and not math.isfinite(value):
                raise PackError(f"{name} {value} is not finite", where=where, field=at)
        _check_floor(info.activation, floor, where, at)


def _check_floor(activation: str, floor: float, where: str, at: str) -> None:
    """The floor must be the one the declared activation implies."""
    expected = {
        "relu": floor == 0.0,
        "jumprelu": math.isfinite(floor) and floor >= 0.0,
        "identity": floor == -math.inf,
        "topk": math.isfinite(floor) and floor >= 0.0,
    }
    if activation not in expected:
        raise PackError(
            f"activation {activation!r}, expected one of {', '.join(ACTIVATIONS)}",
            where=where,
            field=at,
        )
    if not expected[activation]:
        raise PackError(f"floor {floor} is invalid for {activation}", where=where, field=at)


# --- saving -------------------------------------------------------------------------------


def save_pack(pack: FeaturePack, path: str | Path) -> str:
    """Write ``pack`` atomically to ``path``; returns (and records) the file's sha256."""
    path = Path(path)
    try:
        validate_pack(pack)
    except PackError as exc:
        raise PackError(exc.detail, where=path, field=exc.field) from None
    data = safetensors.torch.save(_tensors(pack), metadata={METADATA_KEY: _metadata_json(pack)})
    # Write next to the target then rename, so `path` only ever holds a complete pack.
    tmp = Path(f"{path}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        _remove_quietly(tmp)
        raise PackError(f"cannot write: {exc}", where=path) from exc
    pack.sha256 = hashlib.sha256(data).hexdigest()
    return pack.sha256


def _remove_quietly(tmp: Path) -> None:
    # The write already failed; that error is the one to report, not a failed cleanup.
    with contextlib.suppress(OSError):
        tmp.unlink(missing_ok=True)


def _is_plain(encoder: AnyEncoder) -> bool:
    return isinstance(encoder, RestrictedEncoder)


def _tensors(pack: FeaturePack) -> dict[str, torch.Tensor]:
    tensors = {}
    for hp, entry in pack.hook_points.items():
        if _is_plain(entry.encoder):
            prefixed = [(hp, entry.encoder, TENSOR_SUFFIXES)]
        else:
            prefixed = [
                (f"{hp}.{j}", part, SEGMENT_KINDS[_kind(part)])
                for j, part in enumerate(segments(entry.encoder))
            ]
        for prefix, part, suffixes in prefixed:
            for suffix in suffixes:
                # clone: safetensors refuses views that share storage with other tensors.
                tensors[f"{prefix}.{suffix}"] = getattr(part, suffix).detach().cpu().clone()
    return tensors


def _kind(part: SegmentEncoder) -> str:
    return "sliced" if isinstance(part, RestrictedEncoder) else "topk_exact"


def _segment_document(part: SegmentEncoder) -> dict[str, Any]:
    document: dict[str, Any] = {
        "kind": _kind(part),
        "normalization": part.normalization,
        "columns": part.k,
    }
    if isinstance(part, TopKExactEncoder):
        document.update(top_k=part.top_k, relu_first=part.relu_first)
    return document


def _hook_point_document(entry: HookPointEncoder) -> dict[str, Any]:
    features = [_feature_document(f) for f in entry.features]
    if _is_plain(entry.encoder):
        return {"normalization": entry.encoder.normalization, "features": features}
    return {
        "segments": [_segment_document(p) for p in segments(entry.encoder)],
        "features": features,
    }


def _feature_document(info: FeatureInfo) -> dict[str, Any]:
    document = dataclasses.asdict(info)
    document["labeled_roles"] = list(info.labeled_roles)
    # Fields added after format 1 are written only when set, so packs that do not use them
    # keep the same bytes (and hash) as before.
    for name in _OPTIONAL_FEATURE_FIELDS:
        if document[name] in ("", None, []):
            del document[name]
    return document


def _metadata_json(pack: FeaturePack) -> str:
    plain = all(_is_plain(e.encoder) for e in pack.hook_points.values())
    document = {
        "format_version": FORMAT_VERSION if plain else SEGMENTS_FORMAT_VERSION,
        "name": pack.name,
        "hook_points": {hp: _hook_point_document(e) for hp, e in pack.hook_points.items()},
    }
    if pack.provenance:  # written only when set: older packs keep their bytes and hash
        document["provenance"] = pack.provenance
    return json.dumps(document, allow_nan=False, separators=(",", ":"))


def _provenance(document: dict[str, Any], path: Path) -> dict[str, Any]:
    value = document.get("provenance", {})
    if not isinstance(value, dict):
        raise PackError(f"unexpected value {value!r}", where=path, field="provenance")
    return value


# --- loading ------------------------------------------------------------------------------


def load_pack(path: str | Path) -> FeaturePack:
    """Read and fully validate a pack file written by :func:`save_pack`."""
    path = Path(path)
    data = _read_bytes(path)
    try:
        tensors = safetensors.torch.load(data)
    except (safetensors.SafetensorError, ValueError) as exc:
        raise PackError(f"corrupt safetensors file ({exc})", where=path) from exc
    document = _metadata_document(data, path)
    try:
        pack = FeaturePack(
            name=_typed(document, "name", (str,), path),
            hook_points=_hook_points(document, tensors, path),
            sha256=hashlib.sha256(data).hexdigest(),
            provenance=_provenance(document, path),
        )
    except FeatureError as exc:
        raise PackError(exc.detail, where=path, field=exc.field) from None
    return pack


def _read_bytes(path: Path) -> bytes:
    try:
        # One read serves both the hash and the parse, so they describe the same bytes.
        return path.read_bytes()
    except FileNotFoundError:
        raise PackError("file not found", where=path) from None
    except OSError as exc:
        raise PackError(f"cannot read: {exc}", where=path) from exc


def _metadata_document(data: bytes, path: Path) -> dict[str, Any]:
    # safetensors' Python API has no metadata-from-bytes reader; the header is
    # an 8-byte little-endian length and JSON, and load() above has already validated it.
    header_len = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
    if METADATA_KEY not in metadata:
        raise PackError(
            "missing (not a safety-monitor pack?)", where=path, field=f"metadata.{METADATA_KEY}"
        )
    try:
        document = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise PackError(f"invalid JSON ({exc})", where=path, field="metadata") from exc
    if not isinstance(document, dict):
        raise PackError("expected a JSON object", where=path, field="metadata")
    version = document.get("format_version")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise PackError(
            f"{version!r}, this version reads {', '.join(map(str, READABLE_VERSIONS))}",
            where=path,
            field="format_version",
        )
    return document


def _typed(obj: dict[str, Any], key: str, kinds: tuple[type, ...], path: Path, at: str = "") -> Any:
    """``obj[key]``, which must exist and be an instance of ``kinds``."""
    field = f"{at}.{key}" if at else key
    if key not in obj:
        raise PackError("missing", where=path, field=field)
    value = obj[key]
    # bool is an int subclass: never accept it where a number is meant.
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise PackError(f"unexpected value {value!r}", where=path, field=field)
    return value


def _hook_points(
    document: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path
) -> dict[str, HookPointEncoder]:
    entries = _typed(document, "hook_points", (dict,), path)
    extra = sorted(set(tensors) - _described_tensors(entries))
    if extra:
        raise PackError("tensor not described in the metadata", where=path, field=extra[0])
    return {hp: _hook_point_entry(hp, spec, tensors, path) for hp, spec in entries.items()}


def _described_tensors(entries: dict[str, Any]) -> set[str]:
    """The tensor names the metadata accounts for (malformed entries fail later, located)."""
    names: set[str] = set()
    for hp, spec in entries.items():
        parts = spec.get("segments") if isinstance(spec, dict) else None
        if not isinstance(parts, list):
            names |= {f"{hp}.{s}" for s in TENSOR_SUFFIXES}
            continue
        for j, part in enumerate(parts):
            kind = part.get("kind") if isinstance(part, dict) else None
            suffixes = SEGMENT_KINDS.get(kind, ()) if isinstance(kind, str) else ()
            names |= {f"{hp}.{j}.{s}" for s in suffixes}
    return names


def _hook_point_entry(
    hp: str, spec: Any, tensors: dict[str, torch.Tensor], path: Path
) -> HookPointEncoder:
    at = f"hook_points.{hp}"
    if not isinstance(spec, dict):
        raise PackError("expected a JSON object", where=path, field=at)
    raw_features = _typed(spec, "features", (list,), path, at)
    features = [_feature(item, path, f"{at}.features[{i}]") for i, item in enumerate(raw_features)]
    if "segments" in spec:
        encoder = _segmented_encoder(hp, spec, tensors, path, len(features))
    else:
        encoder = _sliced(hp, _normalization(spec, path, at), tensors, path, len(features))
    return HookPointEncoder(hook_point=hp, encoder=encoder, features=features)


def _normalization(spec: dict[str, Any], path: Path, at: str) -> str:
    normalization = _typed(spec, "normalization", (str,), path, at)
    if normalization not in RUNTIME_NORMALIZATIONS:
        raise PackError(
            f"{normalization!r}, expected one of {', '.join(RUNTIME_NORMALIZATIONS)}",
            where=path,
            field=f"{at}.normalization",
        )
    return normalization


def _sliced(
    prefix: str, normalization: str, tensors: dict[str, torch.Tensor], path: Path, k: int
) -> RestrictedEncoder:
    weight, bias, floor = (_pack_tensor(tensors, f"{prefix}.{s}", path) for s in TENSOR_SUFFIXES)
    _check_shapes(prefix, weight, bias, floor, k, path)
    return RestrictedEncoder(weight=weight, bias=bias, floor=floor, normalization=normalization)


def _segmented_encoder(
    hp: str, spec: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path, k: int
) -> AnyEncoder:
    at = f"hook_points.{hp}"
    raw = _typed(spec, "segments", (list,), path, at)
    if not raw:
        raise PackError("empty", where=path, field=f"{at}.segments")
    parts = [
        _segment(f"{hp}.{j}", s, tensors, path, f"{at}.segments[{j}]") for j, s in enumerate(raw)
    ]
    total = sum(p.k for p in parts)
    if total != k:
        raise PackError(
            f"{total} segment columns for {k} features", where=path, field=f"{at}.segments"
        )
    try:
        return combine(parts) if len(parts) > 1 else parts[0]
    except FeatureError as exc:
        raise PackError(exc.detail, where=path, field=f"{at}.segments") from None


def _segment(
    prefix: str, spec: Any, tensors: dict[str, torch.Tensor], path: Path, at: str
) -> SegmentEncoder:
    if not isinstance(spec, dict):
        raise PackError("expected a JSON object", where=path, field=at)
    kind = _typed(spec, "kind", (str,), path, at)
    if kind not in SEGMENT_KINDS:
        raise PackError(
            f"{kind!r}, expected one of {', '.join(SEGMENT_KINDS)}", where=path, field=f"{at}.kind"
        )
    normalization = _normalization(spec, path, at)
    columns = _typed(spec, "columns", (int,), path, at)
    if kind == "sliced":
        return _sliced(prefix, normalization, tensors, path, columns)
    weight, bias = (_pack_tensor(tensors, f"{prefix}.{s}", path) for s in ("weight", "bias"))
    indices = _pack_tensor(tensors, f"{prefix}.indices", path, torch.int64)
    try:
        return TopKExactEncoder(
            weight=weight,
            bias=bias,
            indices=indices,
            top_k=_typed(spec, "top_k", (int,), path, at),
            relu_first=_typed(spec, "relu_first", (bool,), path, at),
            normalization=normalization,
        )
    except FeatureError as exc:
        raise PackError(exc.detail, where=path, field=f"{prefix}.{exc.field}") from None


_FEATURE_FIELDS: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "hook_point": (str,),
    "activation": (str,),
    "sae_index": (int, type(None)),
    "category": (str,),
    "description": (str,),
    "source": (str,),
    "threshold": (float, int, type(None)),
    "label": (str,),
    "neuronpedia_id": (str,),
    "alert_threshold": (float, int, type(None)),
    "target_fpr": (float, int, type(None)),
    "aggregation": (str,),
    "threshold_pooling": (str,),
    "labeled_roles": (list,),
}
_REQUIRED_FEATURE_FIELDS = ("name", "hook_point", "activation", "sae_index")
_OPTIONAL_FEATURE_FIELDS = (
    "label",
    "neuronpedia_id",
    "alert_threshold",
    "target_fpr",
    "aggregation",
    "threshold_pooling",
    "labeled_roles",
)
_FLOAT_FIELDS = ("threshold", "alert_threshold", "target_fpr")
# Longest role name a pack may record (roles are short words: user, assistant, tool).
MAX_ROLE_CHARS = 64


def _feature(item: Any, path: Path, at: str) -> FeatureInfo:
    if not isinstance(item, dict):
        raise PackError("expected a JSON object", where=path, field=at)
    unknown = sorted(set(item) - set(_FEATURE_FIELDS))
    if unknown:
        raise PackError("unknown field", where=path, field=f"{at}.{unknown[0]}")
    for key in dict.fromkeys([*_REQUIRED_FEATURE_FIELDS, *item]):  # ordered: stable errors
        _typed(item, key, _FEATURE_FIELDS[key], path, at)
    floats = {k: float(item[k]) for k in _FLOAT_FIELDS if item.get(k) is not None}
    roles = item.get("labeled_roles", [])
    if not all(isinstance(role, str) and role for role in roles):
        raise PackError(
            f"unexpected value {roles!r}, expected a list of role names",
            where=path,
            field=f"{at}.labeled_roles",
        )
    for role in roles:
        # A pack may come from elsewhere; its roles are shown in notes and written into
        # generated rule files, so they must not carry terminal controls or forge lines.
        if len(role) > MAX_ROLE_CHARS or any(needs_escape(ch) for ch in role):
            shown = f"{role[:MAX_ROLE_CHARS]!r}{'...' if len(role) > MAX_ROLE_CHARS else ''}"
            raise PackError(
                f"role {shown}: a role name is printable characters, at most {MAX_ROLE_CHARS}",
                where=path,
                field=f"{at}.labeled_roles",
            )
    return FeatureInfo(**{**item, **floats, "labeled_roles": tuple(roles)})


def _pack_tensor(
    tensors: dict[str, torch.Tensor], name: str, path: Path, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    if name not in tensors:
        raise PackError("missing tensor", where=path, field=name)
    tensor = tensors[name]
    if tensor.dtype != dtype:
        raise PackError(
            f"expected {str(dtype).removeprefix('torch.')}, got {tensor.dtype}",
            where=path,
            field=name,
        )
    return tensor


def _check_shapes(
    hp: str,
    weight: torch.Tensor,
    bias: torch.Tensor,
    floor: torch.Tensor,
    k: int,
    path: Path,
) -> None:
    if weight.ndim != 2 or weight.shape[1] != k:
        raise PackError(
            f"shape {list(weight.shape)}, expected [d_in, {k}] for {k} features",
            where=path,
            field=f"{hp}.weight",
        )
    for suffix, tensor in (("bias", bias), ("floor", floor)):
        if tuple(tensor.shape) != (k,):
            raise PackError(
                f"shape {list(tensor.shape)}, expected [{k}]", where=path, field=f"{hp}.{suffix}"
            )
