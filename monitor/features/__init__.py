"""SAE loading, restricted encoders and feature packs (no gRPC here: this is pure compute)."""

from monitor.features.encoder import ConcatEncoder, RestrictedEncoder, TopKExactEncoder
from monitor.features.errors import FeatureError, PackError, SAEFormatError
from monitor.features.hookpoints import canonical_hook_point
from monitor.features.pack import (
    FeatureInfo,
    FeaturePack,
    FeatureSpec,
    HookPointEncoder,
    assemble_pack,
    build_pack_from_sae,
    load_pack,
    sae_segment,
    save_pack,
)
from monitor.features.sae import FORMATS, SAE, detect_format, load_sae

__all__ = [
    "FORMATS",
    "SAE",
    "ConcatEncoder",
    "FeatureError",
    "FeatureInfo",
    "FeaturePack",
    "FeatureSpec",
    "HookPointEncoder",
    "PackError",
    "RestrictedEncoder",
    "SAEFormatError",
    "TopKExactEncoder",
    "assemble_pack",
    "build_pack_from_sae",
    "canonical_hook_point",
    "detect_format",
    "load_pack",
    "load_sae",
    "sae_segment",
    "save_pack",
]
