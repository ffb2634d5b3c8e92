"""`MlflowFeedbackMiddleware`: the pure-ASGI entry point.

Usage::

    from fastapi import FastAPI
    from mlflow_feedback_middleware import MlflowFeedbackMiddleware

    app = FastAPI()
    app.add_middleware(MlflowFeedbackMiddleware, experiment_name="/Shared/production-app")

Every HTTP request (but excluded paths) runs inside its own MLflow trace; the trace ID and client request
ID go back in response headers and, for event streams, in a final ``mlflow_trace`` event; feedback for
those traces is accepted at ``POST /feedback``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import time
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import mlflow
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._mlflow.trace_spool import configure_spool
from ._mlflow.tracing import MlflowBackend
from .asgi.exchange import TracedExchange
from .asgi.feedback_routes import FeedbackRoutes
from .asgi.routing import host_app, mount_feedback_routes, route_path
from .asgi.tracer import STATE_KEY as WEBSOCKET_STATE_KEY
from .asgi.tracer import RequestTracer
from .config import DEFAULT_EXCLUDE_PATHS, DEFAULT_OUTBOX_PATH, DEFAULT_REDACT_FIELDS, Settings
from .delivery.feedback_delivery import FeedbackDelivery
from .delivery.outbox import Outbox
from .delivery.registry import RecentTraces
from .env_config import apply_environment
from .intake.identity import IdentityResolver
from .intake.limits import FeedbackLimits, RateLimit
from .intake.schema import FeedbackSchema
from .intake.tokens import FeedbackTokens, as_secret_list

_DEFAULT_RATE_LIMIT = RateLimit()

logger = logging.getLogger("mlflow_feedback_middleware")


class MlflowFeedbackMiddleware:
    """Traces every HTTP request in MLflow, hands its trace ID to the client, and takes feedback on it.

    All arguments are optional; the README's configuration table describes each one.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        experiment_name: str | None = None,
        tracking_uri: str | None = None,
        feedback_path: str | None = "/feedback",
        trace_id_header: str = "X-MLflow-Trace-Id",
        request_id_header: str = "X-Request-ID",
        user_id_header: str = "X-User-ID",
        session_id_header: str = "X-Session-ID",
        exclude_paths: Iterable[str] = DEFAULT_EXCLUDE_PATHS,
        sse_final_event: bool | None = None,
        sse_event_name: str = "mlflow_trace",
        capture_request_body: bool = True,
        capture_response_body: bool = True,
        max_capture_bytes: int = 64 * 1024,
        max_feedback_body_bytes: int = 64 * 1024,
        feedback_wait_seconds: float = 15.0,
        feedback_sync_seconds: float = 1.0,
        trace_wait_seconds: float = 300.0,
        outbox_path: str | os.PathLike[str] | None = DEFAULT_OUTBOX_PATH,
        rating_scale: tuple[float, float] = (1, 5),
        startup_timeout_seconds: float = 10.0,
        shutdown_timeout_seconds: float = 10.0,
        mlflow_threads: int = 8,
        export: Literal["mlflow", "otlp"] = "mlflow",
        feedback_secret: str | bytes | Sequence[str | bytes] | None = None,
        feedback_token_ttl_seconds: float = 24 * 3600,
        feedback_token_header: str = "X-MLflow-Feedback-Token",
        identity: IdentityResolver | None = None,
        feedback_limits: FeedbackLimits | None = None,
        rate_limit: RateLimit | None = _DEFAULT_RATE_LIMIT,
        redact_fields: Iterable[str] = DEFAULT_REDACT_FIELDS,
        feedback_schema: FeedbackSchema | str | os.PathLike[str] | None = None,
        summary_token: str | None = None,
        trust_traceparent: bool = False,
    ) -> None:
        # Every argument still at its default may come from MLFLOW_FEEDBACK_<NAME> (see env_config).
        given = {name: value for name, value in locals().items() if name not in ("self", "app")}
        options = apply_environment(given, _ARGUMENT_DEFAULTS)
        self.app = app
        schema = options.pop("feedback_schema")
        outbox = options.pop("outbox_path")
        self.settings = settings = Settings(
            **{k: v for k, v in options.items() if k not in ("feedback_secret", "feedback_limits")},
            outbox_path=None if outbox is None else os.fspath(outbox),
            feedback_secrets=tuple(_secrets(options["feedback_secret"])),
            feedback_limits=options["feedback_limits"] or FeedbackLimits(),
            feedback_schema=schema
            if schema is None or isinstance(schema, FeedbackSchema)
            else FeedbackSchema.load(schema),
        )
        self.tokens = (
            FeedbackTokens(settings.feedback_secrets, settings.feedback_token_ttl_seconds)
            if settings.feedback_secrets
            else None
        )
        if self.tokens is None and settings.feedback_path is not None:
            logger.warning(
                "the feedback route %s is unauthenticated: anyone who can reach it and knows a trace ID can write"
                " feedback. Set feedback_secret= or MLFLOW_FEEDBACK_SECRET to require signed feedback tokens.",
                settings.feedback_path,
            )
        self.backend = MlflowBackend(
            settings.tracking_uri, settings.experiment_name, settings.mlflow_threads, settings.export
        )
        self.recent = RecentTraces()
        # Traces MLflow could not export go beside the outbox, for replay (one spool per process).
        outbox_dir = None if settings.outbox_path is None else os.path.dirname(os.path.abspath(settings.outbox_path))
        self.spool = configure_spool(None if outbox_dir is None else os.path.join(outbox_dir, "trace-spool.db"))
        self.delivery = FeedbackDelivery(
            # Without feedback routes nothing is ever queued: no file to create.
            _open_outbox(settings.outbox_path if settings.feedback_path is not None else None),
            self.backend,
            self.recent,
            _destination(settings.experiment_name),
            unknown_wait=settings.feedback_wait_seconds,
            known_wait=settings.trace_wait_seconds,
            exit_timeout=settings.shutdown_timeout_seconds,
        )
        self.feedback = (
            FeedbackRoutes(settings, self.backend, self.recent, self.delivery, self.tokens)
            if settings.feedback_path is not None
            else None
        )
        self.tracer = RequestTracer(app, settings, self.backend, self.recent, self.tokens)
        # None until the first call says whether the host app's router serves the feedback routes.
        self._routes_mounted: bool | None = None if self.feedback is not None else False

    def status(self) -> dict[str, Any]:
        """Backend reachability and outbox figures (what ``GET {feedback_path}/health`` shows). Blocking."""
        return self.delivery.status()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._routes_mounted is None:
            assert self.feedback is not None and self.settings.feedback_path is not None
            app = host_app(self.app, scope, type(self))
            self._routes_mounted = mount_feedback_routes(app, self.feedback, self.settings.feedback_path)
        kind = scope["type"]
        if kind != "http":
            if kind == "lifespan":
                receive, send = self._lifespan_receive(receive), self._lifespan_send(send)
            elif kind == "websocket":  # traced per turn by the handler: see traced_turn
                scope.setdefault("state", {})[WEBSOCKET_STATE_KEY] = self.tracer
            await self.app(scope, receive, send)
            return
        self.delivery.start()  # replays what an earlier process left, where no lifespan ran
        path = route_path(scope)
        if self.feedback is not None and self.feedback.handles(path):
            # Never traced; through the app's router where it could take the routes, so the middleware
            # added after this one (host checks, HTTPS redirects, authentication) guards them too.
            await (self.app if self._routes_mounted else self.feedback)(scope, receive, send)
            return
        if scope["method"] == "OPTIONS" or self.settings.is_excluded(path):
            await self.app(scope, receive, send)
            return
        if self.backend.experiment_id is None and (
            await self.backend.ready(self.settings.startup_timeout_seconds) is None
        ):
            await self.app(scope, receive, send)
            return
        await TracedExchange(self.tracer, scope, receive, send).run()

    def _lifespan_receive(self, receive: Receive) -> Receive:
        async def lifespan_receive() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.backend.ready(self.settings.startup_timeout_seconds)
                self.delivery.start()
            return message

        return lifespan_receive

    def _lifespan_send(self, send: Send) -> Send:
        async def lifespan_send(message: Message) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                # After the app's own shutdown, before the server exits: traces still batched in
                # MLflow's exporter would otherwise wait for (or miss) its exit hook. Feedback goes
                # last, as it may be waiting for those very traces.
                deadline = time.monotonic() + self.settings.shutdown_timeout_seconds
                await self.backend.flush(self.settings.shutdown_timeout_seconds)
                await asyncio.to_thread(self.delivery.flush, max(deadline - time.monotonic(), 1.0))
                self.backend.close()
            await send(message)

        return lifespan_send


