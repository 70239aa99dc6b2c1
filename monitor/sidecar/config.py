"""Sidecar configuration: one YAML file, validated strictly at start-up.

Relative paths in the file are resolved against the file's directory, so a config and the packs
and rules next to it can be moved together.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from monitor.audit.store import SQLITE_SCHEME, is_store_url, sqlite_path
from monitor.limits import MAX_CONVERSATION_SLOTS, MAX_CONVERSATIONS

# Batches of at most this many rows (a decode step: one row per conversation, and a few such
# steps grouped) encode on one torch thread. Two intra-op threads make a 512-row prefill's
# encode about 1.6 times faster on two idle cores, but a decode step's encode is a few
# hundred microseconds of work, and with two OpenMP threads every small op (the BF16 to
# float32 copy, the matrix multiply, the epilogue) ends in a barrier that waits for the
# other thread: when that thread shares its core with anything else (the engine, the load
# client of `bench sidecar`), it waits for a scheduler slice. A 64-row encode beside a busy
# loop on one of two cores: p99 16 ms on two threads, 0.6-1.1 ms on one
# (`scripts/encode_threads.py`). Larger batches use torch's thread count; 512 (groups of
# eight decode steps too) measured no different. The same stall hits a prefill-sized encode
# when a core is busy (512 rows beside the spin: p99 16.5-25.7 ms on two threads, 6.2-6.6 on
# one), so torch's thread count should be the cores the sidecar has to itself (the README's
# config table); the default is not changed without a side-by-side measurement.
SINGLE_THREAD_ROWS = 256


class ConfigError(ValueError):
    """Invalid sidecar configuration; str() is one line naming the file and the key."""


@dataclass(frozen=True)
class Limits:
    """What the sidecar accepts and what one message, one stream and all clients together may
    use. Every limit is a count or a byte size checked before the work it bounds; all are
    sent to clients in GetStatus, and the README lists what a client sees at each."""

    # gRPC's default is 4 MB; a 2,000-token prefill at d_model 4096 in BF16 is 16 MB.
    max_message_bytes: int = 64 * 1024 * 1024
    max_rows_per_batch: int = 16384
    # A forward pass of a batched server holds a few hundred sequences; each costs Python
    # work, so a message cannot carry millions of them.
    max_sequences_per_batch: int = 1024
    max_conversations: int = MAX_CONVERSATIONS
    max_conversation_id_length: int = 256
    max_request_id_length: int = 256
    max_role_length: int = 64
    max_model_length: int = 128
    max_attributes: int = 16  # per sequence
    max_attribute_key_length: int = 64
    max_attribute_value_length: int = 256
    # Distinct `model` values used as the Alertmanager label; later ones are labelled "other".
    max_model_labels: int = 16
    max_streams: int = 64  # Monitor streams open at once, all clients together
    # A stream that neither sends a batch nor takes an event for this long is closed.
    stream_idle_timeout_seconds: int = 300
    # Bytes of batches one stream holds at once (read ahead and being processed); one batch
    # is always admitted, whatever its size, so the bound is max(this, max_message_bytes).
    max_stream_bytes: int = 64 * 1024 * 1024
    # Rule state (run lengths, temporal windows) of all conversations together.
    max_rule_state_bytes: int = 1024 * 1024 * 1024
    # Slots of one stream's conversation table (the columnar sequence format): a batched
    # server runs a few hundred sequences at once, and a client reuses slots beyond that.
    # Each slot holds its strings: with max_streams streams, this bounds the tables together.
    # At most MAX_CONVERSATION_SLOTS (65,536): each stream's table is a list of this size.
    max_conversation_slots: int = 1024


@dataclass(frozen=True)
class ScopeSettings:
    """Whose conversations share rule state. `client` (default): each authenticated client
    (bearer token name, mTLS subject) has its own namespace of conversation ids, so one
    client cannot end or reset another's conversation; without authentication every client
    is the same client. `attribute`: the namespace is the value of a sequence attribute
    (`attribute`, default `tenant`), for a gateway that tags tenants. `shared`: one
    namespace for everybody."""

    scope: str = "client"
    attribute: str = "tenant"


@dataclass(frozen=True)
class AuditSettings:
    """The audit trail of flagged conversations (off unless `url` is set)."""

    url: str = ""  # sqlite:///path.db (relative to the config file) or postgresql://...
    window_tokens: int = 64
    max_tokens_per_conversation: int = 8192
    redact_patterns: tuple[str, ...] = ()
    retention_days: float | None = None
    on_backpressure: str = "block"
    write_timeout_seconds: float = 5.0
    health_probe_seconds: float = 1.0  # idle probe of the store, for honest health
    spool_path: str = ""  # records left at shutdown with the store down; "" = the default


@dataclass(frozen=True)
class AlertmanagerSettings:
    """Where fired rules with the `alert` action are pushed (off unless `url` is set)."""

    url: str = ""
    resend_interval_seconds: float = 60.0
    resolve_after_seconds: float = 300.0
    audit_base_url: str = ""  # link put in each alert's annotations, + '/<conversation id>'


@dataclass(frozen=True)
class SecuritySettings:
    """TLS (cert + key), mutual TLS (+ client_ca) and a bearer token for the gRPC port."""

    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    token_file: Path | None = None  # one token; its client is named "default"
    # Named clients: name -> file holding that client's token. The name is the client's
    # identity (the scope of its conversations, its share of the conversation table).
    token_files: tuple[tuple[str, Path], ...] = ()


@dataclass(frozen=True)
class SidecarConfig:
    """The sidecar's configuration, as `load_config` reads it from YAML (paths resolved relative
    to the file): where it listens, which packs and rules it loads, its limits, logging, the
    optional audit trail, Alertmanager and transport security.

        config = load_config("sidecar.yaml")
        asyncio.run(serve(config))           # monitor.sidecar.process.serve
    """

    listen: str = "127.0.0.1:50051"
    metrics_port: int = 9464
    metrics_host: str = ""  # empty: the host part of `listen`
    packs: tuple[Path, ...] = ()
    rules: tuple[Path, ...] = ()
    limits: Limits = field(default_factory=Limits)
    conversations: ScopeSettings = field(default_factory=ScopeSettings)
    log_format: str = "auto"
    log_level: str = "info"
    shutdown_grace_seconds: float = 10.0
    rules_reload_seconds: float = 2.0  # poll rule files for changes; 0 = only on SIGHUP
    device: str = "auto"  # where packs encode: auto (cuda if available) | cpu | cuda
    # Batches of at most this many rows encode on one torch thread (`SINGLE_THREAD_ROWS`);
    # 0: every batch uses torch's thread count.
    single_thread_rows: int = SINGLE_THREAD_ROWS
    audit: AuditSettings = field(default_factory=AuditSettings)
    alertmanager: AlertmanagerSettings = field(default_factory=AlertmanagerSettings)
    security: SecuritySettings = field(default_factory=SecuritySettings)

    @property
    def listen_host(self) -> str:
        """The host part of `listen` (brackets kept for IPv6)."""
        return self.listen.rsplit(":", 1)[0]

    @property
    def metrics_bind_host(self) -> str:
        """Where /metrics binds: `metrics_host`, else the host of `listen`."""
        return self.metrics_host or self.listen_host.strip("[]")


_LOG_FORMATS = ("auto", "json", "console")
_LOG_LEVELS = ("debug", "info", "warning", "error")


def load_config(path: str | Path) -> SidecarConfig:
    """Read and validate a sidecar YAML config, raising ConfigError on the first problem."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {_one_line(exc)}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    return parse_config(raw, base_dir=path.parent, origin=str(path))


