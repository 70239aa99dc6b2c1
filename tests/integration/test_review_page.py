"""The review page end to end: `safety-monitor audit serve` as a real process on a real SQLite
store, driven over HTTP and by a real headless Chromium (Debian's `chromium`, through
Playwright; `make test` installs it, nothing is downloaded at run time).

One server and one browser for the module; each browser test gets its own context (cookies).
Screenshots of both views are written under pytest's tmp dir; with
SAFETY_MONITOR_UPDATE_SCREENSHOTS=1 they are also copied to docs/screenshots/ for the README.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from html import escape as html_escape
from pathlib import Path
from typing import Any

import pytest
import torch

from monitor.audit.labels import labels_for
from monitor.audit.redaction import Redactor, redact_identifier
from monitor.audit.store import AlertRecord, ConversationWrite, TokenRecord, open_store
from monitor.features import FeatureInfo, FeaturePack, HookPointEncoder, RestrictedEncoder
from monitor.features import save_pack as save_feature_pack
from monitor.outputs.alertmanager import AlertmanagerAlert, AlertmanagerClient

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("SAFETY_MONITOR_CHROMIUM", "/usr/bin/chromium")
TOKEN = "alice-" + "s3cret" * 6
NOW = datetime.now(UTC).replace(microsecond=0)
MAIN = "conv-main/0"  # a slash, as `num_return_sequences` ids have: the link must encode it
HOSTILE = "conv-<script>hostile"
MEGA = 1_000_000
STOPS = [(16, 16, 48), (200, 40, 60), (255, 230, 90)]  # = conversation.js


# --- data -----------------------------------------------------------------------------------


def deception(i: int) -> float:
    return round(max(0.0, 3.0 * math.sin(i / 9.0)), 4)


def harm(i: int) -> float:
    return round(4.0 * math.exp(-(((i - 80) / 6.0) ** 2)), 4)


def _alert(cid: str, rule: str, severity: str, start: int, end: int, value: float, **kw: Any):
    return AlertRecord(
        cid, "req-1", rule, kw.get("hash", "rs-7f3a9c"), kw.get("category", "deception"),
        severity, value, end, start, end, kw.get("fv", {"p/deception": value}),
        kw.get("message", f"{rule}: {value:.2f} at tokens {start}-{end}"), {}, NOW,
    )  # fmt: skip


def main_conversation() -> ConversationWrite:
    tokens = [TokenRecord(i, f" w{i}", "user", "req-0", {}) for i in range(10)]
    for i in range(10, 120):
        text = f" tok{i}"
        if i == 40:
            text = " [EMAIL]"  # what the recorder stored in place of an address
        features = {"p/deception": deception(i), "p/harm": harm(i)}
        tokens.append(TokenRecord(i, text, "assistant", "req-1", features))
    alerts = (
        _alert(MAIN, "sustained-deception", "critical", 20, 30, 2.91),
        _alert(MAIN, "harm-spike", "warning", 78, 82, 4.0, category="misuse",
               fv={"p/harm": 4.0}, hash="rs-7f3a9c"),
    )  # fmt: skip
    return ConversationWrite(MAIN, "gemma-2-2b", NOW, ("layers.12",), True, tuple(tokens), alerts)


def hostile_conversation() -> ConversationWrite:
    texts = [
        "<script>window.__pwned = 1</script>",
        '<img src=x onerror="window.__pwned = 2">',
        "&lt;b&gt;entity&amp;",
        "\u202egnp.exe",
        "line one\nline two",
        "A" * MEGA,
        "<b>not bold</b>",
    ]
    tokens = tuple(
        TokenRecord(i, t, "assistant", "req-h", {"p/deception": float(i)})
        for i, t in enumerate(texts)
    )
    alert = _alert(HOSTILE, "<script>rule", "critical", 0, 6, 6.0,
                   message="<img src=x onerror=window.__pwned=3>")  # fmt: skip
    return ConversationWrite(HOSTILE, "<i>model</i>", NOW, (), True, tokens, (alert,))


def filler() -> list[ConversationWrite]:
    out = []
    for i in range(30):
        model = "llama-3-8b" if i % 2 else "gemma-2-2b"
        rule, category, severity = (
            ("stereotype", "bias", "warning") if i % 5 == 0 else ("misuse-bio", "misuse", "info")
        )
        cid = f"conv-{i:03d}"
        tokens = tuple(
            TokenRecord(j, f" t{j}", "assistant", "r", {"p/harm": float(j % 3)}) for j in range(8)
        )
        alert = _alert(cid, rule, severity, 2, 4, 1.5, category=category, fv={"p/harm": 1.5})
        at = NOW - timedelta(hours=i + 1)
        out.append(ConversationWrite(cid, model, at, (), True, tokens, (alert,)))
    return out


def write_pack(path: Path) -> None:
    encoder = RestrictedEncoder(
        weight=torch.randn(8, 2, generator=torch.Generator().manual_seed(0)),
        bias=torch.zeros(2),
        floor=torch.full((2,), -math.inf),
        normalization="none",
    )
    features = [
        FeatureInfo("deception", "layers.12", "identity", None, category="deception",
                    description="states something it represents as false"),
        FeatureInfo("harm", "layers.12", "identity", None, category="misuse",
                    description="intent to cause physical harm"),
    ]  # fmt: skip
    save_feature_pack(
        FeaturePack("p", {"layers.12": HookPointEncoder("layers.12", encoder, features)}), path
    )


# --- the server ---------------------------------------------------------------------------------


@dataclass
class Server:
    base: str
    store_url: str
    workdir: Path
    process: subprocess.Popen[bytes]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    workdir = tmp_path_factory.mktemp("review")
    store_url = f"sqlite:///{workdir / 'audit.db'}"
    store = open_store(store_url)
    store.write([main_conversation(), hostile_conversation(), *filler()])
    store.write(
        [
            ConversationWrite(
                "conv-csrf", "m", NOW - timedelta(days=9), (), True,
                (TokenRecord(0, "x", "assistant", "r", {"p/harm": 1.0}),),
                (_alert("conv-csrf", "x", "info", 0, 0, 1.0, fv={"p/harm": 1.0}),),
            )
        ]
    )  # fmt: skip
    store.close()
    # A damaged row (hand-edited, or a bug): its line break must not shift later tokens' values.
    with sqlite3.connect(workdir / "audit.db") as db:
        db.execute(
            "UPDATE tokens SET features = ? WHERE conversation_id = ? AND position = 2",
            ('not json\r\n{"p/deception": 99}</script><script>window.__pwned=4</script>', HOSTILE),
        )
    write_pack(workdir / "p.pack.safetensors")
    (workdir / "alice.token").write_text(TOKEN + "\n")
    port = _free_port()
    (workdir / "review.yaml").write_text(
        json.dumps(
            {
                "store": "sqlite:///audit.db",
                "listen": f"127.0.0.1:{port}",
                "packs": ["p.pack.safetensors"],
                "page_size": 20,
                "auth": {
                    "tokens": [{"name": "alice", "token_file": "alice.token"}],
                    "identity_header": "X-Forwarded-Email",
                    "allowed_identities": ["bob@example.com"],
                },
            }
        )
    )
    log = (workdir / "server.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "monitor.cli", "audit", "serve", "--config", "review.yaml"],
        cwd=workdir,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(base + "/healthz", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"review server did not start: {(workdir / 'server.log').read_text()}")
        time.sleep(0.1)
    try:
        yield Server(base, store_url, workdir, process)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        log.close()


def fetch(
    server: Server, path: str, headers: dict[str, str] | None = None, data: bytes | None = None
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(server.base + path, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=20) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def bearer() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


# --- HTTP-level ---------------------------------------------------------------------------------

PROTECTED = [
    "/conversations",
    "/conversations/conv-main%2F0",
    "/export/conv-main%2F0",
]


def test_requests_without_credentials_get_401(server: Server) -> None:
    for path in PROTECTED:
        status, _, body = fetch(server, path)
        assert status == 401, path
        assert b"gemma-2-2b" not in body and b"tok1" not in body  # nothing of the store leaks
        assert fetch(server, path, {"Authorization": "Bearer wrong-token-000000"})[0] == 401
        assert fetch(server, path, {"X-Forwarded-Email": "mallory@example.com"})[0] == 401
        assert fetch(server, path, bearer())[0] == 200
        assert fetch(server, path, {"X-Forwarded-Email": "Bob@Example.com"})[0] == 200
    body = json.dumps({"verdict": "true_positive"}).encode()
    headers = {"Content-Type": "application/json"}
    assert fetch(server, "/api/alerts/1/labels", headers, body)[0] == 401
    assert fetch(server, "/healthz")[0] == 200  # for probes; says nothing about the store's data


def test_pages_carry_a_strict_csp_and_no_inline_script(server: Server) -> None:
    for path in PROTECTED[:2]:
        status, headers, body = fetch(server, path, bearer())
        assert status == 200
        csp = headers["content-security-policy"]
        assert "script-src 'self'" in csp and "default-src 'none'" in csp
        assert "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
        html = body.decode()
        for chunk in html.split("<script")[1:]:
            tag = chunk.split(">", 1)[0]
            assert (
                'src="/static/' in tag
                or 'type="application/json"' in tag
                or ('type="text/plain"' in tag)
            ), tag
        assert "http://" not in html.replace(server.base, "") and "https://" not in html


def _login_cookie(server: Server) -> str:
    body = f"token={TOKEN}&next=/conversations".encode()
    opener = urllib.request.build_opener(_NoRedirect)
    request = urllib.request.Request(
        server.base + "/login",
        data=body,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    try:
        opener.open(request, timeout=10)
    except urllib.error.HTTPError as exc:
        assert exc.code == 303
        cookie = exc.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie
        return cookie.split(";", 1)[0]
    raise AssertionError("login did not redirect")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def test_label_writes_need_the_csrf_token(server: Server) -> None:
    cookie = _login_cookie(server)
    status, _, page = fetch(server, "/conversations/conv-csrf", {"Cookie": cookie})
    assert status == 200
    csrf = page.decode().split('name="csrf-token" content="', 1)[1].split('"', 1)[0]
    store = open_store(server.store_url)
    record = store.get_conversation("conv-csrf")
    assert record is not None
    path = f"/api/alerts/{record.alerts[0].id}/labels"
    body = json.dumps({"verdict": "false_positive", "note": "csrf test"}).encode()
    json_type = {"Content-Type": "application/json"}
    assert fetch(server, path, {**json_type, "Cookie": cookie}, body)[0] == 403
    wrong = {**json_type, "Cookie": cookie, "X-CSRF-Token": "0" * 64}
    assert fetch(server, path, wrong, body)[0] == 403
    good = {**json_type, "Cookie": cookie, "X-CSRF-Token": csrf}
    cross = {**good, "Origin": "http://evil.example"}
    assert fetch(server, path, cross, body)[0] == 403
    form = {**good, "Content-Type": "application/x-www-form-urlencoded"}
    assert fetch(server, path, form, body)[0] == 415
    assert labels_for(store, "conv-csrf") == []
    status, _, answer = fetch(server, path, good, body)
    assert status == 201 and json.loads(answer)["label"]["labeler"] == "alice"
    # A bearer token is never sent by a browser on its own: no CSRF token needed.
    assert fetch(server, path, {**json_type, **bearer()}, body)[0] == 201
    # A proxy identity is ambient (the proxy adds it): CSRF needed, bound to that identity.
    bob = {**json_type, "X-Forwarded-Email": "bob@example.com", "X-CSRF-Token": csrf}
    assert fetch(server, path, bob, body)[0] == 403
    assert [lab.labeler for lab in labels_for(store, "conv-csrf")] == ["alice", "alice"]
    store.close()


def test_out_of_range_filters_and_alert_ids_are_client_errors(server: Server) -> None:
    # Times before year 1 and ids past 64 bits are the request's fault: 400/404 with a
    # message, not an unhandled 500 or a "store failed" 503.
    for query in (
        "since=99999999d",
        "until=9999999999999h",
        "since=0001-01-01T00:00:00%2B05:00",
        # a page cursor of ["0001-01-01T00:00:00+05:00", "x"]
        "after=WyIwMDAxLTAxLTAxVDAwOjAwOjAwKzA1OjAwIiwgIngiXQ",
    ):
        status, _, body = fetch(server, f"/conversations?{query}", bearer())
        assert status == 400, (query, status)
        assert b"Internal Server Error" not in body
    headers = {"Content-Type": "application/json", **bearer()}
    body = json.dumps({"verdict": "true_positive"}).encode()
    status, _, answer = fetch(server, f"/api/alerts/{2**64}/labels", headers, body)
    assert (status, json.loads(answer)) == (400, {"error": f"no alert {2**64}"})


def test_the_alert_link_finds_a_conversation_stored_under_a_redacted_id(server: Server) -> None:
    # The recorder stores an id with personal data redacted (plus a digest); the sidecar's
    # Alertmanager link carries the id as the client sent it. The page finds it both ways.
    sent = "conv:carol@example.com:7"
    stored = redact_identifier(Redactor(), sent)
    assert stored != sent and "carol" not in stored
    store = open_store(server.store_url)
    token = TokenRecord(0, "x", "assistant", "r", {"p/harm": 1.0})
    alert = _alert(stored, "pii-link", "info", 0, 0, 1.0, fv={"p/harm": 1.0})
    # Old, like conv-csrf: the list-view tests see the same first page with it or without.
    old = NOW - timedelta(days=10)
    store.write([ConversationWrite(stored, "m", old, (), True, (token,), (alert,))])
    store.close()
    path = _alertmanager_link(server.base, sent).removeprefix(server.base)
    status, _, page = fetch(server, path, bearer())
    assert status == 200, (path, status)
    assert html_escape(stored) in page.decode() and "carol" not in page.decode()
    status, headers, body = fetch(server, path.replace("/conversations/", "/export/"), bearer())
    assert status == 200 and json.loads(body)["summary"]["conversation_id"] == stored
    assert "carol" not in headers["content-disposition"]


def _raw_post(server: Server, path: str, head: str, body: bytes) -> bytes:
    """Send a POST's head and `body` (maybe less than it declares) and read the answer."""
    host, port = server.base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        request = f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{head}\r\n"
        conn.sendall(request.encode() + body)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = conn.recv(4096)  # socket.timeout here: the server waits for the body
            if not chunk:
                break
            answer += chunk
        return answer


