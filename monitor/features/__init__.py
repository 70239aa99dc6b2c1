"""The runtime half of features: feature packs (file format, validation, loading) and the
restricted encoders a sidecar runs. No gRPC here: this is pure compute.

Building packs from SAEs (SAE formats, selection, TopK calibration, probes, the `pack` CLI)
lives in `monitor.features.build`, which the runtime never imports.
"""

from monitor.features.encoder import ConcatEncoder, RestrictedEncoder, TopKExactEncoder
from monitor.features.errors import FeatureError, PackError, SAEFormatError
from monitor.features.pack import FeatureInfo, FeaturePack, HookPointEncoder, load_pack, save_pack
from monitor.hookpoints import canonical_hook_point

__all__ = [
    "ConcatEncoder",
    "FeatureError",
    "FeatureInfo",
    "FeaturePack",
    "HookPointEncoder",
    "PackError",
    "RestrictedEncoder",
    "SAEFormatError",
    "TopKExactEncoder",
    "canonical_hook_point",
    "load_pack",
    "save_pack",
]
