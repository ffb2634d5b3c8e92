"""A chat service with end-user feedback on MLflow traces: `make demo`, then open http://127.0.0.1:8000.

- ``POST /chat``         JSON in, JSON out (the trace ID is also in the ``X-MLflow-Trace-Id`` header);
- ``POST /chat/stream``  Server-Sent Events, token by token, ending with the ``mlflow_trace`` event;
- ``POST /feedback``     mounted by the middleware; the page's 👍/👎 buttons post to it.

The model is a deterministic fake that needs no network. Traces and feedback go to a local sqlite store
(``examples/mlflow.db``) unless ``MLFLOW_TRACKING_URI`` says otherwise; see them with ``make ui``.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

# MLflow batches trace exports for up to 5 s; a shorter interval makes a 👍 right after an answer land
# sooner in this demo. The middleware waits for the trace either way.
os.environ.setdefault("MLFLOW_ASYNC_TRACE_LOGGING_MAX_INTERVAL_MILLIS", "500")

import mlflow
from fastapi import FastAPI
from fastapi.responses import HTMLResponse, StreamingResponse
from pydantic import BaseModel

from mlflow_feedback_middleware import MlflowFeedbackMiddleware, get_trace_id

HERE = Path(__file__).resolve().parent
TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{HERE / 'mlflow.db'}")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    print(f"\n  Chat page:    http://127.0.0.1:{os.environ.get('PORT', '8000')}/")
    print(f"  MLflow store: {TRACKING_URI}")
    print("  MLflow UI:    make ui  (then http://127.0.0.1:5000, experiment 'feedback-demo')\n", flush=True)
    yield


app = FastAPI(title="Feedback demo", lifespan=lifespan)
app.add_middleware(
    MlflowFeedbackMiddleware,
    tracking_uri=TRACKING_URI,
    experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME", "feedback-demo"),
    # The page itself is not an answer anyone rates; keep the defaults (docs, health) too.
    exclude_paths=[r"^/$", r"^/(docs|redoc)(/|$)", r"^/openapi\.json$", r"^/favicon\.ico$"],
    # Signed feedback tokens, so only the browser that got an answer can rate it. A real service sets
    # MLFLOW_FEEDBACK_SECRET (shared by its replicas); a fresh one per start is enough for the demo.
    feedback_secret=os.environ.get("MLFLOW_FEEDBACK_SECRET") or secrets.token_hex(32),
)


class ChatRequest(BaseModel):
    message: str


class ChatResponse(BaseModel):
    response: str
    trace_id: str | None


ANSWERS = {
    "mlflow": "MLflow records each request as a trace; your 👍 or 👎 becomes an assessment on it.",
    "feedback": "Click a thumb under an answer: the middleware stores it on that answer's trace.",
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
