"""A fake LLM provider that speaks the real wire formats (OpenAI Chat Completions and Responses, Anthropic
Messages), event for event as the providers document them, with the middleware at its defaults in front.

The real client SDKs are pointed at it: whatever they fail to parse, the middleware added.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from mlflow_feedback_middleware import MlflowFeedbackMiddleware

WORDS = ["Hello", " from", " the", " fake", " provider"]
ANSWER = "".join(WORDS)
USAGE = {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}


def _sse(data: Any, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def _stream(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers={"x-request-id": "req_provider"})


def _chat_chunk(model: str, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


async def _chat_events(model: str, usage: bool) -> AsyncIterator[str]:
    yield _sse(_chat_chunk(model, {"role": "assistant", "content": ""}))
    for word in WORDS:
        yield _sse(_chat_chunk(model, {"content": word}))
    yield _sse(_chat_chunk(model, {}, "stop"))
    if usage:
        yield _sse({**_chat_chunk(model, {}), "choices": [], "usage": USAGE})
    yield _sse("[DONE]")


def _response(model: str, status: str, text: str | None) -> dict[str, Any]:
    output = []
    if text is not None:
        content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
        output = [{"id": "msg_fake", "type": "message", "role": "assistant", "status": "completed", "content": content}]
    return {
        "id": "resp_fake",
        "object": "response",
        "created_at": int(time.time()),
        "model": model,
        "status": status,
        "output": output,
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": None
        if text is None
        else {
            "input_tokens": 9,
            "output_tokens": 5,
            "total_tokens": 14,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        },
    }


async def _responses_events(model: str) -> AsyncIterator[str]:
    seq = iter(range(1000))
    item = {"id": "msg_fake", "type": "message", "role": "assistant", "status": "in_progress", "content": []}
    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    where = {"item_id": "msg_fake", "output_index": 0, "content_index": 0}

    def event(kind: str, **fields: Any) -> str:
        return _sse({"type": kind, "sequence_number": next(seq), **fields}, kind)

    yield event("response.created", response=_response(model, "in_progress", None))
    yield event("response.in_progress", response=_response(model, "in_progress", None))
    yield event("response.output_item.added", output_index=0, item=item)
    yield event("response.content_part.added", part=part, **where)
    for word in WORDS:
        yield event("response.output_text.delta", delta=word, logprobs=[], **where)
    yield event("response.output_text.done", text=ANSWER, logprobs=[], **where)
    yield event("response.content_part.done", part={**part, "text": ANSWER}, **where)
    done_item = _response(model, "completed", ANSWER)["output"][0]
    yield event("response.output_item.done", output_index=0, item=done_item)
    yield event("response.completed", response=_response(model, "completed", ANSWER))


def _message(model: str, text: str | None, stop: str | None) -> dict[str, Any]:
    return {
        "id": "msg_fake",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [] if text is None else [{"type": "text", "text": text}],
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": {"input_tokens": 9, "output_tokens": 1 if text is None else 5},
    }


async def _anthropic_events(model: str) -> AsyncIterator[str]:
    yield _sse({"type": "message_start", "message": _message(model, None, None)}, "message_start")
    block = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    yield _sse(block, "content_block_start")
    yield _sse({"type": "ping"}, "ping")
    for word in WORDS:
        delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": word}}
        yield _sse(delta, "content_block_delta")
    yield _sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
    stop = {"stop_reason": "end_turn", "stop_sequence": None}
    end = {"type": "message_delta", "delta": stop, "usage": {"output_tokens": 5}}
    yield _sse(end, "message_delta")
    yield _sse({"type": "message_stop"}, "message_stop")


def build_provider(**middleware_kwargs: Any) -> FastAPI:
    """The provider app with the middleware in front (its defaults unless `middleware_kwargs` say otherwise)."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = await request.json()
        model = body.get("model", "fake-model")
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return _stream(_chat_events(model, usage))
        message = {"role": "assistant", "content": ANSWER, "refusal": None}
        return JSONResponse(
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}],
                "usage": USAGE,
            }
        )

    @app.post("/v1/responses")
    async def responses(request: Request) -> Any:
        body = await request.json()
        model = body.get("model", "fake-model")
        if body.get("stream"):
            return _stream(_responses_events(model))
        return JSONResponse(_response(model, "completed", ANSWER))

    @app.post("/v1/messages")
    async def messages(request: Request) -> Any:
        body = await request.json()
        model = body.get("model", "fake-model")
        if body.get("stream"):
            return _stream(_anthropic_events(model))
        return JSONResponse(_message(model, ANSWER, "end_turn"))

    @app.post("/seed/stream")
    async def seed_stream() -> StreamingResponse:
        """The guide's own stream format: tokens, then the app's own "done" (the middleware adds its event)."""

        async def events() -> AsyncIterator[str]:
            for word in WORDS:
                yield _sse({"type": "token", "content": word})

        return _stream(events())

    app.add_middleware(MlflowFeedbackMiddleware, **middleware_kwargs)
    return app
