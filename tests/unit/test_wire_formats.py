"""Wire-format recognition and answer assembly, on streams as the providers send them (no server needed)."""

from __future__ import annotations

import json

import pytest

from mlflow_feedback_middleware.asgi.wire_formats import (
    ANTHROPIC,
    LANGCHAIN,
    OPENAI_CHAT,
    OPENAI_RESPONSES,
    VERCEL_UI,
    SseEventReader,
    format_from_headers,
    is_chat_answer,
    is_chat_request,
)


def sse(*events: tuple[str | None, object], sep: str = "\n") -> bytes:
    out = []
    for name, data in events:
        head = f"event: {name}{sep}" if name else ""
        body = data if isinstance(data, str) else json.dumps(data)
        out.append(f"{head}data: {body}{sep}{sep}")
    return "".join(out).encode()


def chat_chunk(delta: dict[str, object], finish: str | None = None, **extra: object) -> dict[str, object]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }


OPENAI_STREAM = sse(
    (None, chat_chunk({"role": "assistant", "content": ""})),
    (None, chat_chunk({"content": "Hello"})),
    (None, chat_chunk({"content": " world"})),
    (None, chat_chunk({}, "stop")),
    (None, {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [], "usage": {"total_tokens": 7}}),
    (None, "[DONE]"),
)
RESPONSES_STREAM = sse(
    ("response.created", {"type": "response.created", "response": {"id": "resp_1", "status": "in_progress"}}),
    ("response.output_text.delta", {"type": "response.output_text.delta", "delta": "Hi"}),
    (
        "response.completed",
        {"type": "response.completed", "response": {"id": "resp_1", "object": "response", "status": "completed"}},
    ),
)
START = {"id": "msg_1", "model": "c", "content": [], "usage": {"input_tokens": 3}}


def text_delta(text: str) -> dict[str, object]:
    return {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}


ANTHROPIC_STREAM = sse(
    ("message_start", {"type": "message_start", "message": START}),
    ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    ("ping", {"type": "ping"}),
    ("content_block_delta", text_delta("Bon")),
    ("content_block_delta", text_delta("jour")),
    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 2}}),
    ("message_stop", {"type": "message_stop"}),
)
VERCEL_STREAM = sse(
    (None, {"type": "start", "messageId": "m1"}),
    (None, {"type": "text-start", "id": "t"}),
    (None, {"type": "text-delta", "id": "t", "delta": "Yo"}),
    (None, {"type": "text-end", "id": "t"}),
    (None, {"type": "finish"}),
    (None, "[DONE]"),
)
LANGSERVE_STREAM = sse(("metadata", {"run_id": "r-1"}), ("data", '"chunk"'), ("end", ""))
SEED_STREAM = sse((None, {"type": "token", "content": "Hi "}), (None, {"type": "token", "content": "there"}))


def read(stream: bytes, chunk_size: int, declared: str | None = None) -> SseEventReader:
    reader = SseEventReader(declared, assemble=True)
    for i in range(0, len(stream), chunk_size):
        reader.feed(stream[i : i + chunk_size])
    reader.finish()
    return reader


@pytest.mark.parametrize("chunk_size", [1, 7, 10_000])
@pytest.mark.parametrize(
    ("stream", "expected"),
    [
        (OPENAI_STREAM, OPENAI_CHAT),
        (RESPONSES_STREAM, OPENAI_RESPONSES),
        (ANTHROPIC_STREAM, ANTHROPIC),
        (VERCEL_STREAM, VERCEL_UI),
        (LANGSERVE_STREAM, LANGCHAIN),
        (SEED_STREAM, None),  # the guide's own format is the app's: it keeps the named event
        (OPENAI_STREAM.replace(b"\n", b"\r\n"), OPENAI_CHAT),
    ],
)
def test_wire_format_is_recognised_whatever_the_chunking(stream: bytes, expected: str | None, chunk_size: int) -> None:
    assert read(stream, chunk_size).format == expected


