"""The feedback endpoint the middleware mounts at `feedback_path` (never traced itself).

``POST /feedback?trace_id=...`` or ``?client_request_id=...`` (or the IDs in the body) with a JSON body of
`FeedbackRequest`'s shape. Every answer is JSON; bad input gets a 4xx naming the field, never a 500.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from .config import Settings
from .feedback_models import FeedbackRequest, to_assessments
from .feedback_writer import FeedbackRejected, FeedbackWriter, StoreUnavailable, TraceNotFound
from .ids import clean_principal_id
from .registry import RecentTraces
from .tracing import MlflowBackend, logger

ANONYMOUS = "anonymous"
_ID_FIELDS = ("trace_id", "client_request_id")


class _BadRequest(Exception):
    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


def _error(status: int, message: str, errors: list[dict[str, str]] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"status": "error", "message": message}
    if errors:
        body["errors"] = errors
    return JSONResponse(body, status_code=status)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed in JSON")


class FeedbackRoutes:
    """An ASGI app answering requests under `settings.feedback_path`."""

    def __init__(
        self, settings: Settings, backend: MlflowBackend, recent: RecentTraces, user_id_header_key: bytes
    ) -> None:
        assert settings.feedback_path is not None
        self._path = settings.feedback_path
        self._prefix = settings.feedback_path + "/"
        self._settings = settings
        self._user_header = user_id_header_key.decode()
        self._writer = FeedbackWriter(backend, recent, settings.feedback_wait_seconds, settings.startup_timeout_seconds)

    def handles(self, path: str) -> bool:
        """Whether `path` belongs to the feedback routes."""
        return path == self._path or path.startswith(self._prefix)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        if scope["path"] != self._path:
            response = _error(404, f"no feedback route at {scope['path']}")
        elif request.method != "POST":
            response = _error(405, "use POST to send feedback")
            response.headers["Allow"] = "POST"
        else:
            try:
                response = await self._post(request)
            except ClientDisconnect:  # nobody left to answer, and nothing was written
                return
            except _BadRequest as exc:
                errors = [{"field": exc.field, "message": exc.message}] if exc.field else None
                response = _error(exc.status, exc.message, errors)
        await response(scope, receive, send)

    async def _post(self, request: Request) -> JSONResponse:
        data = await self._read_json(request)
        for field in (*_ID_FIELDS, "user_id"):
            query_value = request.query_params.get(field)
            if query_value is None:
                continue
            if field in data and data[field] != query_value:
                raise _BadRequest(400, f"'{field}' differs between the query string and the body", field)
            data[field] = query_value
        user_id = data.pop("user_id", None)
        if user_id is None:
            user_id = request.headers.get(self._user_header)
        source_id = ANONYMOUS
        if user_id is not None:
            cleaned = clean_principal_id(user_id) if isinstance(user_id, str) else None
            if cleaned is None:
                raise _BadRequest(422, "user_id must be 1-250 printable ASCII characters", "user_id")
            source_id = cleaned
        if data.get("trace_id") is not None and data.get("client_request_id") is not None:
            raise _BadRequest(400, "give either trace_id or client_request_id, not both", "trace_id")

        try:
            feedback = FeedbackRequest.model_validate(data, context={"rating_scale": self._settings.rating_scale})
        except ValidationError as exc:
            errors = [
                {"field": ".".join(str(p) for p in err["loc"]) or "body", "message": err["msg"]}
                for err in exc.errors(include_url=False, include_context=False, include_input=False)
            ]
            first = errors[0]
            return _error(422, f"invalid feedback: {first['field']}: {first['message']}", errors)
        if feedback.trace_id is None and feedback.client_request_id is None:
            raise _BadRequest(422, "trace_id or client_request_id is required", "trace_id")

        assessments = to_assessments(feedback, self._settings.rating_scale[1])
        try:
            if feedback.trace_id is not None:
                trace_id = feedback.trace_id
            else:
                assert feedback.client_request_id is not None
                trace_id = await self._writer.trace_id_for(feedback.client_request_id)
            assessment_ids = await self._writer.write(trace_id, assessments, source_id)
        except TraceNotFound as exc:
            return _error(404, str(exc))
        except FeedbackRejected as exc:
            return _error(422, f"MLflow rejected the feedback: {exc}")
        except StoreUnavailable as exc:
            logger.warning("could not store feedback: %s", exc)
            return _error(503, "the feedback store is unavailable; try again later")
        return JSONResponse(
            {
                "status": "success",
                "trace_id": trace_id,
                "feedback_recorded": {a.name: a.value for a in assessments},
                "assessment_ids": assessment_ids,
            }
        )

    async def _read_json(self, request: Request) -> dict[str, Any]:
        limit = self._settings.max_feedback_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _BadRequest(413, f"the body is larger than {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _BadRequest(413, f"the body is larger than {limit} bytes")
            chunks.append(chunk)
        raw = b"".join(chunks)
        if not raw.strip():
            return {}
        try:
            data = json.loads(raw, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:
            raise _BadRequest(400, f"the body is not valid JSON: {exc}", "body") from None
        if not isinstance(data, dict):
            raise _BadRequest(422, "the body must be a JSON object", "body")
        return data
