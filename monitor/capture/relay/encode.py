"""Local encoding in the relay: a CPU model's activations become feature values here, on the
relay's core, instead of in the layer hook on the model's thread.

Why: on a CPU model the pack's GEMM in the hook cost the model's thread about 0.1-0.2 ms per
decode step on top of the capture itself (the hook's CPU 1.8-2.3% of a step against 1.3-1.5%
sending activations; README, "Local encoding"), and a step with feature blocks took the
frame writer's full path instead of its template. Here the hook ships activations through the
ring as for a sidecar that encodes (the cheap path), and the relay, a process of its own on
another core, encodes the hook points the pack covers before sending, so the wire carries the
same `[rows, k]` feature values and pack hash as local encoding in the hook, and the sidecar
skips encoding as before.

torch and the pack are loaded only when the first activations of a covered hook point
arrive: a relay that never sees them (no local encoding, or a model on a GPU, which encodes
on its device in the hook) stays light. A pack the relay cannot load, or whose hash is not
the one the serving process loaded, is logged once and the activations go on unencoded: the
sidecar encodes them itself (it serves the pack, or the hash check would fail anyway), so
nothing is lost and the model is never touched.
"""

from __future__ import annotations

from typing import Any

import structlog

from monitor.wire import pb

log = structlog.get_logger("safety_monitor.capture")

# One torch thread: the relay is a helper meant to take one spare core; intra-op threads would
# spread its GEMM onto the serving process's cores. The values are the hook's bit for bit when
# both encode the same rows (the hook encodes only the rows it sends; a lingering relay
# encodes each step alone) with the same thread count: MKL's rounding of a row can depend on
# how many rows are multiplied together and, for some row counts, on the thread count (a
# 512 x 256 pack: 5 rows on 1 and 2 threads differ in the last bits; torch 2.13, this
# project's 2-core machine, 2026-12-03). A serving process with more torch threads may see
# such last-bit differences; tests/unit/test_relay_encode.py and
# tests/integration/test_relay_encoding_bits.py check the rest.
RELAY_TORCH_THREADS = 1


class RelayFeatureEncoder:
    """Encodes a StepBatch's activations with a feature pack, in place.

    Example (the relay builds one from its settings; `apply` runs on every batch it sends):

        encoder = RelayFeatureEncoder("pack.safetensors", sha256, ("layers.2",))
        encoder.apply(batch)  # layers.2's activations -> a FeatureBlock of the pack
    """

    def __init__(self, path: str, sha256: str, hook_points: tuple[str, ...]) -> None:
        self.path = path
        self.sha256 = sha256
        self.hook_points = frozenset(hook_points)
        self.encoded = 0  # layers encoded (tests, benches)
        self._pack: Any = None
        self._failed = False

    def apply(self, batch: pb.StepBatch) -> None:
        """Replace the covered hook points' activations with the pack's feature values (the
        same FeatureBlock local encoding in the hook sends). Leaves the batch as it is when
        the pack cannot be used (see the module)."""
        layers = batch.layers
        if self._failed or not layers:
            return
        covered = [i for i, layer in enumerate(layers) if layer.hook_point in self.hook_points]
        if not covered or not self._ready():
            return
        from monitor.wire.tensors import decode_tensor, encode_tensor

        pack = self._pack
        for index in reversed(covered):  # deleting from the end keeps the indices valid
            layer = layers[index]
            try:
                activations = decode_tensor(layer.activations, f"layers[{index}].activations")
                values = pack.hook_points[layer.hook_point].encoder.encode(activations)
            except Exception as exc:
                # Malformed or mis-shaped: sent as it is, the sidecar rejects it with the
                # located error it gives any client.
                log.warning(
                    "capture relay: activations not encoded",
                    hook_point=layer.hook_point,
                    error=f"{type(exc).__name__}: {exc}",
                )
                continue
            batch.features.append(
                pb.FeatureBlock(
                    pack=pack.name,
                    pack_sha256=pack.sha256,
                    hook_point=layer.hook_point,
                    values=encode_tensor(values),
                )
            )
            del layers[index]
            self.encoded += 1

    def _ready(self) -> bool:
        """Load torch and the pack once; False (for good) when it cannot be used."""
        if self._pack is not None:
            return True
        try:
            import torch

            from monitor.features import load_pack

            torch.set_num_threads(RELAY_TORCH_THREADS)
            pack = load_pack(self.path)
            if self.sha256 and pack.sha256 != self.sha256:
                raise ValueError(
                    f"sha256 {pack.sha256} is not the serving process's {self.sha256} "
                    "(the file changed after the client loaded it)"
                )
            missing = self.hook_points - set(pack.hook_points)
            if missing:
                raise ValueError(f"no encoder for {sorted(missing)}")
        except Exception as exc:
            self._failed = True
            log.error(
                "capture relay: cannot encode with the pack; sending activations instead",
                pack=self.path,
                error=f"{type(exc).__name__}: {exc}",
            )
            return False
        self._pack = pack
        return True