def test_oversized_bodies_are_refused_before_they_are_read(server: Server) -> None:
    # /login is open to anyone: a declared 10 GB body is answered at once, not buffered.
    form = "Content-Type: application/x-www-form-urlencoded\r\n"
    answer = _raw_post(server, "/login", form + "Content-Length: 10000000000\r\n", b"token=")
    assert answer.startswith(b"HTTP/1.1 413"), answer[:100]
    # Without a length (chunked), reading stops at the limit: the final chunk never comes.
    chunk = b"a" * 4096
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(3))
    answer = _raw_post(server, "/login", form + "Transfer-Encoding: chunked\r\n", body)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:100]
    headers = "Content-Type: application/json\r\n" + f"Authorization: Bearer {TOKEN}\r\n"
    answer = _raw_post(
        server, "/api/alerts/1/labels", headers + "Content-Length: 99999999\r\n", b"{"
    )
    assert answer.startswith(b"HTTP/1.1 413"), answer[:100]


# --- the browser --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} missing: `apt-get install chromium` (make test installs it)")
    with sync_playwright() as pw:
        instance = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield instance
        instance.close()


@pytest.fixture
def page(browser: Any, server: Server) -> Iterator[Any]:
    context = browser.new_context(
        base_url=server.base, viewport={"width": 1400, "height": 900}, accept_downloads=True
    )
    page = context.new_page()
    page.set_default_timeout(15_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.errors = errors
    yield page
    context.close()
    assert not errors, errors  # the page script never throws, hostile data or not


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("screenshots")


def _screenshot(page: Any, shots: Path, name: str) -> None:
    path = shots / name
    page.screenshot(path=str(path), full_page=False)
    assert path.stat().st_size > 10_000
    if os.environ.get("SAFETY_MONITOR_UPDATE_SCREENSHOTS") == "1":
        target = REPO / "docs" / "screenshots"
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / name)


