"""The garbage collector's steady-state settings for the long-lived processes (the sidecar
and the capture relay), defined once so the two cannot drift apart. Standard library only:
the relay imports it and never loads torch."""

from __future__ import annotations

import gc

# The collector's first threshold in steady state (CPython's default is 700). The count it
# is compared with is allocations minus deallocations of tracked objects, so 700 is reached
# by the objects a batch (a relay frame, a sidecar step) holds while it is processed, not by
# garbage: at 390 decode steps/s the sidecar ran 10-17 young collections a second, some of
# them 3-4.6 ms long on a busy machine (measured with `gc.callbacks`), each landing in some
# step's send-to-ack time. With 20,000, an 8 s run of decode steps had none at all: what
# outlives a step is far less. Garbage in reference cycles waits longer, bounded by the same
# count.
GEN0_THRESHOLD = 20_000


def settle_heap() -> None:
    """After start-up: freeze what is loaded by now, which lives as long as the process, so
    the collector's full passes leave it out, and raise the young generation's threshold to
    the steady state's (`GEN0_THRESHOLD`), keeping the older generations' as they are.

    Those full passes were stalls: ~90 ms in the sidecar (torch, the packs, gRPC; send-to-ack
    p99 60-70 ms instead of 10-14 ms), 27-31 ms in the relay (gRPC, protobuf, logging: ~30,000
    objects, on a busy 2-core machine), a stall in its sending."""
    gc.collect()
    gc.freeze()
    gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(GEN0_THRESHOLD, gen0), gen1, gen2)