def test_a_done_sentinel_late_in_an_unknown_stream_marks_it_openai_compatible() -> None:
    stream = sse(*[(None, f"plain {i}") for i in range(20)], (None, "[DONE]"))
    assert read(stream, 5).format == OPENAI_CHAT


def test_vercel_streams_are_recognised_from_their_header() -> None:
    assert format_from_headers([(b"X-Vercel-AI-UI-Message-Stream", b"v1")]) == VERCEL_UI
    assert format_from_headers([(b"content-type", b"text/event-stream")]) is None


def test_openai_chunks_assemble_into_a_chat_completion() -> None:
    answer = read(OPENAI_STREAM, 3).answer()
    assert answer == {
        "object": "chat.completion",
        "id": "chatcmpl-1",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello world"}, "finish_reason": "stop"}],
        "usage": {"total_tokens": 7},
    }
    assert is_chat_answer(answer)


def test_openai_tool_call_deltas_are_joined() -> None:
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_", "arguments": '{"ci'}}
    more = {"index": 0, "function": {"name": "weather", "arguments": 'ty":"Oslo"}'}}
    stream = sse((None, chat_chunk({"tool_calls": [call]})), (None, chat_chunk({"tool_calls": [more]}, "tool_calls")))
    message = read(stream, 4).answer()["choices"][0]["message"]
    assert message["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}
    ]
    assert message["content"] is None


def test_anthropic_events_assemble_into_a_message() -> None:
    assert read(ANTHROPIC_STREAM, 5).answer() == {
        "type": "message",
        "role": "assistant",
        "id": "msg_1",
        "model": "c",
        "usage": {"input_tokens": 3, "output_tokens": 2},
        "stop_reason": "end_turn",
        "content": [{"type": "text", "text": "Bonjour"}],
    }


def test_responses_events_give_the_completed_response() -> None:
    assert read(RESPONSES_STREAM, 9).answer() == {"id": "resp_1", "object": "response", "status": "completed"}


def test_vercel_parts_assemble_into_the_assistant_text() -> None:
    expected = {"role": "assistant", "content": "Yo", "id": "m1", "finish_reason": "stop"}
    assert read(VERCEL_STREAM, 2).answer() == expected


def test_unknown_streams_and_odd_events_assemble_nothing_and_never_raise() -> None:
    assert read(SEED_STREAM, 4).answer() is None
    broken = sse((None, chat_chunk({"content": "a"})), (None, {"choices": "not a list"}), (None, "[DONE]"))
    read(broken, 3)  # no exception: the answer is best effort


def test_chat_requests_and_answers_are_told_apart_from_other_json() -> None:
    assert is_chat_request({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert is_chat_request({"model": "m", "input": "hi"})
    assert not is_chat_request({"message": "hi"})
    assert is_chat_answer({"object": "chat.completion", "choices": []})
    assert is_chat_answer({"type": "message", "role": "assistant", "content": []})
    assert not is_chat_answer({"response": "hi"})


def test_a_stream_in_no_known_format_reads_as_its_text_or_its_events() -> None:
    tokens = SseEventReader(None, assemble=True)
    for word in ("Hel", "lo \ud83d\udc4d"):
        tokens.feed(f"data: {json.dumps({'type': 'token', 'content': word})}\n\n".encode())
    tokens.finish()
    assert tokens.format is None and tokens.plain_events() == {"text": "Hello \U0001f44d", "events": 2}

    mixed = SseEventReader(None, assemble=True)
    mixed.feed(b'event: progress\ndata: {"step": 1}\n\ndata: plain text\n\n')
    mixed.finish()
    assert mixed.plain_events() == {
        "events": [{"event": "progress", "data": {"step": 1}}, "plain text"],
        "event_count": 2,
    }

    openai = SseEventReader(None, assemble=True)
    openai.feed(b'data: {"choices": [{"delta": {"content": "Hi"}}]}\n\ndata: [DONE]\n\n')
    openai.finish()
    assert openai.plain_events() is None and openai.answer() is not None  # a known format: its own answer
