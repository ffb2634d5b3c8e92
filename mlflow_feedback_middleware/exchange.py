"""One traced HTTP request/response: the root span, the ID headers, the SSE trailer and the captures.

A new `TracedExchange` serves each request, so no per-request state lives on the shared middleware.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from mlflow.entities import LiveSpan
from starlette.requests import HTTPConnection
from starlette.types import Message, Receive, Scope, Send

from .capture import BodyCapture, capture_for, media_type
from .context import RequestIds, current_ids
from .distributed import valid_traceparent
from .ids import clean_principal_id, is_valid_client_request_id, new_client_request_id
from .sse import SseTrailer
from .tracing import hoist_trace_tags, logger, rename_root, set_trace_tags

if TYPE_CHECKING:
    from .middleware import MlflowFeedbackMiddleware

_OUTCOME_ATTRIBUTE = "http.outcome"
_DISCONNECTED = "client_disconnected"
_INTERNAL_ERROR_BODY = b"Internal Server Error"


def _header_value(raw: bytes) -> str:
    return raw.decode("latin-1")


class TracedExchange:
    """Runs the app for one request inside its own MLflow trace."""

    __slots__ = (
        "_app_receive",
        "_app_send",
        "_entry_root_path",
        "_mw",
        "_request_body",
        "_response_body",
        "_sse",
        "client_gone",
        "ids",
        "response_complete",
        "response_started",
        "scope",
        "status",
    )

    def __init__(self, mw: MlflowFeedbackMiddleware, scope: Scope, receive: Receive, send: Send) -> None:
        self._mw = mw
        self.scope = scope
        self._app_receive = receive
        self._app_send = send
        self._entry_root_path: str = scope.get("root_path", "")
        self._request_body: BodyCapture | None = None
        self._response_body: BodyCapture | None = None
        self._sse: SseTrailer | None = None
        self.ids: RequestIds | None = None
        self.client_gone = False
        self.response_started = False
        self.response_complete = False
        self.status: int | None = None

    async def run(self) -> None:
        mw, scope = self._mw, self.scope
        settings = mw.settings
        request_id = session_id = traceparent = None
        content_type = ""
        for name, value in scope["headers"]:
            if name == mw.request_id_header_key:
                request_id = _header_value(value)
            elif name == b"traceparent":
                traceparent = valid_traceparent(_header_value(value))
            elif name == mw.session_id_header_key:
                session_id = clean_principal_id(_header_value(value))
            elif name == b"content-type":
                content_type = _header_value(value)
        if request_id is None or not is_valid_client_request_id(request_id):
            if request_id is not None:
                logger.debug("replacing malformed %s header value", settings.request_id_header)
            request_id = new_client_request_id()
        if settings.capture_request_body:
            self._request_body = capture_for(content_type, settings.max_capture_bytes)

        error: BaseException | None = None
        with mw.backend.start_root(f"{scope['method']} {scope['path']}", traceparent) as span:
            if not mw.backend.is_real(span):
                await mw.app(scope, self._app_receive, self._app_send)
                return
            assert isinstance(span, LiveSpan)
            self.ids = mw.adopt(span, HTTPConnection(scope), request_id, session_id)
            state = scope.setdefault("state", {})
            state["mlflow_trace_id"] = span.trace_id
            state["client_request_id"] = request_id
            state["mlflow_feedback_token"] = self.ids.feedback_token
            token = current_ids.set(self.ids)
            try:
                await mw.app(scope, self.receive, self.send)
            except BaseException as exc:
                error = exc
                if isinstance(exc, Exception) and not self.response_started and self._may_answer_error():
                    await self._send_internal_error()
            finally:
                current_ids.reset(token)
                self._finish(span, error)
        mw.recent.ended(self.ids.trace_id)
        if error is not None:
            raise error

    async def receive(self) -> Message:
        message = await self._app_receive()
        kind = message["type"]
        if kind == "http.request":
            if self._request_body is not None:
                self._request_body.add(message.get("body", b""))
        elif kind == "http.disconnect":
            self.client_gone = True
        return message

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            message = self._start_response(message)
        elif kind == "http.response.body":
            body: bytes = message.get("body", b"")
            more_body: bool = message.get("more_body", False)
            if self._response_body is not None:
                self._response_body.add(body)
            if self._sse is not None and not self.client_gone:
                out = self._sse.feed(body)
                if not more_body:
                    out += self._sse.finish()
                if out is not body:
                    message = {**message, "body": out}
            if not more_body:
                self.response_complete = True
        try:
            await self._app_send(message)
        except OSError:
            self.client_gone = True
            raise

    def _start_response(self, message: Message) -> Message:
        mw, settings = self._mw, self._mw.settings
        assert self.ids is not None
        self.response_started = True
        self.status = message["status"]
        headers: list[tuple[bytes, bytes]] = list(message.get("headers", ()))
        content_type = ""
        fixed_or_encoded = has_trace_id = has_request_id = has_token = False
        for name, value in headers:
            lower = name.lower()
            if lower == b"content-type":
                content_type = _header_value(value)
            elif lower in (b"content-length", b"content-encoding"):
                fixed_or_encoded = True
            elif lower == mw.trace_id_header_key:
                has_trace_id = True
            elif lower == mw.request_id_header_key:
                has_request_id = True
            elif lower == mw.token_header_key:
                has_token = True
        ids = self.ids
        if not has_trace_id:
            headers.append((mw.trace_id_header_key, ids.trace_id.encode()))
        if not has_request_id:
            headers.append((mw.request_id_header_key, ids.client_request_id.encode()))
        if ids.feedback_token is not None and not has_token:
            headers.append((mw.token_header_key, ids.feedback_token.encode()))
        if media_type(content_type) == "text/event-stream" and not fixed_or_encoded and settings.sse_final_event:
            event = {"type": "done", "trace_id": ids.trace_id, "client_request_id": ids.client_request_id}
            if ids.feedback_token is not None:
                event["feedback_token"] = ids.feedback_token
            self._sse = SseTrailer(settings.sse_event_name, event)
        if settings.capture_response_body:
            self._response_body = capture_for(content_type, settings.max_capture_bytes)
        return {**message, "headers": headers}

    def _may_answer_error(self) -> bool:
        # Inside Starlette's stack, ServerErrorMiddleware answers unhandled errors with a bare 500 that
        # never passes through us, so the ID headers would be lost. We send that same bare 500 ourselves,
        # unless the app has its own 500 handler or debug page, which must keep working unchanged.
        app = self.scope.get("app")
        if app is None:
            return True
        if getattr(app, "debug", False):
            return False
        handlers = getattr(app, "exception_handlers", {})
        return 500 not in handlers and Exception not in handlers

    async def _send_internal_error(self) -> None:
        try:
            await self.send(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [
                        (b"content-type", b"text/plain; charset=utf-8"),
                        (b"content-length", str(len(_INTERNAL_ERROR_BODY)).encode()),
                    ],
                }
            )
            await self.send({"type": "http.response.body", "body": _INTERNAL_ERROR_BODY})
        except Exception:  # the client may be gone; the original error is what matters
            logger.debug("could not send the 500 response", exc_info=True)

    def _finish(self, span: LiveSpan, error: BaseException | None) -> None:
        """Record inputs, outputs, name and outcome on the root span before it ends."""
        try:
            self._record(span, error)
        except Exception:  # recording is best effort; the response has been served
            logger.warning("could not record the request on its trace", exc_info=True)

    def _record(self, span: LiveSpan, error: BaseException | None) -> None:
        scope = self.scope
        method: str = scope["method"]
        route = scope.get("route")
        template = getattr(route, "path_format", None) or getattr(route, "path", None)
        if template:
            prefix = scope.get("root_path", "")[len(self._entry_root_path) :]
            rename_root(span, f"{method} {prefix}{template}", self._mw.backend.otlp)
            span.set_attribute("http.route", prefix + template)
        inputs: dict[str, Any] = {"method": method, "path": scope["path"]}
        query = scope.get("query_string", b"")
        if query:
            inputs["query"] = dict(parse_qsl(query.decode("latin-1"), keep_blank_values=True))
        if self._request_body is not None and self._request_body.size:
            inputs["body"] = self._request_body.value()
        inputs = self._mw.settings.redact(inputs)
        span.set_inputs(inputs)
        span.set_attribute("http.method", method)
        span.set_attribute("http.target", scope["path"])

        outputs: dict[str, Any] = {"status_code": self.status}
        if self._response_body is not None and self._response_body.size:
            outputs["body"] = self._mw.settings.redact(self._response_body.value())
        if self.status is not None:
            span.set_attribute("http.status_code", self.status)

        disconnected = not self.response_complete and (self.client_gone or isinstance(error, asyncio.CancelledError))
        if disconnected:
            # A client that leaves mid-answer is an outcome worth counting, not a server error.
            outputs["disconnected"] = True
            outcome = _DISCONNECTED
        elif isinstance(error, Exception):
            span.record_exception(error)
            outcome = "error"
        elif self.status is not None and self.status >= 500:
            span.set_status("ERROR")
            outcome = "error"
        else:
            outcome = "completed"
        span.set_attribute(_OUTCOME_ATTRIBUTE, outcome)
        if outcome != "completed":
            # searchable: tags.`http.outcome` = 'error'
            set_trace_tags(span, {_OUTCOME_ATTRIBUTE: outcome}, self._mw.backend.otlp)
        span.set_outputs(outputs)
        if self._mw.backend.otlp:
            hoist_trace_tags(span)
