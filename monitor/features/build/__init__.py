"""Build time: turning SAEs into feature packs. SAE formats and loading (`sae.py`,
`formats.py`, `saelens.py`), feature selection files (`selection.py`), TopK calibration
(`topk.py`), linear probes (`probes.py`), pack building (`builder.py`) and the `pack` CLI
(`cli.py`). Runs offline; the serving process and the sidecar only load the packs it writes.
"""

from monitor.features.build.builder import (
    FeatureSpec,
    assemble_pack,
    build_pack_from_sae,
    sae_segment,
)
from monitor.features.build.sae import FORMATS, SAE, detect_format, load_sae

__all__ = [
    "FORMATS",
    "SAE",
    "FeatureSpec",
    "assemble_pack",
    "build_pack_from_sae",
    "detect_format",
    "load_sae",
    "sae_segment",
]
