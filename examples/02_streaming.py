"""02 · A streamed answer (Server-Sent Events, with sse-starlette): the trace covers the whole stream, the trace ID
is in the response headers, and the stream ends with an ``mlflow_trace`` event carrying it (this stream is in no
LLM wire format, so the event is safe for its clients).

    MLFLOW_TRACKING_URI=http://127.0.0.1:5000 uvicorn 02_streaming:app --port 8000
    curl -N -X POST localhost:8000/chat/stream -H 'Content-Type: application/json' -d '{"message": "hello there"}'
"""

import asyncio
import json
from collections.abc import AsyncIterator

import mlflow
from fastapi import FastAPI
from sse_starlette import EventSourceResponse

from mlflow_feedback_middleware import MlflowFeedbackMiddleware

app = FastAPI()
app.add_middleware(MlflowFeedbackMiddleware, experiment_name="streaming")


@app.post("/chat/stream")
async def chat_stream(body: dict) -> EventSourceResponse:
    async def tokens() -> AsyncIterator[dict[str, str]]:
        # A span of the handler's own: it nests under the request's trace, and lasts as long as the stream.
        with mlflow.start_span("generate", span_type="LLM") as span:
            words = f"You said: {body.get('message', '')}".split()
            span.set_inputs({"message": body.get("message")})
            for word in words:
                yield {"data": json.dumps({"type": "token", "content": word + " "})}
                await asyncio.sleep(0.05)
            span.set_outputs(" ".join(words))

    return EventSourceResponse(tokens())
