"""The review page: a Starlette app over the audit store (read-only except for labels).

Routes (every one but /healthz, /login and /static needs an identity, see auth.py):
- `GET /conversations`: the list view, filters and keyset paging in the query string;
- `GET /conversations/{id}`: the conversation view. `{id}` is the conversation id
  percent-encoded as one path segment, which is the link the sidecar puts in Alertmanager
  annotations (`alertmanager.audit_base_url` = `https://<this host>/conversations`);
- `GET /export/{id}`: the record as JSON (download), with its labels;
- `POST /api/alerts/{alert_id}/labels`: a verdict (JSON body), CSRF-checked;
- `GET|POST /login`, `POST /logout`: the token login form and its session cookie.

Everything a conversation holds is shown as text: Jinja2 autoescapes the server-rendered parts,
the page script only ever assigns `textContent`, and the Content-Security-Policy allows scripts
and styles only from /static (no inline script or style, nothing from another origin).
"""

from __future__ import annotations

import base64
import functools
import json
import math
import re
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from monitor.audit import labels as label_store
from monitor.audit.redaction import Redactor, redact_identifier
from monitor.audit.review.auth import CSRF_HEADER, SESSION_COOKIE, Authenticator, Identity
from monitor.audit.review.config import ReviewConfig
from monitor.audit.review.packs import read_all
from monitor.audit.store import AuditStore, ConversationRecord, open_store

HERE = Path(__file__).parent
# A token longer than this is cut on the page (the export keeps it whole): a megabyte token
# must not make the page unusable.
MAX_TOKEN_CHARS = 4096
MAX_FORM_BYTES = 8192
MAX_LABEL_BODY_BYTES = 64 * 1024
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    # Conversation ids are in our URLs: never send them to another site. (no-referrer would
    # make browsers send `Origin: null` on our own form posts, which the Origin check refuses.)
    (b"referrer-policy", b"same-origin"),
    (b"cross-origin-opener-policy", b"same-origin"),
]
# Shown as a visible escape instead of acting on the text around them: C0/C1 controls (but
# tab and newline), bidi embeddings/overrides/isolates and marks, zero-width characters.
_INVISIBLE = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff]"
)
_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)([mhd])")
_UNITS = {"m": "minutes", "h": "hours", "d": "days"}


def visible(text: Any) -> str:
    """Text with invisible and direction-changing characters shown as <U+XXXX>."""
    return _INVISIBLE.sub(lambda m: f"<U+{ord(m.group()):04X}>", str(text))


def segment(conversation_id: str) -> str:
    """The conversation id as one URL path segment (the Alertmanager link's encoding)."""
    return urllib.parse.quote(conversation_id, safe="")


