"""The feedback endpoint the middleware mounts at `feedback_path` (never traced itself).

``POST /feedback?trace_id=...`` or ``?client_request_id=...`` (or the IDs in the body) with a JSON body of
`FeedbackRequest`'s shape. Every answer is JSON; bad input gets a 4xx naming the field, never a 500.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import importlib.resources
import json
import math
import re
from typing import Any

from pydantic import ValidationError
from starlette.requests import ClientDisconnect, HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from .._mlflow.tracing import MlflowBackend, logger
from ..config import Settings
from ..delivery.feedback_delivery import WAITING, FeedbackDelivery
from ..delivery.outbox import DELIVERED, Item, OutboxFull
from ..delivery.registry import RecentTraces
from ..delivery.writer import AMBIGUOUS, CHOSEN_BY_CLIENT, NOT_FOUND, REFUSED, REJECTED
from ..ids import clean_principal_id
from ..insight.report import GROUPINGS, build_report, parse_time, search_requests
from ..intake.identity import ANONYMOUS
from ..intake.limits import RateLimiter
from ..intake.models import (
    Assessment,
    FeedbackRequest,
    SignalsNotDeclared,
    limit_violations,
    retracted_names,
    retraction,
    scrub_assessments,
    targeted,
    to_assessments,
)
from ..intake.schema import SchemaError, default_schema
from ..intake.tokens import FeedbackGrant, FeedbackTokens, TokenError
from .routing import route_path

_ID_FIELDS = ("trace_id", "client_request_id")
# The delivery thread gives its "not found" verdict after `feedback_wait_seconds` plus its last retry
# delay (up to 5 s) and one call; past this margin the request stops waiting and answers 202.
_VERDICT_MARGIN_SECONDS = 10.0
_FEEDBACK_ID = re.compile(r"fb-[0-9a-f]{32}")
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")


class _BadRequest(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
        errors: list[dict[str, str]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers
        self.errors = errors if errors is not None else [{"field": field, "message": message}] if field else None

    def response(self) -> JSONResponse:
        return _error(self.status, self.message, self.errors, self.headers)


def _invalid(errors: list[tuple[str, str]]) -> _BadRequest:
    """The 422 for invalid feedback: every problem named by its field, the first in the message."""
    field, message = errors[0]
    return _BadRequest(
        422, f"invalid feedback: {field}: {message}", errors=[{"field": f, "message": m} for f, m in errors]
    )


def _error(
    status: int, message: str, errors: list[dict[str, str]] | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    # Messages and field paths may quote what the client sent (a path, a JSON key): never let its lone
    # surrogates turn a 4xx into a 500.
    body: dict[str, Any] = {"status": "error", "message": _encodable(message)}
    if errors:
        body["errors"] = [{key: _encodable(value) for key, value in error.items()} for error in errors]
    return JSONResponse(body, status_code=status, headers=headers)


def _encodable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _unauthorized(message: str) -> _BadRequest:
    return _BadRequest(401, message, "feedback_token", {"WWW-Authenticate": 'MLflow-Feedback-Token realm="feedback"'})


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed in JSON")


class FeedbackRoutes:
    """An ASGI app answering requests under `settings.feedback_path`.

    Outbox reads and writes (local sqlite) go to the default thread pool; MLflow calls happen only on
    the delivery thread, so tracking-server calls stuck in MLflow's retries never keep feedback from
    being accepted.

    ``POST {path}`` takes feedback; ``GET {path}/schema`` describes what it takes (for frontends);
    ``GET {path}/client.js`` is the browser client;
    ``GET {path}/health`` reports the backend and the outbox;
    ``GET {path}/<feedback_id>`` tells what became of one accepted feedback.
    """

    def __init__(
        self,
        settings: Settings,
        backend: MlflowBackend,
        recent: RecentTraces,
        delivery: FeedbackDelivery,
        tokens: FeedbackTokens | None,
    ) -> None:
        assert settings.feedback_path is not None
        self._path = settings.feedback_path
        self._prefix = settings.feedback_path + "/"
        self._settings = settings
        self._backend = backend
        self._recent = recent
        self._delivery = delivery
        self._tokens = tokens
        self._schema = settings.feedback_schema
        self._token_header = settings.feedback_token_header
        limit, answer_of = settings.rate_limit, self._signed_answer if tokens is not None else None
        self._limiter = RateLimiter(limit, answer_of) if limit is not None else None
        # Reads (status, health, schema, summary) get their own bucket of the same size: a client polling
        # its vote's status never uses up its votes.
        self._read_limiter = RateLimiter(limit, answer_of) if limit is not None else None

    def _signed_answer(self, conn: HTTPConnection) -> str | None:
        """The answer a request's feedback token (header) was signed for; None without a valid one."""
        token = conn.headers.get(self._token_header)
        if not token or self._tokens is None:
            return None
        try:
            grant = self._tokens.verify(token)
        except TokenError:
            return None
        return f"{grant.trace_id}\n{grant.client_request_id}"

    def handles(self, path: str) -> bool:
        """Whether `path` belongs to the feedback routes."""
        return path == self._path or path.startswith(self._prefix)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        path = route_path(scope)
        response: Response
        if self._read_limiter is not None and request.method == "GET" and path != self._prefix + "client.js":
            wait = self._read_limiter.take(request)
            if wait > 0:  # token guesses on /summary, status polling floods
                retry = str(math.ceil(wait))
                await _error(429, f"too many requests; retry in {retry} s", headers={"Retry-After": retry})(
                    scope, receive, send
                )
                return
        if path == self._path and request.method == "POST":
            try:
                response = await self._post(request)
            except ClientDisconnect:  # nobody left to answer, and nothing was written
                return
            except _BadRequest as exc:
                response = exc.response()
        elif path == self._path and request.method == "DELETE":
            try:
                response = await self._post(request, retract=True)
            except ClientDisconnect:
                return
            except _BadRequest as exc:
                response = exc.response()
        elif path == self._path:
            response = _error(405, "use POST to send feedback (DELETE to withdraw it)")
            response.headers["Allow"] = "POST, DELETE"
        elif path == self._prefix + "health" and request.method == "GET":
            response = await self._health()
        elif path == self._prefix + "summary" and request.method == "GET" and self._settings.summary_token:
            response = await self._summary(request)
        elif path == self._prefix + "client.js" and request.method == "GET":
            response = Response(_client_js(), media_type="text/javascript; charset=utf-8")
            response.headers["Cache-Control"] = "public, max-age=300"
        elif path == self._prefix + "schema" and request.method == "GET":
            schema = (
                {**self._schema.to_dict(), "declared": True}
                if self._schema
                else default_schema(self._settings.rating_scale)
            )
            response = JSONResponse(schema)
        elif _FEEDBACK_ID.fullmatch(path[len(self._prefix) :]) and request.method == "GET":
            item = await asyncio.to_thread(self._delivery.outbox.get, path[len(self._prefix) :])
            response = JSONResponse(item.to_public()) if item else _error(404, "no such feedback")
        else:
            response = _error(404, f"no feedback route at {path}")
        await response(scope, receive, send)

    async def _summary(self, request: Request) -> JSONResponse:
        """The report over a recent window (``?since=24h&by=day``), for dashboards holding the admin token."""
        expected = f"Bearer {self._settings.summary_token}".encode()
        if not hmac.compare_digest(request.headers.get("authorization", "").encode(), expected):
            return _error(401, "the summary needs the admin token", headers={"WWW-Authenticate": "Bearer"})
        by = request.query_params.get("by")
        if by is not None and by not in GROUPINGS:
            return _error(422, f"by must be one of: {', '.join(GROUPINGS)}", [{"field": "by", "message": "unknown"}])
        since = request.query_params.get("since", "24h")
        try:
            since_ms = parse_time(since)
        except ValueError as exc:
            return _error(422, str(exc), [{"field": "since", "message": str(exc)}])
        experiment_id = await self._backend.ready(self._settings.startup_timeout_seconds)
        if experiment_id is None:
            return _error(503, "the MLflow experiment is not available")

        def build() -> dict[str, Any]:
            rows = search_requests(experiment_id, since_ms)
            return build_report(rows, by, self._schema, experiment_id=experiment_id, since=since)

        try:
            return JSONResponse(await asyncio.to_thread(build))
        except Exception as exc:  # the tracking server is down or refused the search
            logger.warning("feedback summary failed: %s", exc)
            return _error(503, "the tracking server could not be searched; try again later")

    async def _health(self) -> JSONResponse:
        """Backend reachability and outbox figures; 503 while feedback cannot reach MLflow."""
        status = await asyncio.to_thread(self._delivery.status)
        oldest = status["outbox"]["oldest_queued_seconds"]
        healthy = (
            status["experiment_id"] is not None
            and status["reachable"]
            and (oldest is None or oldest < self._settings.trace_wait_seconds)
        )
        return JSONResponse({"status": "ok" if healthy else "degraded", **status}, status_code=200 if healthy else 503)

    async def _post(self, request: Request, retract: bool = False) -> JSONResponse:
        """Take a vote (or, with `retract`, a ``DELETE``: withdraw votes named by ``?name=``, the body's
        ``retract``, or else the thumbs)."""
        self._check_rate(request)  # before the body is read: a flood costs as little as possible
        idempotency_key = request.headers.get("idempotency-key")
        if idempotency_key is not None and not _IDEMPOTENCY_KEY.fullmatch(idempotency_key):
            raise _BadRequest(400, "Idempotency-Key must be 1-255 printable ASCII characters", "Idempotency-Key")
        data = await self._read_json(request)
        for field in (*_ID_FIELDS, "user_id"):
            query_value = request.query_params.get(field)
            if query_value is None:
                continue
            if field in data and data[field] != query_value:
                raise _BadRequest(400, f"'{field}' differs between the query string and the body", field)
            data[field] = query_value
        if retract:
            names = request.query_params.getlist("name")
            data.setdefault("retract", names or True)
        grant = self._grant(request.headers.get(self._token_header, data.pop("feedback_token", None)))
        user = self._user(request, data.pop("user_id", None), grant)
        feedback = self._validated(data, grant)
        assessments = targeted(self._assessments(feedback), feedback)
        if self._backend.disabled_reason is not None:
            return _error(503, "MLflow tracing is disabled in this service, so no feedback can be stored")
        trace_id = self._trace_of(feedback, grant)
        issued_here = trace_id is not None and trace_id in self._recent
        crid = feedback.client_request_id
        item = Item(self._delivery.destination, trace_id, crid, user or ANONYMOUS, assessments, issued_here)
        if not issued_here:
            # Issued by another worker or replica of this service: its token says so across hosts, the
            # outbox file's record across one host's workers. Then the vote waits for the trace as long as
            # that worker's own would (the experiment is still checked once the trace is there).
            item.vouched = grant is not None or await asyncio.to_thread(self._delivery.vouch, item)
        if idempotency_key is not None:
            # The same key from the same user always names the same item, in any process sharing the
            # outbox, and the same assessments in MLflow (their metadata carries the item ID).
            item.id = _idempotent_id(item.destination, item.source_id, idempotency_key)
        await self._backend.ready(self._settings.startup_timeout_seconds)  # a search needs the experiment
        # Status URLs as the client reaches them: behind a mount or a path-stripping proxy too.
        return await self._submit(item, request.scope.get("root_path", "") + self._path)

    def _check_rate(self, request: Request) -> None:
        if self._limiter is not None and (wait := self._limiter.take(request)) > 0:
            retry = str(math.ceil(wait))
            raise _BadRequest(429, f"too many feedback requests; retry in {retry} s", None, {"Retry-After": retry})

    def _validated(self, data: dict[str, Any], grant: FeedbackGrant | None) -> FeedbackRequest:
        """The feedback the body asks for, within the limits and naming one trace (the token's, if none)."""
        if data.get("trace_id") is not None and data.get("client_request_id") is not None:
            raise _BadRequest(400, "give either trace_id or client_request_id, not both", "trace_id")
        try:
            # With a declared schema its scales give the ranges, checked when it builds the assessments.
            scale = None if self._schema is not None else self._settings.rating_scale
            feedback = FeedbackRequest.model_validate(data, context={"rating_scale": scale})
        except ValidationError as exc:
            details = exc.errors(include_url=False, include_context=False, include_input=False)
            raise _invalid([(".".join(str(p) for p in e["loc"]) or "body", e["msg"]) for e in details]) from None
        if feedback.trace_id is None and feedback.client_request_id is None:
            if grant is None:
                raise _BadRequest(422, "trace_id or client_request_id is required", "trace_id")
            feedback.trace_id = grant.trace_id
        too_big = limit_violations(feedback, self._settings.feedback_limits)
        if too_big:
            raise _invalid(too_big)
        if grant is not None:
            if feedback.trace_id is not None and feedback.trace_id != grant.trace_id:
                raise _BadRequest(403, "the feedback token was issued for another trace", "feedback_token")
            if feedback.client_request_id is not None and feedback.client_request_id != grant.client_request_id:
                raise _BadRequest(403, "the feedback token was issued for another request", "feedback_token")
        return feedback

    def _assessments(self, feedback: FeedbackRequest) -> list[Assessment]:
        if feedback.retract is not None:
            names = retracted_names(feedback)
            if self._schema is not None and (unknown := set(names) - set(self._schema.stored_names())):
                declared = ", ".join(self._schema.stored_names())
                raise _invalid([("retract", f"{', '.join(sorted(unknown))} not declared here; feedback: {declared}")])
            return [retraction(name) for name in names]
        try:
            if self._schema is not None:
                assessments = self._schema.to_assessments(feedback)
            else:
                assessments = to_assessments(feedback, self._settings.rating_scale[1])
        except SchemaError as exc:
            raise _invalid([(exc.field, exc.message)]) from None
        except SignalsNotDeclared as exc:
            raise _invalid([("signal", str(exc))]) from None
        scrubber = self._settings.comment_scrubber
        if scrubber is None:
            return assessments
        schema = self._schema
        # Declared choices are the schema's own words; any other string value is what a user typed.
        return scrub_assessments(assessments, scrubber, lambda name: schema is None or schema.is_free_text(name))

    def _trace_of(self, feedback: FeedbackRequest, grant: FeedbackGrant | None) -> str | None:
        """The trace the feedback is for, where this process knows it: the token's, the request's, or the one its
        client request ID names here (None: to be searched for)."""
        if grant is not None:
            return grant.trace_id  # signed by this service: no search needed
        if feedback.trace_id is not None:
            return feedback.trace_id
        assert feedback.client_request_id is not None
        found = self._recent.lookup(feedback.client_request_id)
        if found.ambiguous:
            raise _BadRequest(409, AMBIGUOUS, "client_request_id")
        if found.chosen_by_client:
            raise _BadRequest(403, CHOSEN_BY_CLIENT, "client_request_id")
        return found.trace_id

    def _grant(self, token: object) -> FeedbackGrant | None:
        """The permission a token carries; None when tokens are off. Raises 401 when it grants nothing."""
        if self._tokens is None:
            return None
        if token is None:
            raise _unauthorized(f"a feedback token is required: send the {self._token_header} header of the answer")
        if not isinstance(token, str):
            raise _unauthorized("the feedback token must be a string")
        try:
            return self._tokens.verify(token)
        except TokenError as exc:
            raise _unauthorized(exc.message) from None

    def _user(self, request: Request, claimed: object, grant: FeedbackGrant | None) -> str | None:
        """Who gives the feedback: the identity resolver's user, a `user_id` the request names, or the
        token's user; any two that disagree are refused."""
        resolved = self._settings.user_of(request)
        if claimed is not None:
            cleaned = clean_principal_id(claimed) if isinstance(claimed, str) else None
            if cleaned is None:
                raise _BadRequest(422, "user_id must be 1-250 printable ASCII characters", "user_id")
            if resolved is not None and cleaned != resolved:
                raise _BadRequest(403, "user_id is not the user making the request", "user_id")
            resolved = cleaned
        if grant is None:
            return resolved
        if resolved is not None and resolved != grant.user_id:
            raise _BadRequest(403, "the feedback token was issued to another user", "feedback_token")
        return grant.user_id

    async def _submit(self, item: Item, public_path: str) -> JSONResponse:
        """Store `item` and answer with its first decisive outcome, or 202 while it is still pending."""
        # A trace this process issued is worth queueing for; any other ID is waited for here, until MLflow
        # has it or has said "not found" for `feedback_wait_seconds`, so a made-up ID gets its 404.
        wait = (
            self._settings.feedback_sync_seconds
            if item.issued_here or item.vouched
            else self._settings.feedback_wait_seconds + _VERDICT_MARGIN_SECONDS
        )
        outcome_future = self._delivery.expect(item.id, asyncio.get_running_loop())
        try:
            try:
                earlier = await asyncio.to_thread(self._delivery.accept, item)
            except OutboxFull as exc:
                logger.warning("feedback refused: %s (the tracking server may be down)", exc)
                return _error(
                    503, "too much feedback is waiting for delivery; try again later", headers={"Retry-After": "60"}
                )
            except Exception:
                logger.error("could not store feedback in the outbox at %s", self._delivery.outbox.path, exc_info=True)
                return _error(503, "the feedback store is unavailable; try again later")
            if earlier is not None:
                return _replayed(item, earlier, public_path)
            self._delivery.start()
            try:
                outcome, item = await asyncio.wait_for(outcome_future, wait)
            except TimeoutError:
                outcome = WAITING  # still pending: the background thread goes on with it
        finally:
            self._delivery.forget(item.id)
        if outcome == DELIVERED:
            return JSONResponse(_success(item))
        if outcome in (NOT_FOUND, REJECTED, REFUSED) and not item.assessment_ids:
            await asyncio.to_thread(self._delivery.outbox.remove, item.id)  # refused, so never accepted
            if outcome == NOT_FOUND:
                what = f"trace {item.trace_id!r}" if item.trace_id else f"client_request_id {item.client_request_id!r}"
                return _error(404, f"{what} not found")
            if outcome == REFUSED and item.refusal is not None:
                status, message, field = item.refusal
                return _error(status, message, [{"field": field, "message": message}])
            # The tracking server's own text stays in the log: it can name internals an anonymous caller
            # has no business reading.
            logger.info("feedback %s refused by the tracking server: %s", item.id, item.last_error)
            return _error(422, "the tracking server refused this feedback")
        return _accepted(item, public_path)

    async def _read_json(self, request: Request) -> dict[str, Any]:
        limit = self._settings.max_feedback_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
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
        media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            # A cross-site form or text/plain body needs no CORS preflight; a JSON one does, which is what
            # keeps another site from voting with a signed-in user's cookies.
            raise _BadRequest(415, "send the feedback as Content-Type: application/json", "Content-Type")
        try:
            data = json.loads(raw, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:
            raise _BadRequest(400, f"the body is not valid JSON: {exc}", "body") from None
        if not isinstance(data, dict):
            raise _BadRequest(422, "the body must be a JSON object", "body")
        return data


@functools.cache
def _client_js() -> bytes:
    return (importlib.resources.files(__package__) / "static" / "client.js").read_bytes()


def _idempotent_id(destination: str, source_id: str, key: str) -> str:
    digest = hashlib.sha256("\n".join((destination, source_id, key)).encode()).hexdigest()
    return "fb-" + digest[:32]


def _recorded(item: Item) -> dict[str, Any]:
    return {a.name: a.value for a in item.assessments}


def _success(item: Item) -> dict[str, Any]:
    return {
        "status": "success",
        "feedback_id": item.id,
        "trace_id": item.trace_id,
        "feedback_recorded": _recorded(item),
        "assessment_ids": item.assessment_ids,
    }


def _accepted(item: Item, path: str, headers: dict[str, str] | None = None) -> JSONResponse:
    status_url = f"{path}/{item.id}"
    body = {
        "status": "accepted",
        "feedback_id": item.id,
        "trace_id": item.trace_id,
        "client_request_id": item.client_request_id,
        "feedback_recorded": _recorded(item),
        "status_url": status_url,
    }
    return JSONResponse(body, status_code=202, headers={"Location": status_url, **(headers or {})})


def _replayed(item: Item, earlier: Item, path: str) -> JSONResponse:
    """The answer to a retry carrying an Idempotency-Key already used: the first request's item."""
    same = (
        earlier.client_request_id == item.client_request_id
        and (item.trace_id is None or earlier.trace_id == item.trace_id)
        and earlier.assessments == item.assessments
    )
    if not same:
        raise _BadRequest(422, "this Idempotency-Key was already used for different feedback", "Idempotency-Key")
    replayed = {"Idempotent-Replayed": "true"}
    if earlier.state == DELIVERED:
        return JSONResponse(_success(earlier), headers=replayed)
    return _accepted(earlier, path, replayed)
