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
from .config import UNSET, Settings, Unset
from .delivery.feedback_delivery import FeedbackDelivery
from .delivery.outbox import Outbox
from .delivery.registry import RecentTraces
from .delivery.review import ReviewRouter
from .intake.identity import IdentityResolver
from .intake.limits import FeedbackLimits, RateLimit
from .intake.schema import FeedbackSchema
from .intake.scrubbing import Scrubber
from .intake.tokens import FeedbackTokens
from .logs import show_logs

logger = logging.getLogger("mlflow_feedback_middleware")


class MlflowFeedbackMiddleware:
    """Traces every HTTP request in MLflow, hands its trace ID to the client, and takes feedback on it.

    All arguments are optional. One left `UNSET` takes its ``MLFLOW_FEEDBACK_<NAME>`` variable when that is set,
    else its default; `config.Settings` defines each (docs/configuration.md, `mlflow-feedback options`).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        experiment_name: str | Unset | None = UNSET,
        tracking_uri: str | Unset | None = UNSET,
        export: Literal["mlflow", "otlp"] | Unset = UNSET,
        mlflow_threads: int | Unset = UNSET,
        startup_timeout_seconds: float | Unset = UNSET,
        shutdown_timeout_seconds: float | Unset = UNSET,
        exclude_paths: Iterable[str] | Unset = UNSET,
        capture_request_body: bool | Unset = UNSET,
        capture_response_body: bool | Unset = UNSET,
        max_capture_bytes: int | Unset = UNSET,
        redact_fields: Iterable[str] | Unset = UNSET,
        trace_id_header: str | Unset = UNSET,
        request_id_header: str | Unset = UNSET,
        user_id_header: str | Unset = UNSET,
        session_id_header: str | Unset = UNSET,
        sse_final_event: bool | Unset | None = UNSET,
        sse_event_name: str | Unset = UNSET,
        trust_traceparent: bool | Unset = UNSET,
        feedback_path: str | Unset | None = UNSET,
        max_feedback_body_bytes: int | Unset = UNSET,
        feedback_schema: FeedbackSchema | str | os.PathLike[str] | Unset | None = UNSET,
        rating_scale: tuple[float, float] | Unset = UNSET,
        feedback_limits: FeedbackLimits | Unset | None = UNSET,
        rate_limit: RateLimit | Unset | None = UNSET,
        comment_scrubber: Scrubber | Unset | None = UNSET,
        summary_token: str | Unset | None = UNSET,
        feedback_secret: str | bytes | Sequence[str | bytes] | Unset | None = UNSET,
        feedback_token_ttl_seconds: float | Unset = UNSET,
        feedback_token_header: str | Unset = UNSET,
        identity: IdentityResolver | Unset | None = UNSET,
        feedback_sync_seconds: float | Unset = UNSET,
        feedback_wait_seconds: float | Unset = UNSET,
        trace_wait_seconds: float | Unset = UNSET,
        outbox_path: str | os.PathLike[str] | Unset | None = UNSET,
        review_queue: str | Unset | None = UNSET,
    ) -> None:
        # The options, their defaults and their MLFLOW_FEEDBACK_<NAME> variables are defined in config.Settings:
        # an argument left UNSET takes its variable, else its default; one given here wins.
        given = {k: v for k, v in locals().items() if k not in ("self", "app") and v is not UNSET}
        show_logs()
        self.app = app
        self.settings = settings = Settings.from_arguments(given)
        self.tokens = (
            FeedbackTokens(settings.feedback_secret, settings.feedback_token_ttl_seconds)
            if settings.feedback_secret
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
        if settings.feedback_path is not None:
            signed = "signed tokens" if self.tokens is not None else "no tokens"
            self.backend.announcement = f"; feedback at {settings.feedback_path}, {signed}"
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
            review=ReviewRouter(settings.review_queue, settings.feedback_schema) if settings.review_queue else None,
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
