"""`safety-monitor bench review`: server time of the review page on a large audit store.

Fills a store (a fresh SQLite file unless `--store` names one) with `--conversations` flagged
conversations of a few tokens each plus one conversation of `--long-tokens` tokens with
`--features` recorded features, serves the review page under uvicorn on 127.0.0.1, and requests
the list view (unfiltered, filtered, a page deep in the keyset), and the long conversation's
view. Server time is the app's own `Server-Timing` (request in to response start; the whole
body is rendered by then); the client's round trip over loopback is reported beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import secrets
import socket
import statistics
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from monitor.audit.store import AlertRecord, ConversationWrite, TokenRecord, open_store

RULES = (
    ("sustained-deception", "deception", "critical"),
    ("stereotype-hiring", "bias", "warning"),
    ("bio-uplift", "misuse", "critical"),
    ("secrecy", "deception", "info"),
)
MODELS = ("gemma-2-2b", "llama-3-8b", "qwen3-8b")
LONG_ID = "bench-long-conversation"


def fill_store(
    url: str, conversations: int, long_tokens: int, features: int, seed: int = 0
) -> dict[str, Any]:
    """Write the benchmark's conversations; returns what was written and how long it took."""
    rng = random.Random(seed)
    names = [f"bench/f{i:02d}" for i in range(features)]
    now = datetime.now(UTC)
    store = open_store(url)
    start = time.perf_counter()
    try:
        batch: list[ConversationWrite] = []
        for i in range(conversations):
            at = now - timedelta(seconds=i * 7)
            cid = f"conv-{i:07d}"
            rule, category, severity = RULES[i % len(RULES)]
            tokens = tuple(
                TokenRecord(j, f" t{j}", "assistant", "req", {names[i % features]: rng.random()})
                for j in range(4)
            )
            alert = AlertRecord(
                cid, "req", rule, "rs-bench", category, severity, 2.5, 3, 1, 3,
                {names[i % features]: 2.5}, f"{rule} fired", {}, at,
            )  # fmt: skip
            batch.append(ConversationWrite(cid, MODELS[i % 3], at, (), True, tokens, (alert,)))
            if len(batch) == 2000:
                store.write(batch)
                batch = []
        if batch:
            store.write(batch)
        long_tokens_records = tuple(
            TokenRecord(
                j,
                f" word{j}",
                "user" if j < 64 else "assistant",
                "req-long",
                {n: max(0.0, math.sin(j / (5 + k)) * 3) for k, n in enumerate(names)},
            )
            for j in range(long_tokens)
        )
        spacing = max(1, long_tokens // 8)
        alerts = tuple(
            _long_alert(RULES[k % 4], p, names[0], now)
            for k, p in enumerate(range(200, long_tokens, spacing))
        )
        store.write(
            [
                ConversationWrite(
                    LONG_ID, "gemma-2-2b", now + timedelta(seconds=1), ("layers.12",), True,
                    long_tokens_records, alerts,
                )
            ]
        )  # fmt: skip
    finally:
        store.close()
    return {"fill_seconds": round(time.perf_counter() - start, 1)}


def _long_alert(rule: tuple[str, str, str], at: int, feature: str, now: datetime) -> AlertRecord:
    name, category, _ = rule
    return AlertRecord(
        LONG_ID, "req-long", name, "rs-bench", category, "critical", 2.9, at, at - 16, at,
        {feature: 2.9}, "fired", {}, now,
    )  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _timed_get(url: str, token: str) -> tuple[float, float, float, int]:
    """(server wall ms, server CPU ms, client round trip ms, body bytes) of one GET."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=60) as response:
        body = response.read()
        timings = response.headers.get_all("server-timing") or []
    client_ms = (time.perf_counter() - start) * 1000
    durations = {}
    for entry in ",".join(timings).split(","):
        name, _, dur = entry.strip().partition(";dur=")
        if dur:
            durations[name] = float(dur)
    return durations.get("app", math.nan), durations.get("cpu", math.nan), client_ms, len(body)


def _summary(samples: list[tuple[float, float, float, int]]) -> dict[str, float]:
    server = sorted(s for s, _, _, _ in samples)
    cpu = sorted(c for _, c, _, _ in samples)
    client = sorted(c for _, _, c, _ in samples)

    def p(values: list[float], q: float) -> float:
        return round(values[min(len(values) - 1, math.ceil(q * len(values)) - 1)], 2)

    return {
        "requests": len(samples),
        "server_p50_ms": p(server, 0.5),
        "server_p95_ms": p(server, 0.95),
        "server_max_ms": round(server[-1], 2),
        "cpu_p50_ms": p(cpu, 0.5),
        "cpu_p95_ms": p(cpu, 0.95),
        "client_p50_ms": round(statistics.median(client), 2),
        "client_p95_ms": p(client, 0.95),
        "bytes": samples[-1][3],
    }


def run_review_bench(
    conversations: int,
    long_tokens: int,
    features: int,
    requests: int,
    store_url: str | None = None,
    workdir: Path | None = None,
) -> dict[str, Any]:
    """Fill a store, serve the page, time each view `requests` times (after 3 warm-ups)."""
    import uvicorn

    from monitor.audit.review.app import create_app, page_cursor
    from monitor.audit.review.config import AuthSettings, ReviewConfig, TokenEntry

    tmp = None
    if store_url is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-review-", dir=workdir)
        store_url = f"sqlite:///{Path(tmp.name) / 'audit.db'}"
    report: dict[str, Any] = {
        "store": store_url.split(":")[0],
        "load_average_1m": round(os.getloadavg()[0], 1),
        "cpus": os.cpu_count(),
        "conversations": conversations + 1,
        "long_tokens": long_tokens,
        "features": features,
    }
    report.update(fill_store(store_url, conversations, long_tokens, features))
    token = secrets.token_hex(16)
    port = _free_port()
    config = ReviewConfig(
        store=store_url,
        listen=f"127.0.0.1:{port}",
        auth=AuthSettings(tokens=(TokenEntry("bench", token),)),
    )
    app = create_app(config)
    server = uvicorn.Server(
        uvicorn.Config(app.asgi, host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, name="review-bench-server", daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the review server did not start within 30 s")
            time.sleep(0.05)
        middle = datetime.now(UTC) - timedelta(seconds=(conversations // 2) * 7)
        cursor = urllib.parse.quote(page_cursor(middle, f"conv-{conversations // 2:07d}"), safe="")
        views = {
            "list": "/conversations",
            "list_filtered": "/conversations?rule=bio-uplift&model=llama-3-8b&status=unreviewed",
            "list_deep_page": f"/conversations?after={cursor}",
            "conversation_4096": f"/conversations/{LONG_ID}",
        }
        results = {}
        for name, path in views.items():
            for _ in range(3):
                _timed_get(base + path, token)
            results[name] = _summary([_timed_get(base + path, token) for _ in range(requests)])
        report["views"] = results
        # Side by side, same process and moment: the store's own full read of the long
        # conversation (what `audit show` does), so a contended machine's numbers can be read
        # as a ratio.
        reference = open_store(store_url)
        try:
            times = []
            for _ in range(min(requests, 20)):
                start = time.perf_counter()
                reference.get_conversation(LONG_ID)
                times.append((time.perf_counter() - start) * 1000)
        finally:
            reference.close()
        report["reference_get_conversation_p50_ms"] = round(statistics.median(times), 2)
    finally:
        server.should_exit = True
        thread.join(10)
        app.close()
        if tmp is not None:
            tmp.cleanup()
    return report


def format_table(report: dict[str, Any]) -> str:
    lines = [
        f"review page on {report['store']}: {report['conversations']:,} conversations, one of "
        f"{report['long_tokens']:,} tokens x {report['features']} features "
        f"(store filled in {report['fill_seconds']} s)",
        f"load average {report['load_average_1m']} on {report['cpus']} CPUs at the start; "
        "server = wall time in the app, cpu = its handler thread's CPU time",
        f"{'view':<20}{'server p50':>12}{'server p95':>12}{'cpu p50':>12}{'cpu p95':>12}"
        f"{'client p95':>12}{'bytes':>11}",
    ]
    for name, r in report["views"].items():
        lines.append(
            f"{name:<20}{r['server_p50_ms']:>10.1f}ms{r['server_p95_ms']:>10.1f}ms"
            f"{r['cpu_p50_ms']:>10.1f}ms{r['cpu_p95_ms']:>10.1f}ms"
            f"{r['client_p95_ms']:>10.1f}ms{r['bytes']:>11,}"
        )
    lines.append(
        f"reference: the store's get_conversation of the long conversation (audit show), "
        f"p50 {report['reference_get_conversation_p50_ms']:.1f}ms in the same run"
    )
    return "\n".join(lines)


def add_bench_review_command(bench_subparsers: argparse._SubParsersAction) -> None:
    """Register ``review`` on the ``bench`` command's subparsers (sets ``handler``)."""
    parser = bench_subparsers.add_parser("review", help="review page server time, large store")
    parser.add_argument("--conversations", type=int, default=100_000)
    parser.add_argument("--long-tokens", type=int, default=4096, help="the long conversation")
    parser.add_argument("--features", type=int, default=16, help="recorded features per token")
    parser.add_argument("--requests", type=int, default=100, help="timed requests per view")
    parser.add_argument("--store", help="store URL to fill (default: a fresh SQLite file)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(handler=_bench_review)


def _bench_review(args: argparse.Namespace) -> int:
    report = run_review_bench(
        args.conversations, args.long_tokens, args.features, args.requests, args.store
    )
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0
