"""The FastAPI app the tests put the middleware on: JSON, sync, streamed, failing and websocket routes."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import mlflow
from fastapi import FastAPI, HTTPException, Request, WebSocket
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from sse_starlette import EventSourceResponse

from mlflow_feedback_middleware import MlflowFeedbackMiddleware, get_client_request_id, get_trace_id, traced_turn


class ChatRequest(BaseModel):
    message: str


@mlflow.trace(name="fake_llm")
def fake_llm(message: str) -> str:
    return f"echo: {message}"


@mlflow.trace(name="fake_llm_async")
async def fake_llm_async(message: str) -> str:
    await asyncio.sleep(0.001)
    return f"echo: {message}"


def seen_ids(request: Request) -> dict[str, Any]:
    """What handler code sees of the request's trace, through every public way in."""
    span = mlflow.get_current_active_span()
    return {
        "span_trace_id": span.trace_id if span else None,
        "helper_trace_id": get_trace_id(),
        "helper_request_id": get_client_request_id(),
        "state_trace_id": getattr(request.state, "mlflow_trace_id", None),
    }


def event_stream(*chunks: bytes) -> StreamingResponse:
    """A text/event-stream response that sends exactly these chunks, one body message each."""

    async def send_chunks() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    return StreamingResponse(send_chunks(), media_type="text/event-stream")


def build_app(**middleware_kwargs: Any) -> FastAPI:
    app = FastAPI()

    @app.post("/chat")
    async def chat(body: ChatRequest, request: Request) -> dict[str, Any]:
        answer = await fake_llm_async(body.message)
        return {"response": answer, **seen_ids(request)}

    @app.post("/rag")
    async def rag(body: ChatRequest) -> dict[str, Any]:
        """Retrieval, then the answer; the retrieval step's span ID is handed out for feedback on that step."""
        with mlflow.start_span("retrieve", span_type="RETRIEVER") as retrieval:
            retrieval.set_outputs([{"page_content": f"a page about {body.message}"}])
        return {"response": await fake_llm_async(body.message), "retrieval_span_id": retrieval.span_id}

    @app.post("/chat-tagged")
    async def chat_tagged(body: ChatRequest) -> dict[str, Any]:
        mlflow.update_current_trace(tags={"app.topic": "billing"})
        return {"response": await fake_llm_async(body.message)}

    @app.post("/chat-sync")
    def chat_sync(body: ChatRequest, request: Request) -> dict[str, Any]:
        return {"response": fake_llm(body.message), **seen_ids(request)}

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, Any]:
        return {"received": await request.json()}

    @app.post("/sink")
    async def sink(request: Request) -> dict[str, int]:
        """Takes any body, of any type, without parsing it."""
        return {"received_bytes": len(await request.body())}

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"item_id": item_id}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internal detail")

    @app.get("/unavailable")
    async def unavailable() -> None:
        raise HTTPException(503, "down for maintenance")

    @app.get("/missing")
    async def missing() -> None:
        raise HTTPException(404, "no such thing")

    @app.post("/chat/stream")
    async def chat_stream(body: ChatRequest, request: Request) -> StreamingResponse:
        # A test may act while the answer streams (root span still open), e.g. send feedback on it.
        on_stream_start = getattr(request.app.state, "on_stream_start", None)

        async def tokens() -> AsyncIterator[str]:
            if on_stream_start is not None:
                await on_stream_start(get_trace_id())
            with mlflow.start_span("generate") as span:
                span.set_inputs({"message": body.message})
                for word in fake_llm(body.message).split():
                    yield f"data: {json.dumps({'type': 'token', 'content': word + ' '})}\n\n"
                    await asyncio.sleep(0.005)

        return StreamingResponse(tokens(), media_type="text/event-stream", headers={"X-Accel-Buffering": "no"})

    @app.get("/chat/stream-sync")
    def chat_stream_sync() -> StreamingResponse:
        def tokens() -> Iterator[str]:
            span = mlflow.get_current_active_span()
            yield f"data: {json.dumps({'span_trace_id': span.trace_id if span else None})}\n\n"
            yield "data: second\n\n"

        return StreamingResponse(tokens(), media_type="text/event-stream")

    @app.get("/sse")
    async def sse(request: Request) -> EventSourceResponse:
        async def events() -> AsyncIterator[dict[str, str]]:
            for i in range(3):
                yield {"event": "token", "data": f"part {i}"}

        return EventSourceResponse(events())

    @app.get("/openai-stream")
    async def openai_stream() -> StreamingResponse:
        return event_stream(b'data: {"choices": [{"delta": {"content": "Hi"}}]}\n\n', b"data: [DONE]\n\n")

    @app.get("/unterminated-stream")
    async def unterminated_stream() -> StreamingResponse:
        return event_stream(b"data: first\n\n", b"data: last-without-blank-line")

    @app.get("/compressed-stream")
    async def compressed_stream() -> StreamingResponse:
        response = event_stream(gzip.compress(b"data: compressed\n\n"))
        response.headers["Content-Encoding"] = "gzip"
        return response

    app.state.closed_streams = 0

    @app.get("/slow-stream")
    async def slow_stream() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            try:
                for i in range(1000):
                    yield f"data: chunk {i}\n\n".encode()
                    await asyncio.sleep(0.02)
            finally:
                app.state.closed_streams += 1  # closed, also when the client went away

        return StreamingResponse(chunks(), media_type="text/event-stream")

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        text = await websocket.receive_text()
        await websocket.send_text(f"echo {text}")
        await websocket.close()

    @app.websocket("/ws/chat")
    async def ws_chat(websocket: WebSocket) -> None:
        await websocket.accept()
        async for message in websocket.iter_text():
            async with traced_turn(websocket, inputs={"message": message}) as turn:
                answer = await fake_llm_async(message)
                await websocket.send_json({"type": "answer", "text": answer, "trace_id": get_trace_id()})
                turn.set_outputs({"response": answer})

    app.add_middleware(MlflowFeedbackMiddleware, **middleware_kwargs)
    return app


def app_from_env() -> FastAPI:
    """`uvicorn --factory tests.apps:app_from_env`: the test app, middleware arguments from TEST_MIDDLEWARE_KWARGS."""
    return build_app(**json.loads(os.environ.get("TEST_MIDDLEWARE_KWARGS", "{}")))
