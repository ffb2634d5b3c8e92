"""The middleware's configuration, validated once at construction so bad settings fail at start-up."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import HTTPConnection

from .intake.identity import AuthenticatedUserOrHeader, IdentityResolver, resolve_user
from .intake.limits import FeedbackLimits, RateLimit
from .intake.schema import FeedbackSchema
from .redaction import normalise_field, redact

# Requests that are not answers a user could rate: API docs, browsers' icon probes and health checks.
# Tracing them would only dilute the feedback rate. Passing `exclude_paths` replaces this list.
DEFAULT_EXCLUDE_PATHS: tuple[str, ...] = (
    r"^/(docs|redoc)(/|$)",
    r"^/openapi\.json$",
    r"^/favicon\.ico$",
    r"^/(health|healthz|livez|readyz|ready|metrics)$",
)


# Request and response fields whose values never reach a trace (compared case-insensitively, '-' as '_').
DEFAULT_REDACT_FIELDS: tuple[str, ...] = (
    "password",
    "passwd",
    "secret",
    "client_secret",
    "token",
    "access_token",
    "refresh_token",
    "id_token",
    "feedback_token",
    "api_key",
    "apikey",
    "access_key",
    "authorization",
    "cookie",
    "credentials",
    "private_key",
)

# Relative to the working directory, so the workers of one service share it. MLFLOW_FEEDBACK_OUTBOX overrides.
DEFAULT_OUTBOX_PATH = ".mlflow-feedback/outbox.db"


@dataclass(frozen=True)
class Settings:
    """Everything `MlflowFeedbackMiddleware` accepts; see the README's configuration table."""

    experiment_name: str | None = None
    tracking_uri: str | None = None
    feedback_path: str | None = "/feedback"
    trace_id_header: str = "X-MLflow-Trace-Id"
    request_id_header: str = "X-Request-ID"
    user_id_header: str = "X-User-ID"
    session_id_header: str = "X-Session-ID"
    exclude_paths: Iterable[str] = DEFAULT_EXCLUDE_PATHS
    sse_final_event: bool | None = None
    sse_event_name: str = "mlflow_trace"
    capture_request_body: bool = True
    capture_response_body: bool = True
    max_capture_bytes: int = 64 * 1024
    max_feedback_body_bytes: int = 64 * 1024
    feedback_wait_seconds: float = 15.0
    feedback_sync_seconds: float = 1.0
    trace_wait_seconds: float = 300.0
    outbox_path: str | None = DEFAULT_OUTBOX_PATH
    rating_scale: tuple[float, float] = (1, 5)
    startup_timeout_seconds: float = 10.0
    shutdown_timeout_seconds: float = 10.0
    mlflow_threads: int = 8
    export: str = "mlflow"
    feedback_secrets: tuple[bytes, ...] = ()  # the signing one first; empty: no tokens
    feedback_token_ttl_seconds: float = 24 * 3600
    feedback_token_header: str = "X-MLflow-Feedback-Token"
    identity: IdentityResolver | None = None  # None: AuthenticatedUserOrHeader(user_id_header)
    feedback_limits: FeedbackLimits = field(default_factory=FeedbackLimits)
    rate_limit: RateLimit | None = field(default_factory=RateLimit)
    redact_fields: Iterable[str] = DEFAULT_REDACT_FIELDS
    feedback_schema: FeedbackSchema | None = None
    summary_token: str | None = None  # enables GET {feedback_path}/summary for holders of this bearer token
    trust_traceparent: bool = False  # continue callers' W3C traces (only behind callers that export them)
    _exclude: tuple[re.Pattern[str], ...] = field(init=False, repr=False)
    _identity: IdentityResolver = field(init=False, repr=False)
    _redact: frozenset[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.feedback_path is not None and (
            not self.feedback_path.startswith("/") or self.feedback_path.endswith("/")
        ):
            raise ValueError("feedback_path must start with '/' and not end with it, e.g. '/feedback'")
        for name in (
            "trace_id_header",
            "request_id_header",
            "user_id_header",
            "session_id_header",
            "feedback_token_header",
        ):
            if not re.fullmatch(r"[A-Za-z0-9-]+", getattr(self, name)):
                raise ValueError(f"{name} must be a plain HTTP header name")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.sse_event_name):
            raise ValueError("sse_event_name must be a plain token (letters, digits, '_', '.', '-')")
        low, high = self.rating_scale
        if not 0 < low < high:
            raise ValueError("rating_scale must be (low, high) with 0 < low < high")
        if isinstance(self.exclude_paths, str):
            raise TypeError("exclude_paths takes a list of regular expressions, not one string")
        if self.export not in ("mlflow", "otlp"):
            raise ValueError("export must be 'mlflow' (MLflow's exporter) or 'otlp' (batched OTLP)")
        for name in ("max_capture_bytes", "max_feedback_body_bytes", "mlflow_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        for name in ("feedback_wait_seconds", "feedback_sync_seconds", "trace_wait_seconds"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be zero or more")
        if self.summary_token is not None and len(self.summary_token) < 16:
            raise ValueError("summary_token must be at least 16 characters")
        if not self.feedback_token_ttl_seconds > 0:
            raise ValueError("feedback_token_ttl_seconds must be positive")
        if isinstance(self.redact_fields, str):
            raise TypeError("redact_fields takes a list of field names, not one string")
        object.__setattr__(self, "_identity", self.identity or AuthenticatedUserOrHeader(self.user_id_header))
        object.__setattr__(self, "redact_fields", tuple(self.redact_fields))
        object.__setattr__(self, "_redact", frozenset(normalise_field(f) for f in self.redact_fields))
        object.__setattr__(self, "exclude_paths", tuple(self.exclude_paths))
        object.__setattr__(self, "_exclude", tuple(re.compile(p) for p in self.exclude_paths))

    def redact(self, value: Any) -> Any:
        """A captured body or query with the values of `redact_fields` replaced, at any depth."""
        return redact(value, self._redact)

    def user_of(self, conn: HTTPConnection) -> str | None:
        """The end user of a request, from the identity resolver; None when anonymous."""
        return resolve_user(self._identity, conn)

    def is_excluded(self, path: str) -> bool:
        """Whether requests to `path` go untraced."""
        return any(p.search(path) for p in self._exclude)
