"""The review page: flagged conversations in a browser, as a spectrogram of features over
tokens, with reviewer labels written back to the audit store.

Run with `safety-monitor audit serve --config review.yaml` (see `config.py` for the file). Needs
the `review` extra (Starlette, uvicorn, Jinja2).
"""

from monitor.audit.review.app import ReviewApp, create_app
from monitor.audit.review.config import ReviewConfig, ReviewConfigError, load_review_config
from monitor.audit.review.serve import serve

__all__ = [
    "ReviewApp",
    "ReviewConfig",
    "ReviewConfigError",
    "create_app",
    "load_review_config",
    "serve",
]