def _json_for_html(value: Any) -> Markup:
    """JSON safe inside a <script type="application/json"> data block (never executed)."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return Markup(text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


class SecurityHeaders:
    """ASGI middleware: security headers on every response, and server time (Server-Timing)."""

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.extend(SECURITY_HEADERS)
                elapsed = (time.perf_counter() - start) * 1000
                headers.append((b"server-timing", f"app;dur={elapsed:.2f}".encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def cpu_timed(handler: Callable[[Any, Request], Response]) -> Callable[[Any, Request], Response]:
    """Adds `Server-Timing: cpu;dur=<ms>`: the handler thread's CPU time, which (unlike wall
    time) a CPU-contended machine does not inflate."""

    @functools.wraps(handler)
    def timed(self: Any, request: Request) -> Response:
        start = time.thread_time()
        response = handler(self, request)
        cpu_ms = (time.thread_time() - start) * 1000
        response.headers.append("server-timing", f"cpu;dur={cpu_ms:.2f}")
        return response

    return timed


class ReviewApp:
    """Holds the store, the authenticator and the templates; `asgi` is the Starlette app."""

    def __init__(self, config: ReviewConfig, store: AuditStore | None = None) -> None:
        self.config = config
        self.store = store if store is not None else open_store(config.store)
        self.auth = Authenticator(config.auth)
        self.redactor = Redactor(config.redact_patterns)
        self.features = read_all(config.packs)
        self.env = Environment(
            loader=FileSystemLoader(HERE / "templates"),
            autoescape=select_autoescape(default=True, default_for_string=True),
        )
        self.env.filters["visible"] = visible
        self.env.filters["segment"] = segment
        self.env.filters["ts"] = lambda v: v.strftime("%Y-%m-%d %H:%M:%S") if v else "?"
        routes = [
            Route("/", self.root),
            Route("/healthz", self.healthz),
            Route("/login", self.login, methods=["GET", "POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Route("/conversations", self.conversation_list),
            Route("/conversations/{conversation_id:path}", self.conversation_page),
            Route("/export/{conversation_id:path}", self.export),
            Route("/api/alerts/{alert_id:int}/labels", self.label, methods=["POST"]),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ]
        self.asgi = SecurityHeaders(Starlette(routes=routes))

    def close(self) -> None:
        self.store.close()

    # --- helpers ---------------------------------------------------------------------------
    def _identity(self, request: Request) -> Identity | None:
        header_name = self.config.auth.identity_header
        return self.auth.identify(
            request.headers.get("authorization"),
            request.cookies.get(SESSION_COOKIE),
            request.headers.get(header_name) if header_name else None,
            request.client.host if request.client else None,
        )

    def _html(self, name: str, context: Mapping[str, Any], status: int = 200) -> HTMLResponse:
        body = self.env.get_template(name).render(**context)
        return HTMLResponse(body, status, headers={"cache-control": "no-store"})

    def _unauthorized(self, request: Request) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": "authentication required"}, 401)
        # The path as sent (still percent-encoded): an id with '/' must come back the same.
        raw = request.scope.get("raw_path") or request.url.path.encode()
        next_path = raw.decode("latin-1") + (f"?{request.url.query}" if request.url.query else "")
        return self._html(
            "login.html",
            {"next": next_path, "login": self.auth.login_enabled, "error": ""},
            status=401,
        )

    # --- routes ------------------------------------------------------------------------------
    async def root(self, request: Request) -> Response:
        return RedirectResponse("/conversations", 303)

    def healthz(self, request: Request) -> Response:
        try:
            self.store.schema_version()
        except Exception:
            return JSONResponse({"status": "store unavailable"}, 503)
        return JSONResponse({"status": "ok"})

    async def login(self, request: Request) -> Response:
        if request.method == "GET":
            next_path = _local_path(request.query_params.get("next", "/conversations"))
            return self._html(
                "login.html", {"next": next_path, "login": self.auth.login_enabled, "error": ""}
            )
        if not _same_origin(request):
            return Response("cross-origin request refused", 403)
        body = await _bounded_body(request, MAX_FORM_BYTES)
        if body is None:
            return Response("form too large", 413)
        form = urllib.parse.parse_qs(body.decode("utf-8", "replace"))
        token = (form.get("token") or [""])[0]
        next_path = _local_path((form.get("next") or ["/conversations"])[0])
        name = self.auth.check_token(token) if token else None
        if name is None:
            context = {"next": next_path, "login": self.auth.login_enabled, "error": "bad token"}
            return self._html("login.html", context, status=401)
        response = RedirectResponse(next_path, 303)
        response.set_cookie(
            SESSION_COOKIE,
            self.auth.new_session(name),
            max_age=int(self.config.auth.session_hours * 3600),
            httponly=True,
            samesite="strict",
            secure=self.config.auth.secure_cookie or request.url.scheme == "https",
            path="/",
        )
        return response

    async def logout(self, request: Request) -> Response:
        if not _same_origin(request):
            return Response("cross-origin request refused", 403)
        response = RedirectResponse("/login", 303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    @cpu_timed
    def conversation_list(self, request: Request) -> Response:
        identity = self._identity(request)
        if identity is None:
            return self._unauthorized(request)
        params = request.query_params
        try:
            query = _review_query(params, self.config.page_size)
        except ValueError as exc:
            return self._html("error.html", {"message": str(exc), "identity": identity}, 400)
        try:
            rows = label_store.list_review(self.store, query)
        except Exception as exc:  # StoreError, or the driver's own errors
            return self._store_failed(identity, exc)
        more = len(rows) > self.config.page_size
        rows = rows[: self.config.page_size]
        filters = {k: params.get(k, "") for k in _FILTERS}
        next_query = ""
        if more and rows and rows[-1].updated_at is not None:
            cursor = page_cursor(rows[-1].updated_at, rows[-1].conversation_id)
            next_query = urllib.parse.urlencode({**_nonempty(filters), "after": cursor})
        context = {
            "identity": identity,
            "rows": rows,
            "filters": filters,
            "next_query": next_query,
            "first_query": urllib.parse.urlencode(_nonempty(filters)),
            "paged": bool(params.get("after")),
            "severities": ("info", "warning", "critical"),
            "statuses": label_store.STATUSES,
        }
        return self._html("list.html", context)

    def _store_failed(self, identity: Identity, exc: Exception) -> Response:
        message = f"the audit store failed: {type(exc).__name__}"
        return self._html("error.html", {"message": message, "identity": identity}, 503)

    def _stored_id(self, conversation_id: str) -> str | None:
        """The id under which the store keeps a conversation the link names, if any: an id
        with personal data in it is stored redacted (with a digest), but the Alertmanager link
        carries it as the client sent it."""
        stored = redact_identifier(self.redactor, conversation_id)
        return stored if stored != conversation_id else None

    def _record(self, conversation_id: str) -> tuple[ConversationRecord | None, list[Any]]:
        record = self.store.get_conversation(conversation_id)
        if record is None and (stored := self._stored_id(conversation_id)) is not None:
            record = self.store.get_conversation(stored)
        if record is None:
            return None, []
        return record, label_store.labels_for(self.store, record.summary.conversation_id)

    @cpu_timed
    def conversation_page(self, request: Request) -> Response:
        identity = self._identity(request)
        if identity is None:
            return self._unauthorized(request)
        cid = request.path_params["conversation_id"]
        try:
            raw = label_store.raw_conversation(self.store, cid)
            if raw is None and (stored := self._stored_id(cid)) is not None:
                raw = label_store.raw_conversation(self.store, stored)
            labels = label_store.labels_for(self.store, raw.conversation_id) if raw else []
        except Exception as exc:
            return self._store_failed(identity, exc)
        if raw is None:
            message = f"no conversation {visible(cid)!r} in the audit store"
            return self._html("error.html", {"message": message, "identity": identity}, 404)
        data = page_data(raw, labels, self.features)
        context = {
            "identity": identity,
            "conversation": raw,
            "token_count": len(raw.positions),
            "warnings": data["warnings"],
            "data": _json_for_html(data),
            "feature_rows": feature_rows(raw),
            "csrf": self.auth.csrf_token(identity),
            "alert_count": len(raw.alerts),
        }
        return self._html("conversation.html", context)

    def export(self, request: Request) -> Response:
        identity = self._identity(request)
        if identity is None:
            return self._unauthorized(request)
        cid = request.path_params["conversation_id"]
        try:
            record, labels = self._record(cid)
        except Exception as exc:
            return self._store_failed(identity, exc)
        if record is None:
            return JSONResponse({"error": "no such conversation"}, 404)
        body = record_json(record, labels)
        # The stored id: an id with personal data in it is kept redacted, so is the file name.
        stored = record.summary.conversation_id
        name = re.sub(r"[^A-Za-z0-9._-]", "_", stored)[:100] or "conversation"
        return Response(
            json.dumps(body, ensure_ascii=False, indent=2, default=_default),
            media_type="application/json",
            headers={
                "content-disposition": f'attachment; filename="{name}.json"',
                "cache-control": "no-store",
            },
        )

    async def label(self, request: Request) -> Response:
        identity = self._identity(request)
        if identity is None:
            return JSONResponse({"error": "authentication required"}, 401)
        if not _same_origin(request) or not self.auth.check_csrf(
            identity, request.headers.get(CSRF_HEADER)
        ):
            return JSONResponse({"error": "missing or wrong CSRF token"}, 403)
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return JSONResponse({"error": "expected application/json"}, 415)
        body = await _bounded_body(request, MAX_LABEL_BODY_BYTES)
        if body is None:
            return JSONResponse({"error": "body too large"}, 413)
        try:
            payload = json.loads(body)
            verdict = payload["verdict"]
            note = payload.get("note", "")
            if not isinstance(verdict, str) or not isinstance(note, str):
                raise TypeError
        except (ValueError, KeyError, TypeError, AttributeError):
            return JSONResponse({"error": "expected {verdict, note}"}, 400)
        try:
            label = await run_in_threadpool(
                label_store.add_label,
                self.store,
                request.path_params["alert_id"],
                verdict,
                note,
                identity.name,
                datetime.now(UTC),
            )
        except label_store.LabelError as exc:
            return JSONResponse({"error": str(exc)}, 400)
        except Exception as exc:
            return JSONResponse({"error": f"the audit store failed: {type(exc).__name__}"}, 503)
        return JSONResponse({"label": label_store.label_to_json(label)}, 201)


_FILTERS = ("since", "until", "rule", "category", "severity", "model", "status")


def _nonempty(values: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in values.items() if v}


def _ascii_digits(text: str) -> bool:
    """Whether ``text`` is a non-empty run of ASCII digits (what a Content-Length may be)."""
    return text.isascii() and text.isdigit()


async def _bounded_body(request: Request, limit: int) -> bytes | None:
    """The request body, or None when it is over `limit` bytes. Read in chunks and given up
    on at the limit: `request.body()` would first buffer whatever an unauthenticated client
    sends to /login, gigabytes included."""
    declared = request.headers.get("content-length")
    # ASCII digits only: str.isdigit() also takes "²" (latin-1 0xB2), which int() refuses.
    if declared is not None and (not _ascii_digits(declared) or int(declared) > limit):
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _local_path(value: str) -> str:
    """Only a path on this site: no scheme, no host, no `//` (open-redirect guard)."""
    if not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/conversations"
    return value


def _same_origin(request: Request) -> bool:
    origin = request.headers.get("origin")
    if origin is None:
        return True  # not a browser, or a browser that sends none (then SameSite applies)
    return urllib.parse.urlsplit(origin).netloc == request.headers.get("host", "")


def _parse_time(text: str, name: str) -> datetime:
    match = _RELATIVE.fullmatch(text.strip())
    if match:
        try:
            delta = timedelta(**{_UNITS[match.group(2)]: float(match.group(1))})
            return datetime.now(UTC) - delta
        except OverflowError:  # "99999999d": before year 1 (was an unhandled 500)
            raise ValueError(f"{name}: {text.strip()} reaches back too far") from None
    try:
        value = datetime.fromisoformat(text.strip())
        # In UTC here: the stores compare UTC times, and year 1 with an offset has none.
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).astimezone(UTC)
    except ValueError:
        raise ValueError(f"{name}: expected an ISO date/time or 30m, 24h, 7d") from None
    except OverflowError:
        raise ValueError(f"{name}: {text.strip()} is out of range") from None


def page_cursor(at: datetime, conversation_id: str) -> str:
    """The list view's `after` parameter for the page after this row."""
    raw = json.dumps([at.isoformat(), conversation_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _parse_cursor(text: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        at, cid = json.loads(raw)
        value = datetime.fromisoformat(at)
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).astimezone(UTC), str(cid)
    except (ValueError, TypeError, OverflowError) as exc:
        raise ValueError("after: not a page cursor") from exc


def _review_query(params: Mapping[str, str], page_size: int) -> label_store.ReviewQuery:
    status = params.get("status") or None
    if status is not None and status not in label_store.STATUSES:
        raise ValueError(f"status: expected one of {', '.join(label_store.STATUSES)}")
    return label_store.ReviewQuery(
        since=_parse_time(params["since"], "since") if params.get("since") else None,
        until=_parse_time(params["until"], "until") if params.get("until") else None,
        rule=params.get("rule") or None,
        category=params.get("category") or None,
        severity=params.get("severity") or None,
        model=params.get("model") or None,
        status=status,
        after=_parse_cursor(params["after"]) if params.get("after") else None,
        limit=page_size + 1,  # one more tells whether there is a next page
    )


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def record_json(record: ConversationRecord, labels: list[Any]) -> dict[str, Any]:
    """The export: the stored record as the CLI exports it, plus the reviewers' labels."""
    data = asdict(record)
    data["request_ids"] = list(record.request_ids)
    data["labels"] = [label_store.label_to_json(label) for label in labels]
    return data


def _finite(value: float | None) -> float | None:
    # The store keeps NaN/Inf as null already; JSON has no spelling for them either.
    return value if value is None or math.isfinite(value) else None


def feature_rows(raw: label_store.RawConversation) -> Markup:
    """Each token's feature values as the JSON text the store holds (`{"pack/f": 1.5}`), one
    line per token, for a `<script type="text/plain">` data block.

    The browser parses them: parsing 4,096 x k numbers in Python, or quoting them all as JSON
    strings, would be most of the page's server time. The store writes these without raw
    newlines; a row that has one (a damaged row) is sent as `null`, so line i stays token i.
    A row that does not parse is shown as missing values with a warning. Escaping `<` keeps
    `</script>` out; `<` is never valid JSON outside a string, where \\u003c means the same.
    """
    # (The HTML parser turns a CR into a line break too.)
    lines = [row if "\n" not in row and "\r" not in row else "null" for row in raw.features_json]
    return Markup("\n".join(lines).replace("<", "\\u003c"))


def page_data(
    raw: label_store.RawConversation,
    labels: list[Any],
    metadata: Mapping[str, Mapping[str, str]],
) -> dict[str, Any]:
    """What the conversation page's script draws, but the feature values (`feature_rows`)."""
    texts: list[str | None] = []
    cut: dict[int, int] = {}
    for i, text in enumerate(raw.texts):
        if text is not None and len(text) > MAX_TOKEN_CHARS:
            cut[i] = len(text)
            text = text[:MAX_TOKEN_CHARS]
        texts.append(text)
    current = label_store.current_labels(labels)
    alerts = []
    for a in raw.alerts:
        label = current.get(a.id) if a.id is not None else None
        alerts.append(
            {
                "id": a.id,
                "rule": a.rule,
                "category": a.category,
                "severity": a.severity,
                "value": _finite(a.value),
                "position": a.position,
                "start": a.start,
                "end": a.end,
                "message": a.message,
                "rule_set_hash": a.rule_set_hash,
                "request_id": a.request_id,
                "feature_values": {k: _finite(v) for k, v in a.feature_values.items()},
                "created_at": a.created_at.isoformat() if a.created_at else None,
                "label": label_store.label_to_json(label) if label else None,
                "history": [
                    label_store.label_to_json(lab) for lab in labels if lab.alert_id == a.id
                ],
            }
        )
    return {
        "conversation_id": raw.conversation_id,
        "feature_info": {name: dict(info) for name, info in metadata.items()},
        "tokens": {
            "position": raw.positions,
            "text": texts,
            "role": raw.roles,
            "request": raw.request_ids,
            "cut": cut,  # token index -> full length, for tokens shown cut short
        },
        "alerts": alerts,
        "verdicts": list(label_store.VERDICTS),
        "warnings": raw.warnings,
    }


def create_app(config: ReviewConfig, store: AuditStore | None = None) -> ReviewApp:
    """The review app for `config` (opens the store unless one is given)."""
    return ReviewApp(config, store)
