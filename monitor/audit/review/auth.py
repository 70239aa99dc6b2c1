"""Authentication, sessions and CSRF of the review page.

Who is asking, in order:
1. `Authorization: Bearer <token>`: one of the configured tokens; the identity is its name.
   Browsers never add this header by themselves, so such requests need no CSRF token.
2. The session cookie set by the login form (the same tokens): `name|expiry|nonce|mac`, an
   HMAC-SHA256 over the rest with the session secret; HttpOnly, SameSite=Strict.
3. The trusted identity header (e.g. oauth2-proxy's X-Forwarded-Email), only from a peer in
   `trusted_proxies` and only for an identity on the allowlist.
4. "anonymous", only when `allow_anonymous: true`.
Otherwise the request is answered 401.

CSRF: label writes from a browser (cookie or proxy identity) must carry `X-CSRF-Token`, an HMAC
of the identity and the session nonce that the page embeds; the cookie's SameSite=Strict and an
Origin check (when the browser sends one) stand behind it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from monitor.audit.review.config import AuthSettings

SESSION_COOKIE = "sm_review_session"
CSRF_HEADER = "x-csrf-token"


@dataclass(frozen=True)
class Identity:
    """Who made a request, and how they proved it."""

    name: str
    method: str  # "bearer" | "session" | "header" | "anonymous"
    nonce: str = ""  # the session's nonce (binds the CSRF token to one login)

    @property
    def needs_csrf(self) -> bool:
        return self.method != "bearer"


class Authenticator:
    """Resolves a request's identity and issues/checks sessions and CSRF tokens."""

    def __init__(self, settings: AuthSettings) -> None:
        self.settings = settings
        # Without a configured secret, sessions end with the process (one replica only).
        self._secret = settings.session_secret or secrets.token_bytes(32)
        self._tokens = [(t.name, t.token.encode()) for t in settings.tokens]

    @property
    def login_enabled(self) -> bool:
        return bool(self._tokens)

    def check_token(self, token: str) -> str | None:
        """The name of the configured token equal to `token` (compared in constant time)."""
        given = token.strip().encode()
        found = None
        for name, expected in self._tokens:
            if hmac.compare_digest(given, expected):
                found = name
        return found

    def identify(
        self, authorization: str | None, cookie: str | None, header: str | None, peer: str | None
    ) -> Identity | None:
        """The request's identity from its credentials, or None (answer 401)."""
        if authorization:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() == "bearer" and value:
                name = self.check_token(value)
                return Identity(name, "bearer") if name else None
            return None  # a wrong credential is not anonymous access
        if cookie:
            identity = self._session(cookie)
            if identity is not None:
                return identity
        if self.settings.identity_header and header is not None:
            if self.settings.trusts_peer(peer) and self.settings.allows_identity(header):
                return Identity(header.strip().lower(), "header")
            return None
        if self.settings.allow_anonymous:
            return Identity("anonymous", "anonymous")
        return None

    def _mac(self, payload: str) -> str:
        return hmac.new(self._secret, payload.encode(), hashlib.sha256).hexdigest()

    def new_session(self, name: str) -> str:
        """A cookie value for `name`, valid for `session_hours`."""
        expiry = int(time.time() + self.settings.session_hours * 3600)
        payload = f"{name}|{expiry}|{secrets.token_hex(16)}"
        return f"{payload}|{self._mac(payload)}"

    def _session(self, cookie: str) -> Identity | None:
        payload, _, mac = cookie.rpartition("|")
        if not payload or not hmac.compare_digest(mac, self._mac(payload)):
            return None
        name, _, rest = payload.partition("|")
        expiry, _, nonce = rest.partition("|")
        if not (expiry.isascii() and expiry.isdigit()) or int(expiry) < time.time():
            return None
        # A token removed from the config ends its sessions at the next restart at the latest;
        # a name no longer configured is refused at once.
        if name not in {n for n, _ in self._tokens}:
            return None
        return Identity(name, "session", nonce)

    def csrf_token(self, identity: Identity) -> str:
        """The token the page sends back with label writes."""
        return self._mac(f"csrf|{identity.method}|{identity.name}|{identity.nonce}")

    def check_csrf(self, identity: Identity, token: str | None) -> bool:
        if not identity.needs_csrf:
            return True
        return bool(token) and hmac.compare_digest(str(token), self.csrf_token(identity))
