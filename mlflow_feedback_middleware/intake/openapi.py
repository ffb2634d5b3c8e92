"""The feedback routes in a FastAPI app's OpenAPI document and ``/docs``, on request.

The routes are served by the middleware, so FastAPI cannot see them; this adds their description::

    app.add_middleware(MlflowFeedbackMiddleware)
    document_feedback_routes(app)          # after the routes; before the first request to /openapi.json
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .models import FeedbackRequest

_TAG = "feedback"
_TRACE_ID = "tr-b54d190eedf8e112898243f078efaada"
_ERROR = {
    "type": "object",
    "properties": {
        "status": {"type": "string", "enum": ["error"]},
        "message": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
            },
        },
    },
    "required": ["status", "message"],
}
_RECORDED = {"type": "object", "additionalProperties": True, "example": {"user_feedback": True}}
_SUCCESS = {
    "type": "object",
    "properties": {
        "status": {"type": "string", "enum": ["success"]},
        "feedback_id": {"type": "string"},
        "trace_id": {"type": "string"},
        "feedback_recorded": _RECORDED,
        "assessment_ids": {"type": "array", "items": {"type": "string", "nullable": True}},
    },
}
_ACCEPTED = {
    "type": "object",
    "properties": {
        "status": {"type": "string", "enum": ["accepted"]},
        "feedback_id": {"type": "string"},
        "trace_id": {"type": "string", "nullable": True},
        "client_request_id": {"type": "string", "nullable": True},
        "feedback_recorded": _RECORDED,
        "status_url": {"type": "string"},
    },
}
_ITEM = {
    "type": "object",
    "properties": {
        "feedback_id": {"type": "string"},
        "state": {"type": "string", "enum": ["pending", "delivered", "failed"]},
        "trace_id": {"type": "string", "nullable": True},
        "client_request_id": {"type": "string", "nullable": True},
        "assessment_ids": {"type": "array", "items": {"type": "string", "nullable": True}},
        "attempts": {"type": "integer"},
        "error": {"type": "string", "nullable": True},
    },
}


def _json(schema: dict[str, Any], description: str, example: Any = None) -> dict[str, Any]:
    content: dict[str, Any] = {"schema": schema}
    if example is not None:
        content["example"] = example
    return {"description": description, "content": {"application/json": content}}


def _errors(*statuses: tuple[str, str]) -> dict[str, Any]:
    return {status: _json({"$ref": "#/components/schemas/FeedbackError"}, why) for status, why in statuses}


def feedback_openapi(feedback_path: str = "/feedback", token_header: str | None = None) -> dict[str, Any]:
    """OpenAPI ``paths`` and ``components.schemas`` for the feedback routes."""
    request_schema = FeedbackRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    definitions = request_schema.pop("$defs", {})
    id_params = [
        {"name": name, "in": "query", "required": False, "schema": {"type": "string"}, "description": why}
        for name, why in (
            ("trace_id", "The answer's trace ID (the X-MLflow-Trace-Id header or the final SSE event)."),
            ("client_request_id", "Or its client request ID (X-Request-ID)."),
            ("user_id", "The end user, as in MLflow's guide; must agree with the authenticated user."),
        )
    ]
    header_params = [
        {"name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string", "maxLength": 255}},
        {"name": "X-User-ID", "in": "header", "required": False, "schema": {"type": "string"}},
    ]
    if token_header:
        header_params.append(
            {
                "name": token_header,
                "in": "header",
                "required": False,
                "schema": {"type": "string"},
                "description": "The answer's feedback token (or `feedback_token` in the body).",
            }
        )
    examples = {
        "thumbs": {"summary": "MLflow's guide", "value": {"is_correct": True, "comment": "spot on"}},
        "ratings": {"summary": "Ratings", "value": {"ratings": {"accuracy": 4, "helpfulness": 5}}},
        "named": {"summary": "Any named value", "value": {"name": "issue", "value": ["wrong", "slow"]}},
        "retract": {"summary": "Withdraw the thumbs vote", "value": {"retract": True}},
    }
    responses: dict[str, Any] = {
        "200": _json(
            _SUCCESS,
            "Written to MLflow",
            {
                "status": "success",
                "feedback_id": "fb-0c7e…",
                "trace_id": _TRACE_ID,
                "feedback_recorded": {"user_feedback": True},
                "assessment_ids": ["a-cbccee0688334e1b9537ff11d9d70517"],
            },
        ),
        "202": _json(_ACCEPTED, "Stored in the outbox; delivered as soon as MLflow has the trace"),
        **_errors(
            ("400", "Malformed JSON or conflicting IDs"),
            ("401", "Feedback token missing, invalid or expired (when the service signs tokens)"),
            ("403", "Token for another trace or user"),
            ("404", "No such trace in this service's experiment"),
            ("413", "Body too large"),
            ("422", "Invalid feedback (the field is named in `errors`)"),
            ("429", "Rate limited; see Retry-After"),
            ("503", "Tracing disabled or the outbox unavailable"),
        ),
    }
    post = {
        "tags": [_TAG],
        "summary": "Send feedback on an answer",
        "operationId": "send_feedback",
        "parameters": id_params + header_params,
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/FeedbackRequest"}, "examples": examples}
            },
        },
        "responses": responses,
    }
    name_param = {
        "name": "name",
        "in": "query",
        "required": False,
        "schema": {"type": "array", "items": {"type": "string"}},
        "description": "A stored feedback name to withdraw; repeat for several.",
    }
    delete = {
        "tags": [_TAG],
        "summary": "Withdraw feedback on an answer",
        "description": 'The same as POST with `{"retract": [...]}`: the voter\'s votes of the `name`s given'
        " (the thumbs, `user_feedback`, when none) are overridden by a retraction; MLflow keeps them, invalid.",
        "operationId": "withdraw_feedback",
        "parameters": [*id_params, name_param, *header_params],
        "responses": responses,
    }
    paths = {
        feedback_path: {"post": post, "delete": delete},
        f"{feedback_path}/schema": {
            "get": {
                "tags": [_TAG],
                "summary": "The feedback this service takes",
                "operationId": "feedback_schema",
                "responses": {"200": _json({"type": "object"}, "The declared schema, or the default shapes")},
            }
        },
        f"{feedback_path}/health": {
            "get": {
                "tags": [_TAG],
                "summary": "Tracking server and outbox health",
                "operationId": "feedback_health",
                "responses": {
                    "200": _json({"type": "object"}, "Healthy"),
                    "503": _json({"type": "object"}, "Degraded"),
                },
            }
        },
        f"{feedback_path}/{{feedback_id}}": {
            "get": {
                "tags": [_TAG],
                "summary": "What became of accepted feedback",
                "operationId": "feedback_status",
                "parameters": [{"name": "feedback_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": _json(_ITEM, "Pending, delivered or failed"), **_errors(("404", "Unknown ID"))},
            }
        },
    }
    return {"paths": paths, "schemas": {"FeedbackRequest": request_schema, "FeedbackError": _ERROR, **definitions}}


def document_feedback_routes(app: Any, feedback_path: str = "/feedback", token_header: str | None = None) -> None:
    """Add the feedback routes to FastAPI `app`'s OpenAPI document (and so to ``/docs``)."""
    original: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = original()
            extra = feedback_openapi(feedback_path, token_header)
            document.setdefault("paths", {}).update(extra["paths"])
            document.setdefault("components", {}).setdefault("schemas", {}).update(extra["schemas"])
            app.openapi_schema = document
        return dict(app.openapi_schema)

    app.openapi = openapi
