"""A chat service with end-user feedback on MLflow traces: `make demo`, then open http://127.0.0.1:8000.

- ``POST /chat``         JSON in, JSON out (the trace ID is also in the ``X-MLflow-Trace-Id`` header);
- ``POST /chat/stream``  Server-Sent Events, token by token, ending with the ``mlflow_trace`` event;
- ``POST /feedback``     mounted by the middleware; the page's Helpful / Not helpful buttons post to it.

The model is a deterministic fake that needs no network. Traces and feedback go to a local sqlite store
(``examples/mlflow.db``) unless ``MLFLOW_TRACKING_URI`` says otherwise; see them with ``make ui``.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

# MLflow batches trace exports for up to 5 s; a shorter interval makes a 👍 right after an answer land
# sooner in this demo. The middleware waits for the trace either way.
os.environ.setdefault("MLFLOW_ASYNC_TRACE_LOGGING_MAX_INTERVAL_MILLIS", "500")

import mlflow
from fastapi import FastAPI
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from pydantic import BaseModel

from mlflow_feedback_middleware import IMPLICIT_SIGNALS, Binary, FeedbackSchema, MlflowFeedbackMiddleware, get_trace_id

HERE = Path(__file__).resolve().parent
TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{HERE / 'mlflow.db'}")


EXPERIMENT = os.environ.get("MLFLOW_EXPERIMENT_NAME", "feedback-demo")
UI_URL = os.environ.get("MLFLOW_UI_URL", f"http://127.0.0.1:{os.environ.get('UI_PORT', '5000')}")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    print(f"\n  Chat page:    http://127.0.0.1:{os.environ.get('PORT', '8000')}/")
    print(f"  MLflow store: {TRACKING_URI}")
    print(f"  MLflow UI:    make ui  (then {UI_URL}, experiment {EXPERIMENT!r}, Traces)\n", flush=True)
    yield


app = FastAPI(title="Feedback demo", lifespan=lifespan)
app.add_middleware(
    MlflowFeedbackMiddleware,
    tracking_uri=TRACKING_URI,
    experiment_name=EXPERIMENT,
    # The page itself is not an answer anyone rates; keep the defaults (docs, health) too.
    exclude_paths=[r"^/$", r"^/demo/", r"^/(docs|redoc)(/|$)", r"^/openapi\.json$", r"^/favicon\.ico$"],
    # Signed feedback tokens, so only the browser that got an answer can rate it. A real service sets
    # MLFLOW_FEEDBACK_SECRET (shared by its replicas); a fresh one per start is enough for the demo.
    feedback_secret=os.environ.get("MLFLOW_FEEDBACK_SECRET") or secrets.token_hex(32),
    # The thumbs, and the implicit signals the page reports: copied, regenerated, edited, stopped, left.
    feedback_schema=FeedbackSchema(Binary(), *IMPLICIT_SIGNALS),
)


FAVICON = (
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32"><rect width="32" height="32" rx="7" fill="#0b5cad"/>'
    '<path d="M9 11h14M9 16h10M9 21h7" stroke="#fff" stroke-width="2.5" stroke-linecap="round"/></svg>'
)


class ChatRequest(BaseModel):
    message: str


class ChatResponse(BaseModel):
    response: str
    trace_id: str | None


ANSWERS = {
    "mlflow": "MLflow records each request as a trace; your rating becomes an assessment on it.",
    "feedback": "Rate an answer with Helpful or Not helpful: the middleware stores it on that answer's trace.",
}


@mlflow.trace(span_type="LLM")
def fake_model(message: str) -> str:
    """A deterministic stand-in for an LLM call."""
    for keyword, answer in ANSWERS.items():
        if keyword in message.lower():
            return answer
    return f"You said {message!r}. Ask me about MLflow or feedback."


@app.get("/", response_class=HTMLResponse)
async def page() -> str:
    return (HERE / "static" / "index.html").read_text(encoding="utf-8")


@app.get("/favicon.ico", include_in_schema=False)
async def favicon() -> Response:
    return Response(FAVICON, media_type="image/svg+xml")


@app.get("/demo/config")
async def config() -> dict[str, str | None]:
    """Where the page links each answer's trace: the MLflow UI and the demo's experiment."""
    return {"mlflow_ui": UI_URL, "experiment_id": await asyncio.to_thread(experiment_id)}


def experiment_id() -> str | None:
    """The demo experiment's ID: through the full mlflow package, or (mlflow-tracing only) the server's REST API."""
    try:
        if hasattr(mlflow, "get_experiment_by_name"):
            experiment = mlflow.get_experiment_by_name(EXPERIMENT)
            return experiment.experiment_id if experiment else None
        query = urllib.parse.urlencode({"experiment_name": EXPERIMENT})
        url = f"{TRACKING_URI.rstrip('/')}/api/2.0/mlflow/experiments/get-by-name?{query}"
        with urllib.request.urlopen(url, timeout=5) as answer:
            return str(json.load(answer)["experiment"]["experiment_id"])
    except Exception:  # no link is better than a broken page
        return None


@app.post("/chat")
async def chat(request: ChatRequest) -> ChatResponse:
    # The seed guide returns the trace ID in the body; the middleware's header carries it as well.
    return ChatResponse(response=fake_model(request.message), trace_id=get_trace_id())


@app.post("/chat/stream")
async def chat_stream(request: ChatRequest) -> StreamingResponse:
    async def tokens() -> AsyncIterator[str]:
        with mlflow.start_span("stream_tokens", span_type="LLM") as span:
            answer = fake_model(request.message)
            span.set_inputs({"message": request.message})
            for word in answer.split(" "):
                yield f"data: {json.dumps({'type': 'token', 'content': word + ' '})}\n\n"
                await asyncio.sleep(0.05)
            span.set_outputs(answer)

    return StreamingResponse(
        tokens(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
