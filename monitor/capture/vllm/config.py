"""The plugin's settings, read from the environment of the vLLM processes (no vLLM import).

    SAFETY_MONITOR_TARGET   host:port of `safety-monitor serve` (unset: the plugin stays off)
    SAFETY_MONITOR_LAYERS   decoder layer indices, e.g. "8" or "8,16"
    SAFETY_MONITOR_CONFIG   a YAML file with the same settings (and the rest below); the two
                            variables above override it

YAML keys: target, layers, model_name, on_full (drop | block), block_timeout, queue_size,
buffer_bytes, tls_ca, tls_cert, tls_key, token_file, metrics_port, guard (true: rules with the
`block` action stop requests; false: they only alert), block_within (tokens: an enforced bound
for `block`; each step's sampled tokens wait until the sidecar has judged all but the last
`block_within` steps; unset: nothing waits, the bound is the sidecar's latency), guard_timeout
(seconds such a wait may take before it gives up, fail-open; default 1),
ignore_request_conversation_ids (true: `sm_conversation_id` in a request's extra_args /
vllm_xargs is ignored and every conversation is named after vLLM's internal request id, which
no client chooses; for deployments whose API users must not name, and so write into, each
other's conversations),
linger_ms (milliseconds, 0..1000: the relay sends the steps of that long as one message,
less CPU per step beside the engine, alerts later by up to that much; not with `block_within`
set, where every step waits for its verdict: there it is 0),
ignore_request_roles_and_attributes (true: `sm_prompt_role`, `sm_role` and `sm_attributes` in
a request are ignored too: prompt tokens get the default prompt role `user`, generated tokens
the default role `assistant`, and no attributes; for deployments whose API
users must not choose which rules see their tokens: a made-up role escapes every rule scoped to
roles, and an attribute a rule's `exceptions` name exempts the request).

    SAFETY_MONITOR_BLOCK_WITHIN   overrides block_within
    SAFETY_MONITOR_LINGER_MS      overrides linger_ms
    SAFETY_MONITOR_IGNORE_REQUEST_CONVERSATION_IDS   overrides ignore_request_conversation_ids
                                                     (1/true/yes or 0/false/no)
    SAFETY_MONITOR_IGNORE_REQUEST_ROLES_AND_ATTRIBUTES  overrides
                                                     ignore_request_roles_and_attributes
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from monitor.limits import MAX_LINGER_MS

ENV_TARGET = "SAFETY_MONITOR_TARGET"
ENV_LAYERS = "SAFETY_MONITOR_LAYERS"
ENV_CONFIG = "SAFETY_MONITOR_CONFIG"
ENV_BLOCK_WITHIN = "SAFETY_MONITOR_BLOCK_WITHIN"
ENV_LINGER_MS = "SAFETY_MONITOR_LINGER_MS"
ENV_IGNORE_IDS = "SAFETY_MONITOR_IGNORE_REQUEST_CONVERSATION_IDS"
ENV_IGNORE_ROLES = "SAFETY_MONITOR_IGNORE_REQUEST_ROLES_AND_ATTRIBUTES"
# The relay's linger by default (see `linger_ms` above and the README's measurements).
DEFAULT_LINGER_MS = 0.0
_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no")

_KEYS = {
    "target",
    "layers",
    "model_name",
    "on_full",
    "block_timeout",
    "queue_size",
    "buffer_bytes",
    "tls_ca",
    "tls_cert",
    "tls_key",
    "token_file",
    "metrics_port",
    "guard",
    "block_within",
    "guard_timeout",
    "linger_ms",
    "ignore_request_conversation_ids",
    "ignore_request_roles_and_attributes",
}


class PluginConfigError(ValueError):
    """The plugin's settings are wrong; vLLM does not start (better than serving unmonitored
    when monitoring was asked for)."""


@dataclass(frozen=True)
class PluginSettings:
    target: str
    layers: tuple[int, ...]
    model_name: str = ""
    on_full: str = "drop"
    block_timeout: float = 1.0
    queue_size: int = 256
    buffer_bytes: int = 64 * 1024 * 1024
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    token_file: str | None = None
    metrics_port: int | None = None
    guard: bool = True
    block_within: int | None = None
    guard_timeout: float = 1.0
    linger_ms: float = DEFAULT_LINGER_MS
    ignore_request_conversation_ids: bool = False
    ignore_request_roles_and_attributes: bool = False

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for CaptureClient."""
        token = None
        if self.token_file:
            token = Path(self.token_file).read_text().strip()
        return {
            "model_name": self.model_name,
            "on_full": self.on_full,
            "block_timeout": self.block_timeout,
            "queue_size": self.queue_size,
            "buffer_bytes": self.buffer_bytes,
            "tls_ca": self.tls_ca,
            "tls_cert": self.tls_cert,
            "tls_key": self.tls_key,
            "token": token,
            "linger_ms": self.effective_linger_ms,
        }

    @property
    def effective_linger_ms(self) -> float:
        """The relay's linger: none where every step waits for its verdict (`block_within`
        in guard mode), since a lingering relay would hold back the very steps waited for."""
        if self.guard and self.block_within is not None:
            return 0.0
        return self.linger_ms


