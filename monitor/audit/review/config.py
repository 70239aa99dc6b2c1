"""Configuration of the review page (`safety-monitor audit serve --config FILE`): one YAML file.

```yaml
store: sqlite:///audit.db          # the sidecar's audit store (relative to this file), or postgresql://
listen: 127.0.0.1:8080
packs: [probes.pack.safetensors]   # feature names and descriptions come from these packs' metadata
auth:
  tokens:                          # bearer tokens (one file each); the name is the labeler identity
    - {name: alice, token_file: secrets/alice.token}
  identity_header: X-Forwarded-Email   # set by an authenticating proxy (oauth2-proxy)
  allowed_identities: [bob@example.com, "@example.com"]   # exact, or "@domain"
  trusted_proxies: [127.0.0.1]     # only these peers may set identity_header
  allow_anonymous: false
  session_secret_file: secrets/session.key   # shared by replicas; random per process if unset
  session_hours: 8
  secure_cookie: true              # behind a TLS-terminating proxy (the page itself sees http)
```

Relative paths resolve against the file's directory. Nothing in the file is evaluated.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from monitor.audit.redaction import Redactor
from monitor.audit.store import sqlite_path

DEFAULT_LISTEN = "127.0.0.1:8080"


class ReviewConfigError(ValueError):
    """Invalid review configuration; str() is one line naming the file and the key."""


@dataclass(frozen=True)
class TokenEntry:
    """One reviewer's bearer token (read from `token_file`)."""

    name: str
    token: str


@dataclass(frozen=True)
class AuthSettings:
    """Who may use the review page; with nothing configured, nobody may."""

    tokens: tuple[TokenEntry, ...] = ()
    identity_header: str = ""
    allowed_identities: tuple[str, ...] = ()
    trusted_proxies: tuple[str, ...] = ("127.0.0.1", "::1")
    allow_anonymous: bool = False
    session_secret: bytes | None = None
    session_hours: float = 8.0
    # The session cookie gets `Secure` on https requests; this sets it always: behind a proxy
    # that terminates TLS the page sees plain http and could not tell.
    secure_cookie: bool = False

    def allows_identity(self, identity: str) -> bool:
        """Whether a proxy-asserted identity is on the allowlist (case-insensitive)."""
        value = identity.strip().lower()
        if not value:
            return False
        for entry in self.allowed_identities:
            rule = entry.lower()
            if rule.startswith("@") and value.endswith(rule) and value.count("@") == 1:
                return True
            if value == rule:
                return True
        return False

    def trusts_peer(self, host: str | None) -> bool:
        """Whether a request from `host` may assert an identity through the header."""
        if not host:
            return False
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        for entry in self.trusted_proxies:
            if address in ipaddress.ip_network(entry, strict=False):
                return True
        return False


@dataclass(frozen=True)
class ReviewConfig:
    """The review server's settings."""

    store: str
    listen: str = DEFAULT_LISTEN
    packs: tuple[Path, ...] = ()
    page_size: int = 50
    auth: AuthSettings = field(default_factory=AuthSettings)
    # The sidecar's audit.redact_patterns: an id with personal data in it is stored redacted,
    # and the page finds it from the id as the client sent it (the Alertmanager link's).
    redact_patterns: tuple[str, ...] = ()

    @property
    def host(self) -> str:
        return self.listen.rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])


_TOP = {"store", "listen", "packs", "page_size", "auth", "redact_patterns"}
_AUTH = {
    "tokens",
    "identity_header",
    "allowed_identities",
    "trusted_proxies",
    "allow_anonymous",
    "session_secret_file",
    "session_hours",
    "secure_cookie",
}