_ARGUMENT_DEFAULTS = {
    name: parameter.default
    for name, parameter in inspect.signature(MlflowFeedbackMiddleware.__init__).parameters.items()
    if parameter.default is not inspect.Parameter.empty
}


def _secrets(secret: str | bytes | Sequence[str | bytes] | None) -> list[bytes]:
    """The configured secrets, the signing one first; from the environment when none is passed."""
    if secret is None:
        current = os.environ.get("MLFLOW_FEEDBACK_SECRET")
        if not current:
            return []
        previous = os.environ.get("MLFLOW_FEEDBACK_PREVIOUS_SECRET")
        secret = [current, previous] if previous else current
    return as_secret_list(secret)


def _open_outbox(path: str | None) -> Outbox:
    try:
        return Outbox(path)
    except Exception as exc:  # a read-only or full disk must not keep the service from starting
        logger.error("cannot open the feedback outbox at %s (%s); queued feedback is kept in memory only", path, exc)
        return Outbox(None)


def _destination(experiment_name: str | None) -> str:
    """What an outbox row is for: items of another service sharing the file are never delivered here."""
    try:
        uri = mlflow.get_tracking_uri()
    except Exception:  # no tracking URI: tracing is disabled, feedback is refused anyway
        uri = ""
    env = os.environ
    experiment = experiment_name or env.get("MLFLOW_EXPERIMENT_NAME") or env.get("MLFLOW_EXPERIMENT_ID", "0")
    return f"{uri}#{experiment}"
