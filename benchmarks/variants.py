"""The same small FastAPI app in each variant the benchmark compares.

- ``bare``: no tracing at all;
- ``seed``: the hand-written pattern of MLflow's feedback guide (``mlflow.start_span`` in each handler,
  ``update_current_trace(client_request_id=...)``, trace ID returned in the body);
- ``otel``: OpenTelemetry's ASGI middleware exporting OTLP to the tracking server's ``/v1/traces``;
- ``ours``: ``app.add_middleware(MlflowFeedbackMiddleware)`` with defaults;
- ``ours-otlp``: the same with ``export="otlp"``, its fastest documented setting.

Every variant serves ``POST /chat`` (JSON) and ``POST /chat/stream`` (SSE, five events).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import mlflow
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from mlflow.entities import MlflowExperimentLocation
from pydantic import BaseModel


class ChatRequest(BaseModel):
    message: str


def answer(message: str) -> str:
    return f"echo: {message}"


def _tokens(text: str) -> AsyncIterator[str]:
    async def gen() -> AsyncIterator[str]:
        for word in (text + " a b c").split()[:5]:
            yield f"data: {json.dumps({'type': 'token', 'content': word})}\n\n"

    return gen()


def bare(experiment_name: str, experiment_id: str, tracking_uri: str) -> FastAPI:
    app = FastAPI()

    @app.post("/chat")
    async def chat(body: ChatRequest) -> dict[str, Any]:
        return {"response": answer(body.message)}

    @app.post("/chat/stream")
    async def chat_stream(body: ChatRequest) -> StreamingResponse:
        return StreamingResponse(_tokens(answer(body.message)), media_type="text/event-stream")

    return app


def seed(experiment_name: str, experiment_id: str, tracking_uri: str) -> FastAPI:
    """MLflow's guide, by hand: a span per handler, the trace ID in the body or a final event."""
    mlflow.set_tracking_uri(tracking_uri)
    location = MlflowExperimentLocation(experiment_id=experiment_id)
    app = FastAPI()

    @app.post("/chat")
    async def chat(body: ChatRequest) -> dict[str, Any]:
        with mlflow.start_span("chat", trace_destination=location) as span:
            span.set_inputs(body.model_dump())
            mlflow.update_current_trace(client_request_id=f"req-{uuid.uuid4().hex[:8]}")
            response = answer(body.message)
            span.set_outputs({"response": response})
            return {"response": response, "trace_id": span.trace_id}

    @app.post("/chat/stream")
    async def chat_stream(body: ChatRequest) -> StreamingResponse:
        async def gen() -> AsyncIterator[str]:
            with mlflow.start_span("streaming_chat", trace_destination=location) as span:
                span.set_inputs(body.model_dump())
                async for event in _tokens(answer(body.message)):
                    yield event
                yield f"data: {json.dumps({'type': 'done', 'trace_id': span.trace_id})}\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")

    return app


OTEL_PROVIDERS: list[Any] = []


def otel(experiment_name: str, experiment_id: str, tracking_uri: str) -> Any:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider()
    exporter = OTLPSpanExporter(endpoint=f"{tracking_uri}/v1/traces", headers={"x-mlflow-experiment-id": experiment_id})
    provider.add_span_processor(BatchSpanProcessor(exporter))
    # Not the global provider: FastAPI emits spans of its own to that one, which would skew the count.
    OTEL_PROVIDERS.append(provider)
    app = bare(experiment_name, experiment_id, tracking_uri)
    # The default per-message send/receive spans are what OTel users switch off first (OTel #2343).
    return OpenTelemetryMiddleware(app, exclude_spans=["send", "receive"], tracer_provider=provider)


def ours(experiment_name: str, experiment_id: str, tracking_uri: str) -> FastAPI:
    from mlflow_feedback_middleware import MlflowFeedbackMiddleware

    app = bare(experiment_name, experiment_id, tracking_uri)
    # One load generator is one client: the per-client rate limit would turn the feedback burst into 429s.
    app.add_middleware(
        MlflowFeedbackMiddleware, tracking_uri=tracking_uri, experiment_name=experiment_name, rate_limit=None
    )
    return app


def ours_otlp(experiment_name: str, experiment_id: str, tracking_uri: str) -> FastAPI:
    """The fastest documented settings: MLflow's batched OTLP exporter."""
    from mlflow_feedback_middleware import MlflowFeedbackMiddleware

    app = bare(experiment_name, experiment_id, tracking_uri)
    app.add_middleware(
        MlflowFeedbackMiddleware,
        tracking_uri=tracking_uri,
        experiment_name=experiment_name,
        export="otlp",
        rate_limit=None,
    )
    return app


VARIANTS: dict[str, Callable[[str, str, str], Any]] = {
    "bare": bare,
    "seed": seed,
    "otel": otel,
    "ours": ours,
    "ours-otlp": ours_otlp,
}
