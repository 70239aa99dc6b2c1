"""Sidecar memory with never-read streams (issue 14): a real sidecar, 4 streams that each push
30 messages of 16 MiB and never read an event; prints the sidecar's RSS at start, its peak
while the streams are held, and 5 s and 15 s after they are closed.

    PYTHONPATH=. python tests/stream_memory.py WORKDIR [MAX_STREAM_BYTES]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import grpc
import torch

from monitor.fixtures import start_sidecar
from monitor.wire import encode_tensor, pb
from tests.conftest import build_pack_with_cli

D_MODEL = 32
STREAMS = 4
MESSAGES = 30
MESSAGE_BYTES = 16 * 1024 * 1024


def main() -> None:
    work = Path(sys.argv[1])
    work.mkdir(parents=True, exist_ok=True)
    budget = int(sys.argv[2]) if len(sys.argv) > 2 else 64 * 1024 * 1024
    pack = work / "bars.pack.safetensors"
    if not pack.exists():
        build_pack_with_cli(work, d_in=D_MODEL, d_sae=64, hook_layer=1, features=[1])
    rules = work / "rules.yaml"
    rules.write_text(
        "features: {one: bars/1}\nrules:\n  - {rule: r, severity: info, condition: one > 0}\n"
    )
    rows = MESSAGE_BYTES // (D_MODEL * 4)
    limits = {"max_rows_per_batch": rows, "max_stream_bytes": budget}
    sidecar = start_sidecar({"packs": [str(pack)], "rules": [str(rules)], "limits": limits}, work)

    def rss_mib() -> float:
        for line in Path(f"/proc/{sidecar.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
        return 0.0

    message = pb.StepBatch(seq_no=1, model="m")
    message.sequences.append(pb.Sequence(conversation_id="c", rows=rows))
    message.layers.append(
        pb.Layer(hook_point="layers.1", activations=encode_tensor(torch.randn(rows, D_MODEL)))
    )
    data = message.SerializeToString()
    start = rss_mib()
    channels, calls = [], []
    for _ in range(STREAMS):
        channel = grpc.insecure_channel(
            sidecar.target, options=[("grpc.max_send_message_length", 64 << 20)]
        )
        method = channel.stream_stream(
            "/safety_monitor.v1.SafetyMonitor/Monitor", lambda b: b, lambda b: b
        )
        calls.append(method(iter([data] * MESSAGES)))
        channels.append(channel)
    peak = start
    deadline = time.monotonic() + 25
    while time.monotonic() < deadline:
        peak = max(peak, rss_mib())
        time.sleep(0.2)
    for call in calls:
        call.cancel()
    for channel in channels:
        channel.close()
    time.sleep(5)
    after = rss_mib()
    time.sleep(10)
    later = rss_mib()
    sidecar.stop()
    result = {
        "max_stream_bytes_mib": budget >> 20,
        "rss_start_mib": round(start),
        "rss_peak_mib": round(peak),
        "rss_5s_after_close_mib": round(after),
        "rss_15s_after_close_mib": round(later),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
