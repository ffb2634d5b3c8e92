"""One traced HTTP request/response: the root span, the ID headers, the in-band trace ID and the captures.

A new `TracedExchange` serves each request, so no per-request state lives on the shared middleware.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import parse_qsl

from mlflow.entities import LiveSpan
from starlette.requests import HTTPConnection
from starlette.types import Message, Receive, Scope, Send

from .._mlflow.distributed import valid_traceparent
from .._mlflow.tracing import hoist_trace_tags, link_caller, logger, rename_root, set_trace_tags
from ..ids import clean_principal_id, is_valid_client_request_id, new_client_request_id
from .capture import BodyCapture, capture_for, media_type
from .context import RequestIds, current_ids
from .sse import SseTrailer, encode_event
from .tracer import RequestTracer
from .wire_formats import SseEventReader, format_from_headers, is_chat_answer, is_chat_request

_OUTCOME_ATTRIBUTE = "http.outcome"
_DISCONNECTED = "client_disconnected"
_INTERNAL_ERROR_BODY = b"Internal Server Error"
# MLflow AgentServer's request header (mlflow.genai.agent_server.RETURN_TRACE_HEADER): "true" asks for the
# trace ID in-band, as ``metadata.trace_id`` of a JSON answer or a ``data: {"trace_id": ...}`` stream event.
RETURN_TRACE_HEADER = b"x-mlflow-return-trace-id"
# A JSON answer is held back to add ``metadata.trace_id`` only up to this size; a larger one passes as it is.
_MAX_HELD_JSON_BYTES = 1 << 20
_WIRE_FORMAT_ATTRIBUTE = "http.response.wire_format"


def _header_value(raw: bytes) -> str:
    return raw.decode("latin-1")


class TracedExchange:
    """Runs the app for one request inside its own MLflow trace."""

    __slots__ = (
        "_app_receive",
        "_app_send",
        "_entry_root_path",
        "_held",
        "_held_start",
        "_reader",
        "_request_body",
        "_response_body",
        "_return_trace_id",
        "_sse",
        "_tracer",
        "client_gone",
        "ids",
        "response_complete",
        "response_started",
        "scope",
        "status",
    )

    def __init__(self, tracer: RequestTracer, scope: Scope, receive: Receive, send: Send) -> None:
        self._tracer = tracer
        self.scope = scope
        self._app_receive = receive
        self._app_send = send
        self._entry_root_path: str = scope.get("root_path", "")
        self._request_body: BodyCapture | None = None
        self._response_body: BodyCapture | None = None
        self._sse: SseTrailer | None = None
        self._reader: SseEventReader | None = None
        self._return_trace_id = False
        self._held_start: Message | None = None  # a JSON answer's start, held to add metadata.trace_id
        self._held: list[bytes] = []
        self.ids: RequestIds | None = None
        self.client_gone = False
        self.response_started = False
        self.response_complete = False
        self.status: int | None = None

    async def run(self) -> None:
        tracer, scope = self._tracer, self.scope
        settings = tracer.settings
        request_id = session_id = traceparent = None
        content_type = ""
        for name, value in scope["headers"]:
            if name == tracer.request_id_header_key:
                request_id = _header_value(value)
            elif name == b"traceparent":
                traceparent = valid_traceparent(_header_value(value))
            elif name == tracer.session_id_header_key:
                session_id = clean_principal_id(_header_value(value))
            elif name == b"content-type":
                content_type = _header_value(value)
            elif name == RETURN_TRACE_HEADER:
                self._return_trace_id = value.strip().lower() == b"true"
        chosen_by_client = request_id is not None and is_valid_client_request_id(request_id)
        if request_id is None or not chosen_by_client:
            if request_id is not None:
                logger.debug("replacing malformed %s header value", settings.request_id_header)
            request_id = new_client_request_id()
        if settings.capture_request_body:
            self._request_body = capture_for(content_type, settings.max_capture_bytes)

        error: BaseException | None = None
        # A caller's trace is continued only when its callers are trusted to export it (see the README):
        # else a gateway's traceparent would leave this request unstored, or a forged one name another's trace.
        continued = traceparent if settings.trust_traceparent else None
        with tracer.backend.start_root(f"{scope['method']} {scope['path']}", continued) as span:
            if not tracer.backend.is_real(span):
                await tracer.app(scope, self._app_receive, self._app_send)
                return
            assert isinstance(span, LiveSpan)
            own = continued is None or span.parent_id is None  # a refused continuation starts a trace of its own
            self.ids = tracer.adopt(span, HTTPConnection(scope), request_id, session_id, own, chosen_by_client)
            if traceparent is not None and continued is None:
                link_caller(span, traceparent, tracer.backend.otlp)
            state = scope.setdefault("state", {})
            state["mlflow_trace_id"] = span.trace_id
            state["client_request_id"] = request_id
            state["mlflow_feedback_token"] = self.ids.feedback_token
            token = current_ids.set(self.ids)
            try:
                await tracer.app(scope, self.receive, self.send)
            except BaseException as exc:
                error = exc
                if isinstance(exc, Exception) and not self.response_started and self._may_answer_error():
                    await self._send_internal_error()
            finally:
                current_ids.reset(token)
                self._finish(span, error)
        tracer.recent.ended(self.ids.trace_id)
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
            if self._held_start is not None:
                self._held_start = message
                return
        elif kind == "http.response.body":
            body: bytes = message.get("body", b"")
            more_body: bool = message.get("more_body", False)
            if self._response_body is not None:
                self._response_body.add(body)
            if self._reader is not None:
                self._reader.feed(body)
                if not more_body:
                    self._reader.finish()
            if self._sse is not None and not self.client_gone:
                out = self._sse.feed(body)
                if not more_body:
                    out += self._sse.finish()
                if out is not body:
                    message = {**message, "body": out}
            if not more_body:
                self.response_complete = True
            if self._held_start is not None:
                released = await self._release_held(message)
                if released is None:
                    return
                message = released
        await self._send_raw(message)

    def _start_response(self, message: Message) -> Message:
        tracer, settings = self._tracer, self._tracer.settings
        assert self.ids is not None
        self.response_started = True
        self.status = message["status"]
        headers: list[tuple[bytes, bytes]] = list(message.get("headers", ()))
        content_type = ""
        fixed_length = encoded = has_trace_id = has_request_id = has_token = False
        for name, value in headers:
            lower = name.lower()
            if lower == b"content-type":
                content_type = _header_value(value)
            elif lower == b"content-length":
                fixed_length = True
            elif lower == b"content-encoding":
                encoded = True
            elif lower == tracer.trace_id_header_key:
                has_trace_id = True
            elif lower == tracer.request_id_header_key:
                has_request_id = True
            elif lower == tracer.token_header_key:
                has_token = True
        ids = self.ids
        if not has_trace_id:
            headers.append((tracer.trace_id_header_key, ids.trace_id.encode()))
        if not has_request_id:
            headers.append((tracer.request_id_header_key, ids.client_request_id.encode()))
        if ids.feedback_token is not None and not has_token:
            headers.append((tracer.token_header_key, ids.feedback_token.encode()))
        media = media_type(content_type)
        if media == "text/event-stream" and not (fixed_length or encoded):
            self._reader = SseEventReader(format_from_headers(headers), settings.capture_response_body)
            if settings.sse_final_event is not False:
                self._sse = SseTrailer(self._trace_event)
        elif (
            self._return_trace_id
            and (media == "application/json" or media.endswith("+json"))
            and not encoded
            and self.status == 200
        ):
            self._held_start = message  # replaced by the message with our headers on return
        if settings.capture_response_body:
            self._response_body = capture_for(content_type, settings.max_capture_bytes)
        return {**message, "headers": headers}

    def _trace_event(self, sep: bytes) -> bytes:
        """The in-band trace event for this stream, asked for once its wire format is known: see the
        README's trailer policy. Only called where `sse_final_event` is not False."""
        ids, settings = self.ids, self._tracer.settings
        assert ids is not None
        if self._return_trace_id:  # the client asked in MLflow AgentServer's words: its shape, exactly
            return encode_event(None, {"trace_id": ids.trace_id}, sep)
        if settings.sse_final_event is None and self._reader is not None and self._reader.format is not None:
            return b""  # an LLM wire format: its clients would parse our event as one of theirs
        # "done" is the seed guide's own final event (its React client switches on data.type); the event's name
        # tells it apart from the app's events. A WebSocket message has no name, so traced_turn's is typed
        # "mlflow_trace" instead, and "done" there would collide with apps' own end-of-turn messages.
        event = {"type": "done", "trace_id": ids.trace_id, "client_request_id": ids.client_request_id}
        if ids.feedback_token is not None:
            event["feedback_token"] = ids.feedback_token
        return encode_event(settings.sse_event_name, event, sep)

    async def _release_held(self, message: Message) -> Message | None:
        """Hold a JSON answer until it is complete, then send it with ``metadata.trace_id`` added (as MLflow's
        AgentServer does when asked). Returns the body message to send now, or None while still holding."""
        assert self._held_start is not None and self.ids is not None
        body: bytes = message.get("body", b"")
        self._held.append(body)
        more_body: bool = message.get("more_body", False)
        size = sum(len(part) for part in self._held)
        if more_body and size <= _MAX_HELD_JSON_BYTES:
            return None
        start, raw = self._held_start, b"".join(self._held)
        self._held_start, self._held = None, []
        if not more_body:
            try:
                answer = json.loads(raw)
            except ValueError:
                answer = None
            if isinstance(answer, dict):
                metadata = answer.get("metadata")
                answer["metadata"] = {**(metadata if isinstance(metadata, dict) else {}), "trace_id": self.ids.trace_id}
                raw = json.dumps(answer, ensure_ascii=False, separators=(",", ":")).encode()
                length = str(len(raw)).encode()
                start = {
                    **start,
                    "headers": [
                        (name, length if name.lower() == b"content-length" else value)
                        for name, value in start.get("headers", ())
                    ],
                }
        await self._send_raw(start)
        return {**message, "body": raw}

    async def _send_raw(self, message: Message) -> None:
        try:
            await self._app_send(message)
        except OSError:
            self.client_gone = True
            raise

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
            rename_root(span, f"{method} {prefix}{template}", self._tracer.backend.otlp)
            span.set_attribute("http.route", prefix + template)
        settings = self._tracer.settings
        inputs: dict[str, Any] = {"method": method, "path": scope["path"]}
        query = scope.get("query_string", b"")
        if query:
            inputs["query"] = dict(parse_qsl(query.decode("latin-1"), keep_blank_values=True))
        if self._request_body is not None and self._request_body.size:
            body = self._request_body.value()
            # An LLM call's messages are the inputs themselves, so MLflow's UI shows a conversation.
            inputs = body if is_chat_request(body) else {**inputs, "body": body}
        span.set_inputs(settings.redact(inputs))
        span.set_attribute("http.method", method)
        span.set_attribute("http.target", scope["path"])

        answer = self._reader.answer() if self._reader is not None else None
        if self._reader is not None and self._reader.format is not None:
            span.set_attribute(_WIRE_FORMAT_ATTRIBUTE, self._reader.format)
        outputs: dict[str, Any] = {"status_code": self.status}
        if self._response_body is not None and self._response_body.size:
            body = self._response_body.value()
            if answer is None and is_chat_answer(body):
                answer = body
            plain = self._reader.plain_events() if answer is None and self._reader is not None else None
            outputs["body"] = settings.redact(answer if answer is not None else plain if plain is not None else body)
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
            set_trace_tags(span, {_OUTCOME_ATTRIBUTE: outcome}, self._tracer.backend.otlp)
        chat_answer = answer is not None and "body" in outputs and outcome == "completed" and (self.status or 500) < 400
        span.set_outputs(outputs["body"] if chat_answer else outputs)
        if self._tracer.backend.otlp:
            hoist_trace_tags(span)
