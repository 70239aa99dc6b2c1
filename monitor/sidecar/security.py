"""Transport security of the sidecar's gRPC port: TLS or mutual TLS, and optional bearer
tokens checked on every call except health checks (Kubernetes gRPC probes send no metadata).

Each token has a name, and a call's client identity is that name (or, with mutual TLS, the
certificate's subject): conversation state is scoped by it (see `ScopeSettings`)."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from monitor.sidecar.config import SecuritySettings

_HEALTH_PREFIX = f"/{health_pb2.DESCRIPTOR.services_by_name['Health'].full_name}/"


def server_credentials(settings: SecuritySettings) -> grpc.ServerCredentials | None:
    """TLS credentials from the configured files; None when TLS is off."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    client_ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,  # mutual TLS when a client CA is given
    )


def read_token(path: Path | None) -> str | None:
    """The bearer token in `path` (stripped), None without a path; ValueError for an empty file."""
    if path is None:
        return None
    token = path.read_text().strip()
    if not token:
        raise ValueError(f"{path}: the auth token file is empty")
    return token


DEFAULT_TOKEN_NAME = "default"  # the client name of `security.token_file`'s token


def read_tokens(settings: SecuritySettings) -> dict[str, str]:
    """Client name -> token, from `token_file` (named "default") and `token_files`."""
    tokens: dict[str, str] = {}
    single = read_token(settings.token_file)
    if single is not None:
        tokens[DEFAULT_TOKEN_NAME] = single
    for name, path in settings.token_files:
        token = read_token(path)
        assert token is not None
        if token in tokens.values():
            raise ValueError(f"{path}: the token of client {name!r} is also another client's")
        tokens[name] = token
    return tokens


def bearer_token(metadata: Any) -> str | None:
    """The token of an `authorization: Bearer <token>` header; the scheme name is
    case-insensitive (RFC 9110 section 11.1, RFC 6750)."""
    for key, value in metadata:
        if key == "authorization":
            text = value if isinstance(value, str) else bytes(value).decode("latin-1")
            scheme, _, token = text.partition(" ")
            if scheme.lower() != "bearer":
                return None
            return token.strip(" ")
    return None


def token_client(metadata: Any, tokens: dict[str, str]) -> str | None:
    """The name of the client whose token the call carries; None when none matches.
    Every configured token is compared in constant time."""
    given = bearer_token(metadata)
    if given is None:
        return None
    found = None
    for name, token in tokens.items():
        if hmac.compare_digest(given.encode(), token.encode()):
            found = name
    return found


def tls_subject(context: grpc.aio.ServicerContext) -> str:
    """The subject of the client's certificate under mutual TLS; empty otherwise."""
    auth = context.auth_context() or {}
    for key in ("x509_subject_name", "x509_common_name"):
        values = auth.get(key)
        if values:
            raw = values[0]
            return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    return ""


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without `authorization: Bearer <token>` naming a configured token
    (UNAUTHENTICATED)."""

    def __init__(self, tokens: str | dict[str, str]) -> None:
        """`tokens`: client name -> token (a single token is the client "default")."""
        self._tokens = {DEFAULT_TOKEN_NAME: tokens} if isinstance(tokens, str) else dict(tokens)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Let health checks and calls with the right `authorization` header through; deny the
        rest."""
        handler = await continuation(details)
        if handler is None or details.method.startswith(_HEALTH_PREFIX):
            return handler
        if self._authorized(details.invocation_metadata or ()):
            return handler
        return _denying(handler)

    def _authorized(self, metadata: Any) -> bool:
        return token_client(metadata, self._tokens) is not None


def _denying(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    async def deny(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny, **kwargs)
    return grpc.unary_unary_rpc_method_handler(deny, **kwargs)