def load_settings(environ: Mapping[str, str] | None = None) -> PluginSettings | None:
    """The settings, or None when the monitor is not configured in this environment."""
    env = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    path = env.get(ENV_CONFIG)
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise PluginConfigError(f"{ENV_CONFIG}={path}: {exc}") from None
        if not isinstance(loaded, dict):
            raise PluginConfigError(f"{ENV_CONFIG}={path}: expected a mapping")
        unknown = sorted(set(loaded) - _KEYS)
        if unknown:
            raise PluginConfigError(
                f"{ENV_CONFIG}={path}: unknown keys {unknown} (known: {sorted(_KEYS)})"
            )
        raw.update(loaded)
    if env.get(ENV_TARGET):
        raw["target"] = env[ENV_TARGET]
    if env.get(ENV_LAYERS):
        raw["layers"] = env[ENV_LAYERS]
    if env.get(ENV_BLOCK_WITHIN):
        raw["block_within"] = env[ENV_BLOCK_WITHIN]
    if env.get(ENV_LINGER_MS):
        raw["linger_ms"] = env[ENV_LINGER_MS]
    for variable, key in (
        (ENV_IGNORE_IDS, "ignore_request_conversation_ids"),
        (ENV_IGNORE_ROLES, "ignore_request_roles_and_attributes"),
    ):
        if env.get(variable):
            text = env[variable].strip().lower()
            if text not in _TRUE + _FALSE:
                raise PluginConfigError(f"{variable}: expected 1/true/yes or 0/false/no")
            raw[key] = text in _TRUE
    if not raw.get("target"):
        if raw:
            raise PluginConfigError(f"no sidecar target: set {ENV_TARGET} or `target`")
        return None
    return _validate(raw)


def _validate(raw: dict[str, Any]) -> PluginSettings:
    layers = _layers(raw.get("layers"))
    on_full = raw.get("on_full", "drop")
    if on_full not in ("drop", "block"):
        raise PluginConfigError(f"on_full: expected 'drop' or 'block', got {on_full!r}")
    port = raw.get("metrics_port")
    if port is not None and (not isinstance(port, int) or not 0 < port < 65536):
        raise PluginConfigError(f"metrics_port: expected a port number, got {port!r}")
    guard = raw.get("guard", True)
    if not isinstance(guard, bool):
        raise PluginConfigError(f"guard: expected true or false, got {guard!r}")
    switches = {}
    for key in ("ignore_request_conversation_ids", "ignore_request_roles_and_attributes"):
        switches[key] = raw.get(key, False)
        if not isinstance(switches[key], bool):
            raise PluginConfigError(f"{key}: expected true or false, got {switches[key]!r}")
    block_within = raw.get("block_within")
    if block_within is not None:
        try:
            block_within = int(block_within)
        except (TypeError, ValueError):
            block_within = -1
        if block_within < 0:
            raise PluginConfigError(
                f"block_within: expected a number of tokens >= 0, got {raw['block_within']!r}"
            )
    linger_ms = raw.get("linger_ms", DEFAULT_LINGER_MS)
    try:
        linger_ms = float(linger_ms)
    except (TypeError, ValueError):
        linger_ms = -1.0
    if isinstance(raw.get("linger_ms"), bool) or not 0 <= linger_ms <= MAX_LINGER_MS:
        raise PluginConfigError(
            f"linger_ms: expected milliseconds in 0..{MAX_LINGER_MS:g}, "
            f"got {raw.get('linger_ms')!r}"
        )
    return PluginSettings(
        target=str(raw["target"]),
        layers=layers,
        model_name=str(raw.get("model_name", "")),
        on_full=on_full,
        block_timeout=float(raw.get("block_timeout", 1.0)),
        queue_size=int(raw.get("queue_size", 256)),
        buffer_bytes=int(raw.get("buffer_bytes", 64 * 1024 * 1024)),
        tls_ca=raw.get("tls_ca"),
        tls_cert=raw.get("tls_cert"),
        tls_key=raw.get("tls_key"),
        token_file=raw.get("token_file"),
        metrics_port=port,
        guard=guard,
        block_within=block_within,
        guard_timeout=float(raw.get("guard_timeout", 1.0)),
        linger_ms=linger_ms,
        **switches,
    )


def _layers(value: object) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        items: list[object] = [value]
    elif isinstance(value, str):
        items = [part.strip() for part in value.split(",") if part.strip()]
    elif isinstance(value, list):
        items = list(value)
    else:
        raise PluginConfigError(f"layers: set {ENV_LAYERS} (e.g. '8' or '8,16') or `layers`")
    layers = []
    for item in items:
        try:
            layers.append(int(item))  # type: ignore[call-overload]
        except (TypeError, ValueError):
            raise PluginConfigError(f"layers: {item!r} is not a layer index") from None
    if not layers:
        raise PluginConfigError("layers: at least one layer index is required")
    return tuple(dict.fromkeys(layers))
