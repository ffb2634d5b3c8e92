"""Configuration from MLFLOW_FEEDBACK_* variables, and the logging filter that puts IDs on log records."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from mlflow_feedback_middleware import (
    FeedbackRequest,
    MlflowFeedbackMiddleware,
    TraceIdLogFilter,
    document_feedback_routes,
)

from .apps import build_app
from .support import client_for

pytestmark = pytest.mark.anyio


async def test_a_service_configured_by_environment_only(experiment_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "MLFLOW_FEEDBACK_EXPERIMENT_NAME": experiment_name,
        "MLFLOW_FEEDBACK_TRACE_ID_HEADER": "X-Trace",
        "MLFLOW_FEEDBACK_FEEDBACK_PATH": "/votes",
        "MLFLOW_FEEDBACK_EXCLUDE_PATHS": '["^/items/"]',
        "MLFLOW_FEEDBACK_RATE_LIMIT": "0.5,1",
        "MLFLOW_FEEDBACK_FEEDBACK_LIMITS": '{"max_text_chars": 5}',
        "MLFLOW_FEEDBACK_REDACT_FIELDS": "message, secret",
        "MLFLOW_FEEDBACK_SUMMARY_TOKEN": "summary-token-0123456789",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    async with client_for(build_app()) as client:
        answer = await client.post("/chat", json={"message": "hello"})
        assert "x-trace" in answer.headers and "x-mlflow-trace-id" not in answer.headers
        assert "x-trace" not in (await client.get("/items/3")).headers  # excluded
        long = await client.post(
            f"/votes?trace_id={answer.headers['x-trace']}", json={"is_correct": True, "comment": "too long"}
        )
        assert long.status_code == 422 and long.json()["errors"][0]["field"] == "comment"
        assert (await client.post("/votes", json={})).status_code == 429  # a burst of 1, spent above
        summary = await client.get("/votes/summary", headers={"Authorization": "Bearer summary-token-0123456789"})
        assert summary.status_code == 200


def test_code_wins_over_the_environment_and_bad_values_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_FEEDBACK_TRACE_ID_HEADER", "X-From-Env")
    assert (
        MlflowFeedbackMiddleware(build_app(), trace_id_header="X-From-Code").settings.trace_id_header == "X-From-Code"
    )
    assert MlflowFeedbackMiddleware(build_app()).settings.trace_id_header == "X-From-Env"
    monkeypatch.setenv("MLFLOW_FEEDBACK_MAX_CAPTURE_BYTES", "lots")
    with pytest.raises(ValueError, match="MLFLOW_FEEDBACK_MAX_CAPTURE_BYTES='lots' is not a valid max_capture_bytes"):
        MlflowFeedbackMiddleware(build_app())


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.addFilter(TraceIdLogFilter())
        self.setFormatter(logging.Formatter("%(mlflow_trace_id)s %(client_request_id)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


async def test_log_records_carry_the_request_ids(experiment_name: str) -> None:
    app = build_app(experiment_name=experiment_name)
    log = logging.getLogger("tests.handler")
    records = Records()
    log.addHandler(records)
    log.setLevel(logging.INFO)

    @app.get("/logged")
    def logged() -> dict[str, Any]:  # a sync handler: runs in the threadpool
        log.info("inside")
        return {}

    try:
        async with client_for(app) as client:
            response = await client.get("/logged", headers={"X-Request-ID": "req-logged-1"})
        log.info("outside")
    finally:
        log.removeHandler(records)
    assert records.lines == [f"{response.headers['x-mlflow-trace-id']} req-logged-1 inside", "- - outside"]


async def test_fastapi_apps_can_show_the_feedback_routes_in_openapi(experiment_name: str) -> None:
    plain = build_app(experiment_name=experiment_name)
    async with client_for(plain) as client:
        assert "/feedback" not in (await client.get("/openapi.json")).json()["paths"]  # opt-in only
    app = build_app(experiment_name=experiment_name, feedback_secret="openapi-secret-0123456789")
    document_feedback_routes(app, token_header="X-MLflow-Feedback-Token")
    async with client_for(app) as client:
        document = (await client.get("/openapi.json")).json()
        docs = await client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    post = document["paths"]["/feedback"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/FeedbackRequest"
    }
    assert set(post["responses"]) >= {"200", "202", "401", "403", "404", "422", "429"}
    assert "X-MLflow-Feedback-Token" in {p["name"] for p in post["parameters"]}
    request_schema = document["components"]["schemas"]["FeedbackRequest"]
    assert {"trace_id", "is_correct", "comment", "ratings", "name", "value"} <= set(request_schema["properties"])
    for example in post["requestBody"]["content"]["application/json"]["examples"].values():
        FeedbackRequest.model_validate(example["value"])  # the examples are valid requests
    assert "/chat" in document["paths"] and "/feedback/{feedback_id}" in document["paths"]
    _refs_resolve(document, document)


def _refs_resolve(node: Any, document: dict[str, Any]) -> None:
    """Every $ref in the document points at a schema it defines."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str):
            assert ref.rsplit("/", 1)[1] in document["components"]["schemas"], ref
        for value in node.values():
            _refs_resolve(value, document)
    elif isinstance(node, list):
        for value in node:
            _refs_resolve(value, document)