def parse_config(raw: dict[str, Any], base_dir: Path, origin: str) -> SidecarConfig:
    """Validate an already-parsed config mapping."""
    known = {f.name for f in fields(SidecarConfig)}
    _reject_unknown(raw, known, origin, prefix="")
    values: dict[str, Any] = {}
    if "listen" in raw:
        values["listen"] = _listen_address(raw["listen"], origin)
    if "metrics_port" in raw:
        values["metrics_port"] = _int(
            raw["metrics_port"], origin, "metrics_port", low=0, high=65535
        )
    if "metrics_host" in raw:
        values["metrics_host"] = _str(raw["metrics_host"], origin, "metrics_host")
    for key in ("packs", "rules"):
        if key in raw:
            values[key] = _paths(raw[key], base_dir, origin, key)
    if "limits" in raw:
        values["limits"] = _limits(raw["limits"], origin)
    if "conversations" in raw:
        values["conversations"] = _scoping(raw["conversations"], origin)
    if "log_format" in raw:
        values["log_format"] = _choice(raw["log_format"], _LOG_FORMATS, origin, "log_format")
    if "log_level" in raw:
        values["log_level"] = _choice(raw["log_level"], _LOG_LEVELS, origin, "log_level")
    if "shutdown_grace_seconds" in raw:
        grace = _number(raw["shutdown_grace_seconds"], origin, "shutdown_grace_seconds")
        values["shutdown_grace_seconds"] = grace
    if "rules_reload_seconds" in raw:
        key = "rules_reload_seconds"
        values[key] = _number(raw[key], origin, key)
    if "device" in raw:
        values["device"] = _choice(raw["device"], ("auto", "cpu", "cuda"), origin, "device")
    if "single_thread_rows" in raw:
        key = "single_thread_rows"
        values[key] = _int(raw[key], origin, key, low=0, high=2**31 - 1)
    if "audit" in raw:
        values["audit"] = _audit(raw["audit"], base_dir, origin)
    if "alertmanager" in raw:
        values["alertmanager"] = _alertmanager(raw["alertmanager"], origin)
    if "security" in raw:
        values["security"] = _security(raw["security"], base_dir, origin)
    config = SidecarConfig(**values)
    if not config.packs:
        raise ConfigError(f"{origin}: packs: at least one feature pack is required")
    return config


