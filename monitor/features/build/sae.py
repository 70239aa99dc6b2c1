"""Sparse autoencoders from every supported library, as one :class:`SAE`, and their reference
(full) encode.

The full encode is the ground truth the restricted encoders are tested against, so it follows
each library's math step by step rather than taking any algebraic shortcut. Loaders live in
``saelens.py`` and ``formats.py``; :func:`load_sae` detects the format.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from monitor.features.encoder import RestrictedEncoder, TopKExactEncoder, normalize_input
from monitor.features.errors import FeatureError, SAEFormatError

ARCHITECTURES = ("standard", "jumprelu", "topk", "gated")
TOPK_MODES = ("exact", "approx")
FORMATS = (
    "saelens",
    "gemma-scope",
    "gemma-scope-2",
    "sparsify",
    "dictionary-learning",
    "openai",
)


@dataclass
class SAE:
    """A full sparse encoder (decoder weights are not needed to monitor, so mostly not kept).

    The fields describe one pipeline that covers every supported library:
    normalise -> subtract ``b_dec`` (if ``apply_b_dec_to_input``) -> ``h = x @ W_enc + b_enc``
    -> activation (``relu``, ``jumprelu``, ``gated``, or ``topk`` with the library's ReLU/TopK
    order and optional per-latent rescaling).
    """

    W_enc: torch.Tensor  # [d_in, d_sae] float32
    b_enc: torch.Tensor  # [d_sae]; gated SAEs: b_mag (the magnitude path's bias)
    b_dec: torch.Tensor  # [d_in]
    threshold: torch.Tensor | None  # [d_sae], jumprelu only
    architecture: str  # 'standard' | 'jumprelu' | 'topk' | 'gated'
    apply_b_dec_to_input: bool
    normalize_activations: str
    hook_point: str | None
    source: str
    neuronpedia_id: str | None
    k: int | None = None  # topk: latents kept per row
    relu_before_topk: bool = False  # sparsify, dictionary_learning; SAELens/OpenAI: False
    latent_scale: torch.Tensor | None = None  # [d_sae] SAELens rescale_acts_by_decoder_norm
    b_gate: torch.Tensor | None = None  # [d_sae], gated only
    r_mag: torch.Tensor | None = None  # [d_sae], gated only
    format: str = "saelens"

    @property
    def d_in(self) -> int:
        """Width of the activations the SAE reads."""
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        """Number of latents."""
        return int(self.W_enc.shape[1])

    @property
    def is_topk(self) -> bool:
        """Whether it is a TopK SAE (restricting it needs a `topk_mode`)."""
        return self.architecture == "topk"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Reference encode of ``[rows, d_in]`` activations into all ``d_sae`` latents."""
        x = normalize_input(x.float(), self.runtime_normalization())
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        if self.architecture == "gated":
            return self._encode_gated(x)
        h = x @ self.W_enc + self.b_enc
        if self.architecture == "jumprelu":
            assert self.threshold is not None
            return torch.relu(h) * (h > self.threshold)
        if self.architecture == "topk":
            return self._topk(h)
        return torch.relu(h)

    def _encode_gated(self, x: torch.Tensor) -> torch.Tensor:
        assert self.b_gate is not None and self.r_mag is not None
        active = (x @ self.W_enc + self.b_gate > 0).float()
        magnitude = torch.relu(x @ (self.W_enc * self.r_mag.exp()) + self.b_enc)
        return active * magnitude

    def _topk(self, h: torch.Tensor) -> torch.Tensor:
        assert self.k is not None
        if self.relu_before_topk:
            h = torch.relu(h)
        if self.latent_scale is not None:
            h = h * self.latent_scale
        top = torch.topk(h, self.k, dim=-1, sorted=False)
        return torch.zeros_like(h).scatter_(-1, top.indices, torch.relu(top.values))

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """What a TopK SAE ranks: ``h`` after the library's ReLU-first and rescale steps."""
        x = normalize_input(x.float(), self.runtime_normalization())
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        h = x @ self.W_enc + self.b_enc
        if self.relu_before_topk:
            h = torch.relu(h)
        return h if self.latent_scale is None else h * self.latent_scale

    def restrict(
        self,
        indices: Sequence[int],
        topk_mode: str | None = None,
        thresholds: torch.Tensor | None = None,
    ) -> RestrictedEncoder | TopKExactEncoder:
        """Slice the encoder to ``indices``.

        Exact for ReLU, JumpReLU and gated SAEs. TopK SAEs need ``topk_mode``: 'exact' keeps
        the full encoder to rank all latents; 'approx' slices and keeps a feature where its
        pre-activation exceeds ``thresholds`` (per feature; default 0 until calibrated).
        """
        idx = torch.tensor(check_indices(indices, self.d_sae, self.source), dtype=torch.long)
        if self.is_topk:
            return self._restrict_topk(idx, topk_mode, thresholds)
        weight, bias = self._folded(idx)
        return RestrictedEncoder(
            weight=weight,
            bias=bias,
            floor=self._floor(idx).contiguous(),
            normalization=self.runtime_normalization(),
        )

    def _folded(self, idx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight columns and bias with scales and the decoder bias folded in."""
        cols = slice(None) if idx is None else idx
        weight, bias = self.W_enc[:, cols], self.b_enc[cols]
        scale = None
        if self.architecture == "gated":
            assert self.r_mag is not None
            scale = self.r_mag[cols].exp()
        elif self.latent_scale is not None:
            scale = self.latent_scale[cols]
        weight64, bias64 = weight.double(), bias.double()
        if scale is not None:
            weight64 = weight64 * scale.double()
            # SAELens rescales h = x @ W + b as a whole; the gated magnitude bias is not scaled.
            if self.architecture != "gated":
                bias64 = bias64 * scale.double()
        if self.apply_b_dec_to_input:
            # Fold in float64 so the fold adds no error beyond the final cast to float32.
            bias64 = bias64 - self.b_dec.double() @ weight64
        return weight64.float().contiguous(), bias64.float().contiguous()

    def _floor(self, idx: torch.Tensor) -> torch.Tensor:
        if self.architecture == "jumprelu":
            assert self.threshold is not None
            # relu(h) * (h > t) keeps h exactly where h > max(t, 0).
            return self.threshold[idx].clamp(min=0.0)
        if self.architecture == "gated":
            assert self.b_gate is not None and self.r_mag is not None
            # gate: g + b_gate > 0 with g = x' @ W; the magnitude is h = e^r g + b_mag, so the
            # gate is h > b_mag - e^r b_gate: one GEMM and a floor, exactly.
            gate = self.b_enc[idx].double() - self.r_mag[idx].double().exp() * self.b_gate[idx]
            return gate.clamp(min=0.0).float()
        return torch.zeros(len(idx), dtype=torch.float32)

    def _restrict_topk(
        self, idx: torch.Tensor, topk_mode: str | None, thresholds: torch.Tensor | None
    ) -> RestrictedEncoder | TopKExactEncoder:
        if topk_mode not in TOPK_MODES:
            raise FeatureError(
                f"a TopK SAE cannot be sliced exactly: choose topk_mode 'exact' (keeps the full "
                f"encoder) or 'approx' (sliced, per-feature threshold), got {topk_mode!r}",
                where=self.source,
                field="topk_mode",
            )
        assert self.k is not None
        if topk_mode == "exact":
            weight, bias = self._folded(None)
            return TopKExactEncoder(
                weight=weight,
                bias=bias,
                indices=idx,
                top_k=self.k,
                relu_first=self.relu_before_topk,
                normalization=self.runtime_normalization(),
            )
        weight, bias = self._folded(idx)
        floor = torch.zeros(len(idx)) if thresholds is None else thresholds.float()
        if tuple(floor.shape) != (len(idx),) or not torch.isfinite(floor).all():
            raise FeatureError(
                f"expected {len(idx)} finite values", where=self.source, field="thresholds"
            )
        return RestrictedEncoder(
            weight=weight,
            bias=bias,
            floor=floor.clamp(min=0.0).contiguous(),
            normalization=self.runtime_normalization(),
        )

    def runtime_normalization(self) -> str:
        # The expected-average factor is folded into the weights by SAELens at the end of
        # training; a directory on disk carries no factor to apply at run time.
        """The input normalisation a pack applies at run time."""
        if self.normalize_activations == "expected_average_only_in":
            return "none"
        return self.normalize_activations


def check_indices(indices: Sequence[int], d_sae: int, source: str) -> list[int]:
    """Indices as ints: non-empty, in range, no duplicates."""
    try:
        result = [_as_index(i) for i in indices]
    except TypeError as exc:
        raise FeatureError(f"not an integer: {exc}", where=source, field="indices") from None
    if not result:
        raise FeatureError("no feature indices given", where=source, field="indices")
    for i in result:
        if not 0 <= i < d_sae:
            raise FeatureError(
                f"index {i} out of range [0, {d_sae})", where=source, field="indices"
            )
    if len(set(result)) != len(result):
        duplicate = next(i for i in result if result.count(i) > 1)
        raise FeatureError(f"index {duplicate} given twice", where=source, field="indices")
    return result


def _as_index(value: object) -> int:
    # bool is an int subclass, but True as a feature index is always a mistake.
    if isinstance(value, bool):
        raise TypeError(repr(value))
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(repr(value)) from None


def load_sae(path: str | Path, format: str | None = None) -> SAE:
    """Load an SAE from a local path; ``format`` (one of :data:`FORMATS`) or auto-detected.
    Only safetensors/npz/JSON are read: never a pickle.

        from monitor.features.build import build_pack_from_sae, load_sae
        from monitor.features import save_pack

        sae = load_sae("gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82")
        sae.hook_point                               # 'layers.12'
        pack = build_pack_from_sae(sae, [1024, 7731], name="deception")
        save_pack(pack, "deception.pack.safetensors")
    """
    from monitor.features.build import formats, saelens

    loaders = {
        "saelens": saelens.load_saelens,
        "gemma-scope": formats.load_gemma_scope,
        "gemma-scope-2": formats.load_gemma_scope_2,
        "sparsify": formats.load_sparsify,
        "dictionary-learning": formats.load_dictionary_learning,
        "openai": formats.load_openai,
    }
    if format is None:
        format = detect_format(Path(path))
    if format not in loaders:
        raise SAEFormatError(
            f"unknown format {format!r}, expected one of {', '.join(FORMATS)}",
            where=path,
            field="format",
        )
    return loaders[format](Path(path))


# The file that identifies each format, checked in this order.
_MARKERS = (
    ("sae_weights.safetensors", "saelens"),
    ("params.npz", "gemma-scope"),
    ("params.safetensors", "gemma-scope-2"),
    ("sae.safetensors", "sparsify"),
    ("ae.pt", "dictionary-learning"),
)


def detect_format(path: Path) -> str:
    """The format of the SAE at ``path``, from the files it holds."""
    if path.is_file():
        if path.suffix == ".npz":
            return "gemma-scope"
        if path.suffix == ".pt":
            return "dictionary-learning" if path.name == "ae.pt" else "openai"
        if path.name == "params.safetensors":
            return "gemma-scope-2"
        raise SAEFormatError(
            "cannot tell the SAE format from this file (pass format=...)", where=path
        )
    if not path.is_dir():
        raise SAEFormatError("not a directory or weights file (expected an SAE)", where=path)
    for marker, format in _MARKERS:
        if (path / marker).is_file():
            return format
    if (path / "cfg.json").is_file():
        return "saelens"  # its loader names the missing weights file
    if any((child / "sae.safetensors").is_file() for child in path.iterdir() if child.is_dir()):
        return "sparsify"
    raise SAEFormatError(
        "not a directory of a known SAE format (no cfg.json, params.npz, params.safetensors, "
        "sae.safetensors or ae.pt)",
        where=path,
    )
