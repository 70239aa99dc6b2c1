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

torch and the pack are loaded on a thread of their own as the relay starts (the client asks
for it only when its pack will run here: `encode_in="relay"`, or "auto" on a host without
CUDA), so the relay keeps sending while they load (1-3 s: loaded on the sending thread, the
first frame waited that long and a small ring filled up and dropped steps). Until the pack is
ready, and for good if it cannot be used (a file the relay cannot load, or whose hash is not
the one the serving process loaded: logged once), the activations go on unencoded: a sidecar
serving the pack encodes them itself, so nothing is lost and the model is never touched. The
ring's `Slot.ENCODER` tells the client which (`CaptureClient.relay_encoder`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
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

# `Slot.ENCODER` of the ring: 0 while loading (or not asked to encode), then one of these.
ENCODER_READY = 1
ENCODER_FAILED = 2


class RelayFeatureEncoder:
    """Encodes a StepBatch's activations with a feature pack, in place.

    Example (the relay builds one from its settings; `apply` runs on every batch it sends):

        encoder = RelayFeatureEncoder("pack.safetensors", sha256, ("layers.2",))
        encoder.start()  # loads torch and the pack on a thread of its own
        encoder.apply(batch)  # once loaded: layers.2's activations -> a FeatureBlock
    """

    def __init__(
        self,
        path: str,
        sha256: str,
        hook_points: tuple[str, ...],
        on_state: Callable[[int], None] = lambda state: None,
    ) -> None:
        self.path = path
        self.sha256 = sha256
        self.hook_points = frozenset(hook_points)
        self.on_state = on_state  # ENCODER_READY / ENCODER_FAILED, once loaded or failed
        self.encoded = 0  # layers encoded (tests, benches)
        self._pack: Any = None  # set once, by the loading thread: then it is used
        self._encoding_thread: int | None = None  # where torch's thread count was last set
        self._loaded = threading.Event()

    @property
    def ready(self) -> bool:
        """The pack is loaded: covered activations are encoded from now on."""
        return self._pack is not None

    def start(self) -> None:
        """Load torch and the pack on a daemon thread (`apply` sends activations unencoded
        until they are loaded)."""
        threading.Thread(target=self.load, name="relay-pack-load", daemon=True).start()

    def wait(self, timeout: float) -> bool:
        """Wait for the load to end (loaded or failed); whether it is ready."""
        self._loaded.wait(timeout)
        return self.ready

    def apply(self, batch: pb.StepBatch) -> None:
        """Replace the covered hook points' activations with the pack's feature values (the
        same FeatureBlock local encoding in the hook sends, in the same order). Leaves the
        batch as it is while the pack is not loaded (see the module)."""
        pack = self._pack
        layers = batch.layers
        if pack is None or not layers:
            return
        covered = [i for i, layer in enumerate(layers) if layer.hook_point in self.hook_points]
        if not covered:
            return
        from monitor.wire.tensors import decode_tensor, encode_tensor

        if self._encoding_thread != threading.get_ident():
            # torch's intra-op thread count is set per calling thread (OpenMP's), so the
            # thread that encodes sets it, not the one that loaded the pack.
            import torch

            torch.set_num_threads(RELAY_TORCH_THREADS)
            self._encoding_thread = threading.get_ident()
        blocks, encoded = [], []
        for index in covered:
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
            blocks.append(
                pb.FeatureBlock(
                    pack=pack.name,
                    pack_sha256=pack.sha256,
                    hook_point=layer.hook_point,
                    values=encode_tensor(values),
                )
            )
            encoded.append(index)
        for index in reversed(encoded):  # deleting from the end keeps the indices valid
            del layers[index]
        batch.features.extend(blocks)  # in layer order, as the hook's
        self.encoded += len(encoded)

    def load(self) -> None:
        """Load torch and the pack (`start` runs this on its thread); on failure log once and
        leave the encoder unready for good."""
        try:
            import torch

            from monitor.features import load_pack

            torch.set_num_threads(RELAY_TORCH_THREADS)  # this thread's (see `apply`)
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
            log.error(
                "capture relay: cannot encode with the pack; sending activations instead",
                pack=self.path,
                error=f"{type(exc).__name__}: {exc}",
            )
            self.on_state(ENCODER_FAILED)
            self._loaded.set()
            return
        self._pack = pack
        self.on_state(ENCODER_READY)
        self._loaded.set()
