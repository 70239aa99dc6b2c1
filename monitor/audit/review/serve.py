"""Running the review page under uvicorn (its own process, next to the sidecar)."""

from __future__ import annotations

import logging

import uvicorn

from monitor.audit.review.app import create_app
from monitor.audit.review.config import ReviewConfig


def serve(config: ReviewConfig, log_level: str = "info") -> None:
    """Serve until SIGINT/SIGTERM (uvicorn handles both and finishes open requests)."""
    app = create_app(config)
    logging.getLogger("uvicorn.error").info(
        "review page on http://%s:%d (store: %s)",
        config.host,
        config.port,
        config.store.split(":")[0],
    )
    try:
        uvicorn.run(
            app.asgi,
            host=config.host,
            port=config.port,
            log_level=log_level,
            # The peer address must be the real TCP peer: the trusted identity header is only
            # accepted from `auth.trusted_proxies`, so X-Forwarded-For must not rewrite it.
            proxy_headers=False,
            server_header=False,
            access_log=log_level == "debug",
        )
    finally:
        app.close()
