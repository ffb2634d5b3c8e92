"""The SSE trailer byte for byte: where the final event goes, for every framing a stream may use."""

from __future__ import annotations

import pytest

from mlflow_feedback_middleware.asgi.sse import SseTrailer, encode_event

DATA = {"type": "done", "trace_id": "tr-1"}


def named_event(sep: bytes) -> bytes:
    return encode_event("mlflow_trace", DATA, sep)


EVENT_LF = b'event: mlflow_trace\ndata: {"type":"done","trace_id":"tr-1"}\n\n'
EVENT_CRLF = EVENT_LF.replace(b"\n", b"\r\n")
EVENT_CR = EVENT_LF.replace(b"\n", b"\r")


def run(chunks: list[bytes]) -> tuple[list[bytes], bytes]:
    trailer = SseTrailer(named_event)
    sent = [trailer.feed(chunk) for chunk in chunks]
    return sent, trailer.finish()


@pytest.mark.parametrize(
    ("chunks", "sent", "finish"),
    [
        ([b"data: a\n\n", b"data: b\n\n"], [b"data: a\n\n", b"data: b\n\n"], EVENT_LF),
        ([b"data: a\r\n\r\n"], [b"data: a\r\n\r\n"], EVENT_CRLF),
        ([b"data: a\r\r"], [b"data: a\r\r"], EVENT_CR),
        # An unfinished line, then an unfinished event: each is closed before the trace event.
        ([b"data: a"], [b"data: a"], b"\n\n" + EVENT_LF),
        ([b"data: a\n\ndata: b\n"], [b"data: a\n\ndata: b\n"], b"\n" + EVENT_LF),
        # "\r\n" split across chunks is one line end, not an end of line plus a blank line.
        ([b"data: a\r", b"\ndata: b\r\n\r\n"], [b"data: a\r", b"\ndata: b\r\n\r\n"], EVENT_CR),
        # A stream with no bytes at all still gets the event.
        ([], [], EVENT_LF),
        # Comments (pings) are lines too.
        ([b": ping\n\n", b"data: x\n\n"], [b": ping\n\n", b"data: x\n\n"], EVENT_LF),
    ],
)
def test_trailer_appends_one_event_in_the_stream_framing(chunks: list[bytes], sent: list[bytes], finish: bytes) -> None:
    assert run(chunks) == (sent, finish)


@pytest.mark.parametrize(
    ("chunk", "expected"),
    [
        (b"data: [DONE]\n\n", EVENT_LF + b"data: [DONE]\n\n"),
        (b"data: x\n\ndata: [DONE]\n\n", b"data: x\n\n" + EVENT_LF + b"data: [DONE]\n\n"),
        (b"data:[DONE]\r\n\r\n", EVENT_LF.replace(b"\n", b"\r\n") + b"data:[DONE]\r\n\r\n"),
        # An event with an id before the sentinel: the trace event goes before the whole event.
        (b"id: 7\ndata: [DONE]\n\n", EVENT_LF + b"id: 7\ndata: [DONE]\n\n"),
    ],
)
def test_trailer_goes_before_the_done_sentinel(chunk: bytes, expected: bytes) -> None:
    trailer = SseTrailer(named_event)
    assert trailer.feed(chunk) == expected
    assert trailer.finish() == b""


def test_sentinel_split_across_chunks_falls_back_to_the_end() -> None:
    """Nothing is held back to find a split sentinel: the event then simply comes last."""
    sent, finish = run([b"data: [DO", b"NE]\n\n"])
    assert sent == [b"data: [DO", b"NE]\n\n"]
    assert finish == EVENT_LF


def test_data_that_only_mentions_done_is_not_a_sentinel() -> None:
    sent, finish = run([b"data: [DONE] and more\n\n"])
    assert sent == [b"data: [DONE] and more\n\n"]
    assert finish == EVENT_LF


@pytest.mark.parametrize("chunks", [[b"data: a\n\n"], [b"data: a"], [b"data: x\n\ndata: [DONE]\n\n"], []])
def test_a_trailer_with_nothing_to_add_leaves_the_stream_byte_for_byte(chunks: list[bytes]) -> None:
    trailer = SseTrailer(lambda sep: b"")
    assert [trailer.feed(chunk) for chunk in chunks] == chunks
    assert trailer.finish() == b""


def test_the_agent_server_event_is_unnamed_and_framed_like_the_stream() -> None:
    trailer = SseTrailer(lambda sep: encode_event(None, {"trace_id": "tr-1"}, sep))
    assert trailer.feed(b"data: x\r\n\r\ndata: [DONE]\r\n\r\n") == (
        b'data: x\r\n\r\ndata: {"trace_id":"tr-1"}\r\n\r\ndata: [DONE]\r\n\r\n'
    )
