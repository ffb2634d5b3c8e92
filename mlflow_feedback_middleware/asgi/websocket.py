"""WebSocket chat: one MLflow trace per conversational turn, and the same feedback loop as HTTP.

A WebSocket connection is long-lived, so the middleware does not trace it as one request; a handler
opens a trace per turn instead::

    @app.websocket("/ws")
    async def chat(websocket: WebSocket) -> None:
        await websocket.accept()
        async for message in websocket.iter_text():
            async with traced_turn(websocket, inputs={"message": message}) as turn:
                answer = await model(message)          # @mlflow.trace spans nest in the turn
                await websocket.send_json({"type": "answer", "text": answer})
                turn.set_outputs({"response": answer})
            # the turn's end sent {"type": "mlflow_trace", "trace_id", "client_request_id"[, "feedback_token"]}

Feedback on a turn goes to the same feedback routes, by trace ID or client request ID, with its token.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from mlflow.entities import LiveSpan
from starlette.websockets import WebSocket, WebSocketState

from .._mlflow.tracing import hoist_trace_tags, logger
from ..ids import clean_principal_id, new_client_request_id
from .context import RequestIds, current_ids
from .tracer import STATE_KEY, RequestTracer


class Turn:
    """One traced turn: its IDs (None when it is not traced) and its root span's inputs and outputs."""

    def __init__(self, ids: RequestIds | None, span: LiveSpan | None, redact: Any = None) -> None:
        self.ids = ids
        self.span = span
        self._redact = redact

    def set_outputs(self, outputs: Any) -> None:
        """Record the turn's answer on its trace (with `redact_fields` redacted, as HTTP outputs are)."""
        if self.span is not None:
            self.span.set_outputs(self._redact(outputs) if self._redact else outputs)


@asynccontextmanager
async def traced_turn(
    websocket: WebSocket, name: str | None = None, inputs: Any = None, send_ids: bool = True
) -> AsyncIterator[Turn]:
    """Run one turn of a WebSocket conversation inside its own MLflow trace.

    At the end of the turn, unless `send_ids` is False, its IDs go to the client as a JSON message
    ``{"type": "mlflow_trace", "trace_id", "client_request_id"}`` (plus ``feedback_token`` when the
    service signs tokens). Without the middleware in front of the app, or without a usable tracking
    server, the turn runs untraced and nothing is sent.
    """
    tracer: RequestTracer | None = websocket.scope.get("state", {}).get(STATE_KEY)
    if tracer is None or await tracer.backend.ready(tracer.settings.startup_timeout_seconds) is None:
        yield Turn(None, None)
        return
    path: str = websocket.scope.get("path", "")
    ids: RequestIds | None = None
    try:
        with tracer.backend.start_root(name or f"WEBSOCKET {path}") as span:
            if not tracer.backend.is_real(span):
                yield Turn(None, None)
                return
            assert isinstance(span, LiveSpan)
            session = clean_principal_id(websocket.headers.get(tracer.settings.session_id_header))
            ids = tracer.adopt(span, websocket, new_client_request_id(), session)
            if inputs is not None:
                span.set_inputs(tracer.settings.redact(inputs))
            span.set_attribute("websocket.path", path)
            reset = current_ids.set(ids)
            try:
                yield Turn(ids, span, tracer.settings.redact)
            finally:
                current_ids.reset(reset)
                if tracer.backend.otlp:
                    hoist_trace_tags(span)
    finally:
        if ids is not None:
            tracer.recent.ended(ids.trace_id)
    if send_ids and websocket.application_state == WebSocketState.CONNECTED:
        message = {"type": "mlflow_trace", "trace_id": ids.trace_id, "client_request_id": ids.client_request_id}
        if ids.feedback_token is not None:
            message["feedback_token"] = ids.feedback_token
        try:
            await websocket.send_json(message)
        except Exception:  # the client left; the trace is complete anyway
            logger.debug("could not send the turn's trace ID", exc_info=True)
