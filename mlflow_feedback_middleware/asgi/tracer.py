"""`RequestTracer`: what a traced exchange (an HTTP request or a WebSocket turn) needs of the middleware.

The middleware builds one and hands it to each `TracedExchange` and, through the scope's state, to
`traced_turn`; neither depends on the middleware itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mlflow.entities import LiveSpan
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp

from .._mlflow.tracing import MlflowBackend, annotate_trace
from ..config import Settings
from ..delivery.registry import RecentTraces
from ..intake.tokens import FeedbackTokens
from .context import RequestIds

STATE_KEY = "mlflow_feedback_middleware"  # where the tracer is left in a WebSocket scope's state


@dataclass(eq=False)
class RequestTracer:
    """The app behind the middleware, its settings, and where traced exchanges record what they issue."""

    app: ASGIApp
    settings: Settings
    backend: MlflowBackend
    recent: RecentTraces
    tokens: FeedbackTokens | None
    # ASGI header names arrive lower-cased as bytes; compared against these without re-encoding.
    trace_id_header_key: bytes = field(init=False)
    request_id_header_key: bytes = field(init=False)
    session_id_header_key: bytes = field(init=False)
    token_header_key: bytes = field(init=False)

    def __post_init__(self) -> None:
        settings = self.settings
        self.trace_id_header_key = settings.trace_id_header.lower().encode()
        self.request_id_header_key = settings.request_id_header.lower().encode()
        self.session_id_header_key = settings.session_id_header.lower().encode()
        self.token_header_key = settings.feedback_token_header.lower().encode()

    def adopt(
        self,
        span: LiveSpan,
        conn: HTTPConnection,
        request_id: str,
        session_id: str | None,
        own: bool = True,
        chosen_by_client: bool = False,
    ) -> RequestIds:
        """Make a fresh root span a traced exchange: its end user, feedback token and IDs recorded on the
        trace, and the trace remembered as issued here.

        A continued caller's trace (`own` False) is remembered by client request ID only: feedback on it is
        checked against the tracking server, as for any trace this service did not start."""
        user_id = self.settings.user_of(conn)
        token = self.tokens.issue(span.trace_id, request_id, user_id) if self.tokens else None
        annotate_trace(span, request_id, user_id, session_id, self.backend.otlp, chosen_by_client)
        self.recent.add(span.trace_id, request_id, own, chosen_by_client)
        return RequestIds(span.trace_id, request_id, token)