def _reject_unknown(raw: dict[str, Any], known: set[str], origin: str, prefix: str) -> None:
    for key in raw:
        if key not in known:
            raise ConfigError(
                f"{origin}: {prefix}{key}: unknown key (known: {', '.join(sorted(known))})"
            )


def _section(value: Any, cls: type, origin: str, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{origin}: {name}: expected a mapping")
    _reject_unknown(value, {f.name for f in fields(cls)}, origin, prefix=f"{name}.")
    return value


def _audit(value: Any, base_dir: Path, origin: str) -> AuditSettings:
    raw = _section(value, AuditSettings, origin, "audit")
    out: dict[str, Any] = {}
    if "url" in raw:
        out["url"] = _store_url(_str(raw["url"], origin, "audit.url"), base_dir, origin)
    for key in ("window_tokens", "max_tokens_per_conversation"):
        if key in raw:
            out[key] = _int(raw[key], origin, f"audit.{key}", low=1, high=2**31 - 1)
    if "redact_patterns" in raw:
        out["redact_patterns"] = _patterns(raw["redact_patterns"], origin)
    if "retention_days" in raw and raw["retention_days"] is not None:
        out["retention_days"] = _number(raw["retention_days"], origin, "audit.retention_days")
    if "on_backpressure" in raw:
        out["on_backpressure"] = _choice(
            raw["on_backpressure"], ("block", "drop"), origin, "audit.on_backpressure"
        )
    if "write_timeout_seconds" in raw:
        key = "audit.write_timeout_seconds"
        out["write_timeout_seconds"] = _number(raw["write_timeout_seconds"], origin, key)
    if "health_probe_seconds" in raw:
        key = "audit.health_probe_seconds"
        out["health_probe_seconds"] = _number(raw["health_probe_seconds"], origin, key, low=0.05)
    if "spool_path" in raw:
        spool = _str(raw["spool_path"], origin, "audit.spool_path")
        out["spool_path"] = str(base_dir / spool) if spool else ""
    return AuditSettings(**out)


def _scoping(value: Any, origin: str) -> ScopeSettings:
    raw = _section(value, ScopeSettings, origin, "conversations")
    out: dict[str, Any] = {}
    if "scope" in raw:
        scopes = ("client", "attribute", "shared")
        out["scope"] = _choice(raw["scope"], scopes, origin, "conversations.scope")
    if "attribute" in raw:
        out["attribute"] = _str(raw["attribute"], origin, "conversations.attribute")
        if not out["attribute"]:
            raise ConfigError(f"{origin}: conversations.attribute: must not be empty")
    return ScopeSettings(**out)


def _alertmanager(value: Any, origin: str) -> AlertmanagerSettings:
    raw = _section(value, AlertmanagerSettings, origin, "alertmanager")
    out: dict[str, Any] = {}
    for key in ("url", "audit_base_url"):
        if key in raw:
            text = _str(raw[key], origin, f"alertmanager.{key}")
            if text and not text.startswith(("http://", "https://")):
                raise ConfigError(f"{origin}: alertmanager.{key}: expected an http(s):// URL")
            out[key] = text
    for key in ("resend_interval_seconds", "resolve_after_seconds"):
        if key in raw:
            out[key] = _number(raw[key], origin, f"alertmanager.{key}", low=0.1)
    return AlertmanagerSettings(**out)


def _security(value: Any, base_dir: Path, origin: str) -> SecuritySettings:
    raw = _section(value, SecuritySettings, origin, "security")
    out: dict[str, Any] = {}
    for key in raw:
        if key == "token_files":
            out[key] = _named_paths(raw[key], base_dir, origin, f"security.{key}")
            continue
        (path,) = _paths(raw[key], base_dir, origin, f"security.{key}")
        out[key] = path
    settings = SecuritySettings(**out)
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise ConfigError(f"{origin}: security: tls_cert and tls_key go together")
    if settings.tls_client_ca is not None and settings.tls_cert is None:
        raise ConfigError(f"{origin}: security.tls_client_ca: mutual TLS needs tls_cert/tls_key")
    return settings


def _store_url(url: str, base_dir: Path, origin: str) -> str:
    sqlite = sqlite_path(url)
    if sqlite is not None:
        path = Path(sqlite)
        return f"{SQLITE_SCHEME}{path if path.is_absolute() else (base_dir / path).resolve()}"
    if is_store_url(url):
        return url
    raise ConfigError(
        f"{origin}: audit.url: expected sqlite:///PATH or postgresql://..., got {url!r}"
    )


def _patterns(value: Any, origin: str) -> tuple[str, ...]:
    import re

    if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
        raise ConfigError(f"{origin}: audit.redact_patterns: expected a list of regexes")
    for i, pattern in enumerate(value):
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"{origin}: audit.redact_patterns[{i}]: {exc}") from exc
    return tuple(value)


