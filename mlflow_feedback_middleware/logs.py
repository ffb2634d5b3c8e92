"""The package's logger, and a fallback handler so its start-up line and errors show with their level and
name where the app has not configured logging (as uvicorn leaves it): MLflow does the same for its own logger.
Once the app configures the root logger, the fallback steps aside and the app's handlers take everything."""

from __future__ import annotations

import logging
import sys
from urllib.parse import urlsplit, urlunsplit

NAME = "mlflow_feedback_middleware"
logger = logging.getLogger(NAME)


class _UnlessConfigured(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to stderr only while the root logger has no handler of its own."""

    def emit(self, record: logging.LogRecord) -> None:
        if not logging.getLogger().handlers:
            self.stream = sys.stderr  # where stderr is now (a test or a supervisor may have replaced it)
            super().emit(record)


def show_logs() -> None:
    """Give the package's logger the fallback handler (once), and the INFO level unless one is set."""
    if any(isinstance(handler, _UnlessConfigured) for handler in logger.handlers):
        return
    handler = _UnlessConfigured()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


def without_credentials(uri: str) -> str:
    """A URI fit for a log line: any ``user:password@`` removed."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return "<unparsable URI>"
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