def login(page: Any, path: str = "/conversations") -> None:
    response = page.goto(path)
    assert response.status == 401
    page.fill("#token", TOKEN)
    page.click("#login-submit")
    page.wait_for_url(f"**{path.split('?')[0]}*")


def open_conversation(page: Any, url: str) -> None:
    page.goto(url)
    if page.locator("#login-form").count():
        page.fill("#token", TOKEN)
        page.click("#login-submit")
    page.wait_for_selector("body[data-ready=true]")


def test_login_filter_and_open_a_conversation(page: Any, shots: Path) -> None:
    login(page)
    assert page.inner_text("#identity") == "alice"
    rows = page.locator("tr.row")
    assert rows.count() == 20  # page_size
    assert rows.first.get_attribute("data-conversation") in (MAIN, HOSTILE)
    page.click("#next-page")
    assert 1 <= page.locator("tr.row").count() <= 20
    page.goto("/conversations")
    page.select_option("select[name=severity]", "warning")
    page.fill("input[name=model]", "gemma-2-2b")
    page.click("#apply")
    page.wait_for_url("**severity=warning**")
    ids = page.locator("tr.row").evaluate_all("rows => rows.map(r => r.dataset.conversation)")
    # conv-000, -010, -020 are gemma bias warnings; MAIN has a warning alert too.
    assert sorted(ids) == sorted([MAIN, "conv-000", "conv-010", "conv-020"])
    page.goto("/conversations?status=unreviewed&rule=stereotype")
    assert page.locator("tr.row").count() == 6
    page.goto("/conversations?severity=warning&model=gemma-2-2b")
    _screenshot(page, shots, "review-list.png")
    page.click(f"tr.row[data-conversation='{MAIN}'] a")
    page.wait_for_selector("body[data-ready=true]")
    assert page.inner_text("#conversation-id") == MAIN
    assert page.url.endswith("/conversations/conv-main%2F0")


