"""AlertmanagerClient against a real HTTP receiver on 127.0.0.1 that records every POST."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from monitor.fixtures import wait_for
from monitor.outputs.alertmanager import AlertmanagerAlert, AlertmanagerClient


class Receiver:
    def __init__(self) -> None:
        self.posts: list[tuple[float, list[dict]]] = []
        self.fail_next = 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with receiver.lock:
                    failing = receiver.fail_next > 0
                    receiver.fail_next -= int(failing)
                    if not failing and self.path == "/api/v2/alerts":
                        receiver.posts.append((time.time(), body))
                self.send_response(500 if failing else 200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def alerts(self) -> list[dict]:
        with self.lock:
            return [a for _, body in self.posts for a in body]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()
    r.server.server_close()


def alert(conversation: str = "conv-1", rule: str = "sustained-deception") -> AlertmanagerAlert:
    return AlertmanagerAlert(
        rule=rule,
        category="deception",
        severity="critical",
        model="gemma",
        summary=f"deception 2.90 in {conversation}",
        conversation_id=conversation,
        value=2.9,
        labels={"team": "trust-and-safety", "bad-name": "x"},
    )


def parse(ts: str) -> datetime:
    return datetime.fromisoformat(ts.replace("Z", "+00:00"))


def test_fire_dedup_resend_and_resolve(receiver: Receiver) -> None:
    results: list[str] = []
    client = AlertmanagerClient(
        receiver.url,
        resend_interval=0.3,
        resolve_after=1.0,
        on_result=results.append,
        audit_base_url="http://audit/c/",
    )
    try:
        for i in range(5):  # five conversations, one label set: one alert
            client.fire(alert(f"conv-{i}"))
        wait_for(lambda: len(receiver.alerts()) >= 1)
        first = receiver.alerts()[0]
        assert first["labels"] == {
            "alertname": "sustained-deception",
            "category": "deception",
            "severity": "critical",
            "model": "gemma",
            "team": "trust-and-safety",
            "bad_name": "x",
        }
        assert "conversation_id" not in first["labels"]
        assert first["annotations"]["conversation_id"].startswith("conv-")
        assert first["annotations"]["audit_url"].startswith("http://audit/c/conv-")
        assert parse(first["endsAt"]) > datetime.now(UTC)  # active: expires only if not re-sent
        assert client.active_count() == 1
        for _ in range(5):  # keep firing: re-sent every resend_interval
            client.fire(alert("conv-9"))
            time.sleep(0.15)
        assert len(receiver.posts) >= 2
        assert receiver.alerts()[-1]["annotations"]["conversation_id"] == "conv-9"
        # stop firing: resolved with endsAt <= now, then forgotten
        wait_for(lambda: client.active_count() == 0, timeout=5)
        received_at, last = receiver.posts[-1]
        (resolved,) = last
        assert parse(resolved["endsAt"]).timestamp() <= received_at
        assert parse(resolved["startsAt"]) == parse(first["startsAt"])
        assert "error" not in results and results.count("ok") == len(receiver.posts)
    finally:
        client.close(2)


def test_retry_with_backoff_after_server_errors(receiver: Receiver) -> None:
    receiver.fail_next = 2
    results: list[str] = []
    client = AlertmanagerClient(
        receiver.url, resend_interval=60, retry_initial=0.05, on_result=results.append
    )
    try:
        client.fire(alert())
        wait_for(lambda: "ok" in results)
        assert len(receiver.alerts()) == 1
        assert results[:3] == ["error", "error", "ok"]
    finally:
        client.close(2)


def test_unreachable_alertmanager_is_counted_not_raised() -> None:
    results: list[str] = []
    client = AlertmanagerClient(
        "http://127.0.0.1:9", timeout=0.5, retry_initial=0.05, on_result=results.append
    )
    client.fire(alert())
    wait_for(lambda: "error" in results)
    client.close(1)


def test_bounded_queue_drops_and_counts(receiver: Receiver) -> None:
    results: list[str] = []
    client = AlertmanagerClient(receiver.url, max_queue=2, on_result=results.append)
    try:
        started = time.monotonic()
        for i in range(20_000):
            client.fire(alert(rule=f"r{i % 3}"))
        assert time.monotonic() - started < 5  # fire never blocks
        assert client.dropped > 0 and results.count("dropped") == client.dropped
    finally:
        client.close(2)
    # What the bounded queue accepted is delivered; which of the three survived the flood
    # depends on when the sender thread drained it.
    delivered = {a["labels"]["alertname"] for a in receiver.alerts()}
    assert delivered and delivered <= {"r0", "r1", "r2"}


def test_close_flushes_queued_alerts(receiver: Receiver) -> None:
    client = AlertmanagerClient(receiver.url, resend_interval=60)
    client.fire(alert(rule="last-words"))
    client.close(2)
    assert [a["labels"]["alertname"] for a in receiver.alerts()] == ["last-words"]


def test_fired_again_while_its_resolve_is_failing_stays_active(receiver: Receiver) -> None:
    client = AlertmanagerClient(
        receiver.url, resend_interval=0.2, resolve_after=0.5, retry_initial=0.2, retry_max=0.2
    )
    try:
        client.fire(alert("conv-1"))
        wait_for(lambda: len(receiver.alerts()) >= 1)
        receiver.fail_next = 10**6  # the resolve (and everything after) fails for now
        time.sleep(1.0)  # past resolve_after: a resolve is pending, failing
        client.fire(alert("conv-2"))  # ... and the rule fires again
        time.sleep(0.3)
        with receiver.lock:
            receiver.fail_next = 0
        posted = len(receiver.posts)
        wait_for(lambda: len(receiver.posts) > posted, timeout=5)
        latest = receiver.posts[-1][1][-1]
        assert parse(latest["endsAt"]) > datetime.now(UTC)  # active, not resolved
        assert latest["annotations"]["conversation_id"] == "conv-2"
        assert client.active_count() == 1
    finally:
        client.close(2)
