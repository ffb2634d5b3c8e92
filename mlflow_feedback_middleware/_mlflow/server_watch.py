"""Whether the tracking server can take a call now, without waiting minutes to find out.

MLflow's client retries a refused connection for about four minutes (measured: 246 s for one
`log_feedback`), so a call to a server that has gone holds its thread that long. The watch probes the
server's ``/health`` first, briefly, whenever there is reason to doubt it: after a failed call, or when
the server has not answered for a while. While it is down, probes back off (1 s up to 60 s).
"""

from __future__ import annotations

import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from urllib.parse import urlparse

import mlflow

from ..logs import without_credentials

logger = logging.getLogger("mlflow_feedback_middleware")

_BACKOFF = (1, 2, 5, 10, 30, 60)  # seconds between tries of a tracking server that does not answer
_PROBE_TIMEOUT = 2.0
_TRUST_SECONDS = 5.0  # after this long without an answer from the server, probe before calling it


def backoff_seconds(failures: int) -> float:
    """How long to wait before trying a tracking server again after `failures` failed tries in a row (≥ 1)."""
    return float(_BACKOFF[min(max(failures - 1, 0), len(_BACKOFF) - 1)])


def probe(tracking_uri: str, timeout: float) -> str | None:
    """None if the tracking server answers HTTP at all, else why not. Non-HTTP URIs (Databricks) pass."""
    if urlparse(tracking_uri).scheme not in ("http", "https"):
        return None
    try:
        # Without any user:password@ (urllib would take it for the host name; /health needs no credentials).
        with urllib.request.urlopen(without_credentials(tracking_uri).rstrip("/") + "/health", timeout=timeout):
            return None
    except urllib.error.HTTPError:  # it answered, if only to refuse us: reachable
        return None
    except (OSError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"


class ServerWatch:
    """Tracks the tracking server's last answer and failures; used from one thread."""

    def __init__(self, already_warned: Callable[[], bool]) -> None:
        self._already_warned = already_warned  # another part of the middleware reported this outage
        self._suspect = False  # a call failed: probe before the next one
        self._last_answer = 0.0  # monotonic
        self._failures = 0
        self._down_until = 0.0
        self.last_error: str | None = None

    @property
    def reachable(self) -> bool:
        """Whether the last contact with the tracking server worked."""
        return self._failures == 0

    def answered(self) -> None:
        """The server answered a call (success or a refusal): it is there."""
        self._last_answer = time.monotonic()
        self._suspect = False

    def call_failed(self) -> None:
        """A call failed without an answer: probe before the next one."""
        self._suspect = True

    def backoff(self) -> float:
        """Seconds to wait before trying the server again."""
        return backoff_seconds(self._failures)

    def retry_in(self) -> float:
        """Seconds until the next probe is due."""
        return max(self._down_until - time.monotonic(), 0.05)

    def problem(self) -> str | None:
        """Why the server cannot take a call now, or None; probes only when there is reason to doubt it."""
        if not self._suspect and time.monotonic() - self._last_answer < _TRUST_SECONDS:
            return None
        if time.monotonic() < self._down_until:
            return self.last_error
        try:
            problem = probe(mlflow.get_tracking_uri(), _PROBE_TIMEOUT)
        except Exception as exc:  # no tracking URI at all
            problem = str(exc)
        if problem is None:
            if self._failures:
                logger.warning("MLflow tracking server is reachable again; delivering queued feedback")
            self._failures, self.last_error = 0, None
            self.answered()
            return None
        if self._failures == 0:
            # One warning per outage: the tracing side may have given it already.
            level = logging.INFO if self._already_warned() else logging.WARNING
            logger.log(level, "MLflow tracking server unreachable (%s); feedback waits in the outbox", problem)
        self._failures += 1
        self._down_until = time.monotonic() + self.backoff()
        self.last_error = problem
        return problem