def load_review_config(path: str | Path) -> ReviewConfig:
    """Read and validate the YAML file; raises ReviewConfigError on the first problem."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ReviewConfigError(f"{path}: cannot read config: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ReviewConfigError(f"{path}: invalid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(raw, dict):
        raise ReviewConfigError(f"{path}: expected a mapping of config keys")
    return parse_review_config(raw, path.parent, str(path))


def parse_review_config(raw: dict[str, Any], base_dir: Path, origin: str) -> ReviewConfig:
    """Validate an already-parsed mapping (relative paths against `base_dir`)."""
    _known(raw, _TOP, origin, "")
    store = raw.get("store")
    if not isinstance(store, str) or not store:
        raise ReviewConfigError(f"{origin}: store: required, a sqlite:/// or postgresql:// URL")
    relative = sqlite_path(store)
    if relative is not None and not relative.startswith("/"):
        store = f"sqlite:///{(base_dir / relative).resolve()}"
    elif relative is None and not store.startswith(("postgresql://", "postgres://")):
        raise ReviewConfigError(f"{origin}: store: expected sqlite:///PATH or postgresql://...")
    values: dict[str, Any] = {"store": store}
    if "listen" in raw:
        listen = raw["listen"]
        host, _, port = str(listen).rpartition(":")
        if not host or not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
            raise ReviewConfigError(f"{origin}: listen: expected HOST:PORT, got {listen!r}")
        values["listen"] = str(listen)
    if "packs" in raw:
        packs = raw["packs"]
        if not isinstance(packs, list) or not all(isinstance(p, str) for p in packs):
            raise ReviewConfigError(f"{origin}: packs: expected a list of file paths")
        values["packs"] = tuple(base_dir / p for p in packs)
    if "page_size" in raw:
        size = raw["page_size"]
        if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= 500:
            raise ReviewConfigError(f"{origin}: page_size: expected an integer 1..500")
        values["page_size"] = size
    if "redact_patterns" in raw:
        patterns = raw["redact_patterns"]
        if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
            raise ReviewConfigError(f"{origin}: redact_patterns: expected a list of regexes")
        try:
            Redactor(patterns)
        except ValueError as exc:
            raise ReviewConfigError(f"{origin}: redact_patterns: {exc}") from None
        values["redact_patterns"] = tuple(patterns)
    values["auth"] = _auth(raw.get("auth", {}), base_dir, origin)
    return ReviewConfig(**values)


def _known(raw: dict[str, Any], known: set[str], origin: str, prefix: str) -> None:
    for key in raw:
        if key not in known:
            raise ReviewConfigError(
                f"{origin}: {prefix}{key}: unknown key (known: {', '.join(sorted(known))})"
            )


def _read_secret(path: Path, origin: str, key: str) -> str:
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise ReviewConfigError(f"{origin}: {key}: cannot read {path}: {exc.strerror}") from exc
    if len(text) < 16:
        raise ReviewConfigError(f"{origin}: {key}: {path} holds fewer than 16 characters")
    return text


def _auth(raw: Any, base_dir: Path, origin: str) -> AuthSettings:
    if not isinstance(raw, dict):
        raise ReviewConfigError(f"{origin}: auth: expected a mapping")
    _known(raw, _AUTH, origin, "auth.")
    out: dict[str, Any] = {}
    tokens = []
    for i, entry in enumerate(raw.get("tokens") or []):
        where = f"auth.tokens[{i}]"
        if not isinstance(entry, dict) or set(entry) != {"name", "token_file"}:
            raise ReviewConfigError(f"{origin}: {where}: expected {{name, token_file}}")
        name = entry["name"]
        if not isinstance(name, str) or not name.strip():
            raise ReviewConfigError(f"{origin}: {where}.name: expected a non-empty string")
        if not name.strip().isprintable() or "|" in name:
            # "|" separates the session cookie's fields: a name "alice|<far future>" would
            # sign a session that the cookie parser reads as alice's, never expiring.
            raise ReviewConfigError(
                f"{origin}: {where}.name: no '|' or control characters in a reviewer name"
            )
        token = _read_secret(base_dir / str(entry["token_file"]), origin, f"{where}.token_file")
        tokens.append(TokenEntry(name.strip(), token))
    out["tokens"] = tuple(tokens)
    header = raw.get("identity_header", "")
    if not isinstance(header, str):
        raise ReviewConfigError(f"{origin}: auth.identity_header: expected a header name")
    out["identity_header"] = header.strip()
    for key in ("allowed_identities", "trusted_proxies"):
        if key in raw:
            items = raw[key]
            if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
                raise ReviewConfigError(f"{origin}: auth.{key}: expected a list of strings")
            out[key] = tuple(items)
    for proxy in out.get("trusted_proxies", ()):
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            raise ReviewConfigError(
                f"{origin}: auth.trusted_proxies: {proxy!r} is not an address or network"
            ) from None
    if out["identity_header"] and not out.get("allowed_identities"):
        raise ReviewConfigError(
            f"{origin}: auth.allowed_identities: required with identity_header (an allowlist)"
        )
    secure = raw.get("secure_cookie", False)
    if not isinstance(secure, bool):
        raise ReviewConfigError(f"{origin}: auth.secure_cookie: expected true or false")
    out["secure_cookie"] = secure
    anonymous = raw.get("allow_anonymous", False)
    if not isinstance(anonymous, bool):
        raise ReviewConfigError(f"{origin}: auth.allow_anonymous: expected true or false")
    out["allow_anonymous"] = anonymous
    if "session_secret_file" in raw:
        secret_path = base_dir / str(raw["session_secret_file"])
        out["session_secret"] = _read_secret(
            secret_path, origin, "auth.session_secret_file"
        ).encode()
    if "session_hours" in raw:
        hours = raw["session_hours"]
        if not isinstance(hours, int | float) or isinstance(hours, bool) or hours <= 0:
            raise ReviewConfigError(f"{origin}: auth.session_hours: expected a positive number")
        out["session_hours"] = float(hours)
    settings = AuthSettings(**out)
    if not (settings.tokens or settings.identity_header or settings.allow_anonymous):
        raise ReviewConfigError(
            f"{origin}: auth: configure tokens, identity_header or allow_anonymous: true "
            "(no anonymous access unless explicitly configured)"
        )
    return settings