def _alertmanager_link(base: str, cid: str) -> str:
    client = AlertmanagerClient("http://127.0.0.1:9", audit_base_url=f"{base}/conversations")
    try:
        alert = AlertmanagerAlert(
            rule="sustained-deception", category="deception", severity="critical",
            model="gemma-2-2b", conversation_id=cid, request_id="req-1", value=2.9,
            summary="s", description="", labels={}, annotations={},
        )  # fmt: skip
        return client._annotations(alert)["audit_url"]  # the sidecar's own link format
    finally:
        client.close(0.1)


def _expected_rgb(x: float) -> tuple[int, ...]:
    t = max(0.0, min(1.0, x)) * (len(STOPS) - 1)
    i = min(len(STOPS) - 2, math.floor(t))
    f = t - i
    return tuple(math.floor(c + (STOPS[i + 1][j] - c) * f + 0.5) for j, c in enumerate(STOPS[i]))


def _pixel(page: Any, canvas: str, x: int, y: int) -> list[int]:
    return page.evaluate(
        "([sel, x, y]) => Array.from(document.querySelector(sel).getContext('2d')"
        ".getImageData(x, y, 1, 1).data)",
        [canvas, x, y],
    )


def test_heat_map_cells_and_alert_markers_match_the_store(
    page: Any, server: Server, shots: Path
) -> None:
    link = _alertmanager_link(server.base, MAIN)
    assert link == f"{server.base}/conversations/conv-main%2F0"
    open_conversation(page, link)
    record = open_store(server.store_url).get_conversation(MAIN)
    assert record is not None
    names = page.locator(".fname").evaluate_all("rows => rows.map(r => r.dataset.feature)")
    assert names == ["p/deception", "p/harm"]
    canvas = page.locator("#heatmap")
    cell_w = int(canvas.get_attribute("data-cell-width"))
    row_h = int(canvas.get_attribute("data-row-height"))
    assert int(canvas.evaluate("c => c.width")) == cell_w * len(record.tokens)
    peaks = {n: max(t.features.get(n, -1.0) for t in record.tokens) for n in names}
    for fi, name in enumerate(names):
        for ti in (10, 25, 40, 63, 80, 119):
            token = record.tokens[ti]
            x, y = ti * cell_w + cell_w // 2, fi * row_h + row_h // 2
            page.hover("#heatmap", position={"x": x, "y": y})
            readout = page.locator("#cell-readout")
            assert readout.get_attribute("data-feature") == name
            assert int(readout.get_attribute("data-position")) == token.position
            assert float(readout.get_attribute("data-value")) == token.features[name]
            expected = _expected_rgb(token.features[name] / peaks[name])
            got = _pixel(page, "#heatmap", x, y)
            assert all(abs(a - b) <= 1 for a, b in zip(got[:3], expected, strict=True)), (
                name, ti, got, expected,
            )  # fmt: skip
    for ti in (0, 9):  # user tokens have no recorded values: the "missing" grey
        assert _pixel(page, "#heatmap", ti * cell_w + 1, 1)[:3] == [60, 60, 60]
    # Alert markers: one per stored alert, at its first token, with rule, value, output, hash.
    markers = page.locator(".alert-marker")
    assert markers.count() == len(record.alerts) == 2
    for alert in record.alerts:
        marker = page.locator(f".alert-marker[data-alert-id='{alert.id}']")
        assert marker.inner_text() == f"\u2691 {alert.rule}"
        following = marker.evaluate("m => m.nextElementSibling.dataset.pos")
        assert int(following) == alert.start
        card = page.locator(f"#alert-{alert.id}")
        assert card.locator(".f-output").inner_text() == alert.message
        assert card.locator(".f-rule-set").inner_text() == alert.rule_set_hash
        assert float(card.locator(".f-value").inner_text()) == pytest.approx(alert.value, 1e-3)
        in_span = page.locator(".tok.in-alert").evaluate_all(
            "ts => ts.map(t => Number(t.dataset.pos))"
        )
        assert set(range(alert.start, alert.end + 1)) <= set(in_span)
        strip_x = alert.start * cell_w + cell_w // 2
        assert _pixel(page, "#alert-strip", strip_x, 5)[3] == 255  # drawn over the span
    assert _pixel(page, "#alert-strip", 50 * cell_w, 5)[3] == 0  # no alert there
    # The redacted address is shown as such.
    assert page.locator(".tok[data-pos='40'] .redacted").inner_text() == "[EMAIL]"
    _screenshot(page, shots, "review-conversation.png")


