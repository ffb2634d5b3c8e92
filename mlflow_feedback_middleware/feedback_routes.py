"""The feedback endpoint the middleware mounts at `feedback_path` (never traced itself).

``POST /feedback?trace_id=...`` or ``?client_request_id=...`` (or the IDs in the body) with a JSON body of
`FeedbackRequest`'s shape. Every answer is JSON; bad input gets a 4xx naming the field, never a 500.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from pydantic import ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from .config import Settings
from .delivery import WAITING, FeedbackDelivery
from .feedback_models import FeedbackRequest, to_assessments
from .feedback_writer import NOT_FOUND, REJECTED
from .ids import clean_principal_id
from .outbox import DELIVERED, Item
from .registry import RecentTraces
from .tracing import MlflowBackend, logger

ANONYMOUS = "anonymous"
_ID_FIELDS = ("trace_id", "client_request_id")
# The delivery thread gives its "not found" verdict after `feedback_wait_seconds` plus its last retry
# delay (up to 5 s) and one call; past this margin the request stops waiting and answers 202.
_VERDICT_MARGIN_SECONDS = 10.0
_FEEDBACK_ID = re.compile(r"fb-[0-9a-f]{32}")


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
    """An ASGI app answering requests under `settings.feedback_path`.

    Outbox reads and writes (local sqlite) go to the default thread pool; MLflow calls happen only on
    the delivery thread, so tracking-server calls stuck in MLflow's retries never keep feedback from
    being accepted.

    ``POST {path}`` takes feedback; ``GET {path}/health`` reports the backend and the outbox;
    ``GET {path}/<feedback_id>`` tells what became of one accepted feedback.
    """

    def __init__(
        self,
        settings: Settings,
        backend: MlflowBackend,
        recent: RecentTraces,
        delivery: FeedbackDelivery,
        user_id_header_key: bytes,
    ) -> None:
        assert settings.feedback_path is not None
        self._path = settings.feedback_path
        self._prefix = settings.feedback_path + "/"
        self._settings = settings
        self._backend = backend
        self._recent = recent
        self._delivery = delivery
        self._user_header = user_id_header_key.decode()

    def handles(self, path: str) -> bool:
        """Whether `path` belongs to the feedback routes."""
        return path == self._path or path.startswith(self._prefix)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        path: str = scope["path"]
        if path == self._path and request.method == "POST":
            try:
                response = await self._post(request)
            except ClientDisconnect:  # nobody left to answer, and nothing was written
                return
            except _BadRequest as exc:
                errors = [{"field": exc.field, "message": exc.message}] if exc.field else None
                response = _error(exc.status, exc.message, errors)
        elif path == self._path:
            response = _error(405, "use POST to send feedback")
            response.headers["Allow"] = "POST"
        elif path == self._prefix + "health" and request.method == "GET":
            response = await self._health()
        elif _FEEDBACK_ID.fullmatch(path[len(self._prefix) :]) and request.method == "GET":
            item = await asyncio.to_thread(self._delivery.outbox.get, path[len(self._prefix) :])
            response = JSONResponse(item.to_public()) if item else _error(404, "no such feedback")
        else:
            response = _error(404, f"no feedback route at {path}")
        await response(scope, receive, send)

    async def _health(self) -> JSONResponse:
        """Backend reachability and outbox figures; 503 while feedback cannot reach MLflow."""
        status = await asyncio.to_thread(self._delivery.status)
        oldest = status["outbox"]["oldest_pending_seconds"]
        healthy = (
            status["experiment_id"] is not None
            and status["reachable"]
            and (oldest is None or oldest < self._settings.trace_wait_seconds)
        )
        return JSONResponse({"status": "ok" if healthy else "degraded", **status}, status_code=200 if healthy else 503)

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
        if self._backend.disabled_reason is not None:
            return _error(503, "MLflow tracing is disabled in this service, so no feedback can be stored")
        trace_id = feedback.trace_id
        if trace_id is None:
            assert feedback.client_request_id is not None
            trace_id = self._recent.trace_for(feedback.client_request_id)
        issued_here = trace_id is not None and trace_id in self._recent
        item = Item(
            self._delivery.destination, trace_id, feedback.client_request_id, source_id, assessments, issued_here
        )
        await self._backend.ready(self._settings.startup_timeout_seconds)  # a search needs the experiment
        # A trace this process issued is worth queueing for; any other ID is waited for here, until MLflow
        # has it or has said "not found" for `feedback_wait_seconds`, so a made-up ID gets its 404.
        wait = (
            self._settings.feedback_sync_seconds
            if issued_here
            else self._settings.feedback_wait_seconds + _VERDICT_MARGIN_SECONDS
        )
        outcome_future = self._delivery.expect(item.id, asyncio.get_running_loop())
        try:
            try:
                await asyncio.to_thread(self._delivery.accept, item)
            except Exception:
                logger.error("could not store feedback in the outbox at %s", self._delivery.outbox.path, exc_info=True)
                return _error(503, "the feedback store is unavailable; try again later")
            self._delivery.start()
            try:
                outcome, item = await asyncio.wait_for(outcome_future, wait)
            except TimeoutError:
                outcome = WAITING  # still pending: the background thread goes on with it
        finally:
            self._delivery.forget(item.id)
        recorded = {a.name: a.value for a in assessments}
        if outcome == DELIVERED:
            return JSONResponse(
                {
                    "status": "success",
                    "feedback_id": item.id,
                    "trace_id": item.trace_id,
                    "feedback_recorded": recorded,
                    "assessment_ids": item.assessment_ids,
                }
            )
        if outcome in (NOT_FOUND, REJECTED) and not item.assessment_ids:
            await asyncio.to_thread(self._delivery.outbox.remove, item.id)  # refused, so never accepted
            if outcome == NOT_FOUND:
                what = f"trace {item.trace_id!r}" if item.trace_id else f"client_request_id {item.client_request_id!r}"
                return _error(404, f"{what} not found")
            return _error(422, f"MLflow rejected the feedback: {item.last_error}")
        status_url = f"{self._path}/{item.id}"
        return JSONResponse(
            {
                "status": "accepted",
                "feedback_id": item.id,
                "trace_id": item.trace_id,
                "client_request_id": item.client_request_id,
                "feedback_recorded": recorded,
                "status_url": status_url,
            },
            status_code=202,
            headers={"Location": status_url},
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