def _number(value: Any, origin: str, key: str, low: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < low:
        raise ConfigError(f"{origin}: {key}: expected a number >= {low:g}, got {value!r}")
    return float(value)


def _listen_address(value: Any, origin: str) -> str:
    if not isinstance(value, str) or ":" not in value:
        raise ConfigError(f"{origin}: listen: expected 'host:port', got {value!r}")
    port = value.rsplit(":", 1)[1]
    if not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{origin}: listen: port must be 0-65535, got {port!r}")
    return value


def _limits(value: Any, origin: str) -> Limits:
    if not isinstance(value, dict):
        raise ConfigError(f"{origin}: limits: expected a mapping")
    _reject_unknown(value, {f.name for f in fields(Limits)}, origin, prefix="limits.")
    # Byte budgets of the sidecar's own memory may pass 2 GiB; the rest are gRPC options
    # (C ints) or counts.
    wide = ("max_stream_bytes", "max_rule_state_bytes")
    highs = {key: 2**48 for key in wide} | {"max_conversation_slots": MAX_CONVERSATION_SLOTS}
    checked = {
        key: _int(item, origin, f"limits.{key}", low=1, high=highs.get(key, 2**31 - 1))
        for key, item in value.items()
    }
    return Limits(**checked)


def _paths(value: Any, base_dir: Path, origin: str, key: str) -> tuple[Path, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(i, str) and i for i in items):
        raise ConfigError(f"{origin}: {key}: expected a path or a list of paths")
    resolved = tuple((base_dir / item).resolve() for item in items)
    for item, path in zip(items, resolved, strict=True):
        if not path.exists():
            raise ConfigError(f"{origin}: {key}: {item}: no such file or directory ({path})")
    return resolved


def _named_paths(value: Any, base_dir: Path, origin: str, key: str) -> tuple[tuple[str, Path], ...]:
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"{origin}: {key}: expected a mapping of client name -> token file")
    out = []
    for name, item in value.items():
        if not isinstance(name, str) or not re.fullmatch(
            r"[A-Za-z0-9][A-Za-z0-9_.@:-]{0,63}", name
        ):
            raise ConfigError(
                f"{origin}: {key}: client name {name!r}: letters, digits and _.@:- "
                "(at most 64 characters)"
            )
        (path,) = _paths(item, base_dir, origin, f"{key}.{name}")
        out.append((name, path))
    return tuple(out)


def _int(value: Any, origin: str, key: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{origin}: {key}: expected an integer in {low}..{high}, got {value!r}")
    return value


def _str(value: Any, origin: str, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{origin}: {key}: expected a string, got {value!r}")
    return value


def _choice(value: Any, choices: tuple[str, ...], origin: str, key: str) -> str:
    if value not in choices:
        raise ConfigError(f"{origin}: {key}: expected one of {', '.join(choices)}, got {value!r}")
    return value


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())