def test_scrubbing_a_feature_highlights_its_tokens(page: Any, server: Server) -> None:
    open_conversation(page, f"{server.base}/conversations/conv-main%2F0")
    record = open_store(server.store_url).get_conversation(MAIN)
    assert record is not None
    page.hover(".fname[data-feature='p/harm']")
    assert page.inner_text("#feature-name") == "p/harm"
    assert "intent to cause physical harm" in page.inner_text("#feature-description")
    values = {t.position: t.features.get("p/harm") for t in record.tokens}
    peak_pos = max((v, -p) for p, v in values.items() if v is not None)
    assert f"at token {-peak_pos[1]}" in page.inner_text("#feature-peak")
    expected = sorted(p for p, v in values.items() if v is not None and v >= 0.5 * peak_pos[0])
    hot = page.locator(".tok.hot").evaluate_all("ts => ts.map(t => Number(t.dataset.pos))")
    assert sorted(hot) == expected == list(range(76, 85))
    colour = page.locator(f".tok[data-pos='{-peak_pos[1]}']").evaluate(
        "t => getComputedStyle(t).backgroundColor"
    )
    assert colour == "rgb(255, 140, 0)"
    # Scrub along the deception row of the heat map: the selection follows the cursor.
    cell_w = int(page.locator("#heatmap").get_attribute("data-cell-width"))
    page.hover("#heatmap", position={"x": 30 * cell_w + 1, "y": 3})
    assert page.inner_text("#feature-name") == "p/deception"
    hot = page.locator(".tok.hot").evaluate_all("ts => ts.map(t => Number(t.dataset.pos))")
    peak = max(deception(i) for i in range(10, 120))
    assert sorted(hot) == [i for i in range(10, 120) if deception(i) >= 0.5 * peak]
    # The keyboard scrubs too: down to the next feature, right to the next token.
    page.focus("#heatmap")
    page.keyboard.press("ArrowDown")
    page.keyboard.press("ArrowRight")
    assert page.inner_text("#feature-name") == "p/harm"
    assert page.locator("#cell-readout").get_attribute("data-position") == "31"
    page.keyboard.press("ArrowUp")
    assert page.inner_text("#feature-name") == "p/deception"
    hot = page.locator(".tok.hot").evaluate_all("ts => ts.map(t => Number(t.dataset.pos))")
    assert sorted(hot) == [i for i in range(10, 120) if deception(i) >= 0.5 * peak]


def test_label_an_alert_and_find_it_in_the_labeled_export(page: Any, server: Server) -> None:
    from playwright.sync_api import expect

    login(page, "/conversations/conv-main%2F0")
    page.wait_for_selector("body[data-ready=true]")
    record = open_store(server.store_url).get_conversation(MAIN)
    assert record is not None
    harm_alert = next(a for a in record.alerts if a.rule == "harm-spike")
    card = page.locator(f"#alert-{harm_alert.id}")
    assert card.locator(".label-status").inner_text() == "not reviewed"
    card.locator("textarea.note").fill("quoting a news story, not intent")
    card.locator("button[data-verdict='false_positive']").click()
    # (wait_for_function evaluates a string: the page's CSP forbids that, so poll a locator.)
    expect(card.locator(".label-status")).to_have_attribute("data-verdict", "false_positive")
    assert "by alice" in card.locator(".label-status").inner_text()
    out = server.workdir / "labeled.jsonl"
    subprocess.run(
        [sys.executable, "-m", "monitor.cli", "audit", "export", "--store", server.store_url,
         "--labeled", "--out", str(out)],
        check=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    records = [json.loads(line) for line in out.read_text().splitlines()]
    mine = [r for r in records if r["id"] == f"review:{MAIN}:misuse"]
    assert len(mine) == 1
    item = mine[0]
    assert (item["label"], item["split"], item["task"]) == (0, "calibrate", "misuse")
    assert item["source"] == "review:alice" and item["category"] == "harm-spike"
    assert [t["role"] for t in item["turns"]] == ["user", "assistant"]
    assert item["turns"][1]["text"].startswith(" tok10 tok11")
    # After a reload the label is still there (it came from the store, not the page's memory).
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    assert card.locator(".label-status").get_attribute("data-verdict") == "false_positive"
    assert "quoting a news story" in card.locator(".history").inner_text()


def test_hostile_token_text_renders_inertly(page: Any, server: Server) -> None:
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    login(page)
    assert page.locator(f"tr.row[data-conversation='{HOSTILE}'] td.cid").inner_text() == HOSTILE
    page.click(f"tr.row[data-conversation='{HOSTILE}'] a")
    page.wait_for_selector("body[data-ready=true]")
    assert page.evaluate("window.__pwned") is None
    assert dialogs == []
    assert page.inner_text("#conversation-id") == HOSTILE
    tokens = page.locator(".tok")
    assert tokens.nth(0).inner_text() == "<script>window.__pwned = 1</script>"
    assert tokens.nth(1).inner_text() == '<img src=x onerror="window.__pwned = 2">'
    assert tokens.nth(2).inner_text() == "&lt;b&gt;entity&amp;"
    assert tokens.nth(3).inner_text() == "<U+202E>gnp.exe"  # the override is shown, not obeyed
    assert tokens.nth(4).locator(".nl").count() == 1
    assert tokens.nth(6).inner_text() == "<b>not bold</b>"
    assert page.locator("#tokens img, #tokens b, #tokens script, #alerts img").count() == 0
    assert "damaged feature values at token(s) 2" in page.inner_text("section.head")
    page.hover(".fname[data-feature='p/deception']")
    values = tokens.evaluate_all("ts => ts.map(t => t.dataset.value)")
    assert values == ["0", "1", "", "3", "4", "5", "6"]  # the damaged row shifted nothing
    mega = tokens.nth(5).inner_text()
    assert len(mega) < 5000 and f"(+{MEGA - 4096} chars)" in mega
    card = page.locator(".alert-card").first
    assert card.locator(".f-output").inner_text() == "<img src=x onerror=window.__pwned=3>"
    assert page.evaluate("window.__pwned") is None
    # The export keeps the whole megabyte token.
    with page.expect_download() as download:
        page.click("#export")
    exported = json.loads(Path(download.value.path()).read_text())
    assert exported["summary"]["conversation_id"] == HOSTILE
    assert len(exported["tokens"][5]["text"]) == MEGA
