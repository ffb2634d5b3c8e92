"""The LLM wire formats an answer may be in: recognised from the response, and assembled into a chat answer.

Clients of these formats (the openai and anthropic SDKs, the Vercel AI SDK, LangServe's RemoteRunnable and
every tutorial loop over ``data:`` lines) parse each event of the stream as one of their own, so an event
the app did not send breaks them. Recognising the format tells the middleware to add nothing in-band by
default; assembling it gives the trace a chat-shaped output (text, finish reason, usage) instead of raw
frames, which the MLflow UI shows as a conversation.

Recognition reads the stream's events as they pass (never holding any back), from the response headers and
the first few events; a ``data: [DONE]`` sentinel, at any point, marks an OpenAI-compatible stream.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Mapping
from typing import Any

OPENAI_CHAT = "openai-chat-completions"
OPENAI_RESPONSES = "openai-responses"
ANTHROPIC = "anthropic-messages"
VERCEL_UI = "vercel-ai-ui-message-stream"
LANGCHAIN = "langserve"

# The Vercel AI SDK asks custom backends to mark their UI message streams with this header.
_VERCEL_HEADERS = (b"x-vercel-ai-ui-message-stream", b"x-vercel-ai-data-stream")
_ANTHROPIC_TYPES = frozenset(
    {
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    }
)
_VERCEL_TYPES = frozenset(
    {
        "start-step",
        "finish-step",
        "text-start",
        "text-delta",
        "text-end",
        "reasoning-start",
        "reasoning-delta",
        "reasoning-end",
        "tool-input-start",
        "tool-input-delta",
        "tool-input-available",
        "tool-output-available",
        "message-metadata",
    }
)
_LANGCHAIN_EVENTS = frozenset({"metadata", "data", "end", "values", "updates", "messages", "messages/partial"})
# Events looked at before a stream counts as the app's own format (the [DONE] sentinel is always seen).
_EVENTS_TO_RECOGNISE = 8
_LINE_END = re.compile(rb"\r\n|\r|\n")
_MAX_LINE = 1 << 20  # a data line longer than this is not parsed (its bytes still pass through)


def format_from_headers(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The wire format the response headers declare, if any."""
    for name, _ in headers:
        if name.lower() in _VERCEL_HEADERS:
            return VERCEL_UI
    return None


def format_of_event(name: str | None, data: str) -> str | None:
    """The wire format one SSE event (its ``event:`` name and ``data:``) belongs to, if a known one."""
    if data.strip() == "[DONE]":
        return OPENAI_CHAT
    if name is not None:
        if name in _ANTHROPIC_TYPES or name == "ping":
            return ANTHROPIC
        if name.startswith("response."):
            return OPENAI_RESPONSES
        if name in _LANGCHAIN_EVENTS and "run_id" in data:
            return LANGCHAIN
    obj = _json_object(data)
    if obj is None:
        return None
    kind = obj.get("type")
    if obj.get("object") == "chat.completion.chunk" or isinstance(obj.get("choices"), list):
        return OPENAI_CHAT
    if not isinstance(kind, str):
        return None
    if kind.startswith("response."):
        return OPENAI_RESPONSES
    if kind in _ANTHROPIC_TYPES:
        return ANTHROPIC
    if kind in _VERCEL_TYPES or (kind == "start" and set(obj) <= {"type", "messageId", "messageMetadata"}):
        return VERCEL_UI
    return None


def _json_object(data: str) -> dict[str, Any] | None:
    text = data.strip()
    if not text.startswith("{"):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class SseEventReader:
    """Splits a stream's chunks into events, recognises the wire format and assembles the answer.

    Fed the same chunks the client gets; it copies nothing but the current line and the answer's text.
    """

    __slots__ = (
        "_assemble",
        "_assembler",
        "_data",
        "_events",
        "_last_cr",
        "_line",
        "_name",
        "_plain",
        "_skip_line",
        "format",
    )

    def __init__(self, declared: str | None, assemble: bool) -> None:
        self.format = declared
        self._assemble = assemble
        self._assembler: Assembler | None = None
        self._events = 0
        self._line = bytearray()
        self._skip_line = False
        self._last_cr = False
        self._name: str | None = None
        self._data: list[str] = []
        # Events of a stream in no known format, kept readable for the trace (instead of raw frames).
        self._plain: _PlainEvents | None = _PlainEvents() if assemble and declared is None else None
        if declared is not None and assemble:
            self._assembler = assembler_for(declared)

    def feed(self, chunk: bytes) -> None:
        """Take the next chunk of the stream."""
        pos = 0
        if self._last_cr and chunk[:1] == b"\n":
            pos = 1  # the second half of a "\r\n" split across chunks
        for match in _LINE_END.finditer(chunk, pos):
            self._take(chunk[pos : match.start()])
            self._end_line()
            pos = match.end()
        if pos < len(chunk):
            self._take(chunk[pos:])
        self._last_cr = chunk.endswith(b"\r")

    def _take(self, part: bytes) -> None:
        if self._skip_line or len(self._line) + len(part) > _MAX_LINE:
            self._skip_line = True
            self._line.clear()
            return
        self._line += part

    def _end_line(self) -> None:
        line = bytes(self._line)
        skipped = self._skip_line
        self._line.clear()
        self._skip_line = False
        if skipped:
            return
        if not line:
            self._dispatch()
            return
        text = line.decode("utf-8", errors="replace")
        field, colon, value = text.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._name = value

    def _dispatch(self) -> None:
        if not self._data:
            self._name = None
            return
        name, data = self._name, "\n".join(self._data)
        self._name, self._data = None, []
        if self.format is None and (self._events < _EVENTS_TO_RECOGNISE or data.strip() == "[DONE]"):
            self._events += 1
            self.format = format_of_event(name, data)
            if self.format is not None and self._assemble:
                self._assembler = assembler_for(self.format)
                self._plain = None
        if self._plain is not None:
            self._plain.add(name, data)
        if self._assembler is not None:
            try:
                self._assembler.add(name, data)
            except Exception:  # an odd event never breaks the stream; the answer is best effort
                self._assembler = None

    def finish(self) -> None:
        """The stream has ended: an event without its closing blank line still counts."""
        if self._line:
            self._end_line()
        self._dispatch()

    def answer(self) -> Any:
        """The assembled answer in the format's own response shape, or None."""
        return self._assembler.result() if self._assembler is not None else None

    def plain_events(self) -> dict[str, Any] | None:
        """A stream in no known format, decoded for the trace: its text where its events carry one, else its
        events' payloads (bounded); None for a recognised format or an empty stream."""
        return self._plain.result() if self._plain is not None and self.format is None else None


class _PlainEvents:
    """The events of an unrecognised stream: their text (``content``, ``text``, ``delta`` or ``token`` fields of
    JSON objects) joined, else their decoded payloads, up to `_PLAIN_MAX_EVENTS` and `_PLAIN_MAX_CHARS`."""

    __slots__ = ("chars", "count", "payloads", "text", "texts_only")

    def __init__(self) -> None:
        self.count = 0
        self.chars = 0
        self.text: list[str] = []
        self.payloads: list[Any] = []
        self.texts_only = True

    def add(self, name: str | None, data: str) -> None:
        self.count += 1
        payload: Any = _json_object(data)
        piece = None
        if payload is not None:
            piece = next((payload[k] for k in _TEXT_FIELDS if isinstance(payload.get(k), str)), None)
        else:
            payload = data
        if piece is None:
            self.texts_only = False
        elif self.chars < _PLAIN_MAX_CHARS:
            self.text.append(piece)
            self.chars += len(piece)
        if len(self.payloads) < _PLAIN_MAX_EVENTS:
            self.payloads.append(payload if name is None else {"event": name, "data": payload})

    def result(self) -> dict[str, Any] | None:
        if not self.count:
            return None
        if self.texts_only:
            return {"text": "".join(self.text)[:_PLAIN_MAX_CHARS], "events": self.count}
        return {"events": self.payloads, "event_count": self.count}


_TEXT_FIELDS = ("content", "text", "delta", "token")
_PLAIN_MAX_EVENTS = 200
_PLAIN_MAX_CHARS = 64 * 1024


class Assembler:
    """Builds one wire format's complete answer from its stream events."""

    def add(self, name: str | None, data: str) -> None:
        raise NotImplementedError

    def result(self) -> Any:
        raise NotImplementedError


class _OpenAIChat(Assembler):
    """Chat Completions chunks into a ``chat.completion`` (what a non-streamed call returns)."""

    def __init__(self) -> None:
        self.head: dict[str, Any] = {}
        self.choices: dict[int, dict[str, Any]] = {}
        self.usage: Any = None

    def add(self, name: str | None, data: str) -> None:
        chunk = _json_object(data)
        if chunk is None:
            return
        for key in ("id", "model", "created", "system_fingerprint"):
            if key in chunk and key not in self.head:
                self.head[key] = chunk[key]
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            index = choice.get("index", 0)
            state = self.choices.setdefault(index, {"text": [], "role": "assistant", "tools": {}, "finish": None})
            delta = choice.get("delta") or {}
            if delta.get("role"):
                state["role"] = delta["role"]
            if isinstance(delta.get("content"), str):
                state["text"].append(delta["content"])
            for call in delta.get("tool_calls") or ():
                tool = state["tools"].setdefault(call.get("index", 0), {"function": {"name": "", "arguments": ""}})
                if call.get("id"):
                    tool["id"] = call["id"]
                    tool["type"] = call.get("type", "function")
                function = call.get("function") or {}
                tool["function"]["name"] += function.get("name") or ""
                tool["function"]["arguments"] += function.get("arguments") or ""
            if choice.get("finish_reason"):
                state["finish"] = choice["finish_reason"]

    def result(self) -> Any:
        choices = []
        for index, state in sorted(self.choices.items()):
            message: dict[str, Any] = {"role": state["role"], "content": "".join(state["text"]) or None}
            if state["tools"]:
                message["tool_calls"] = [tool for _, tool in sorted(state["tools"].items())]
            choices.append({"index": index, "message": message, "finish_reason": state["finish"]})
        answer: dict[str, Any] = {"object": "chat.completion", **self.head, "choices": choices}
        if self.usage is not None:
            answer["usage"] = self.usage
        return answer


class _OpenAIResponses(Assembler):
    """Responses API events into the final ``response`` object."""

    def __init__(self) -> None:
        self.final: Any = None
        self.text: list[str] = []

    def add(self, name: str | None, data: str) -> None:
        event = _json_object(data)
        if event is None:
            return
        kind = event.get("type") or name
        if kind in ("response.completed", "response.incomplete", "response.failed"):
            self.final = event.get("response")
        elif kind == "response.output_text.delta" and isinstance(event.get("delta"), str):
            self.text.append(event["delta"])

    def result(self) -> Any:
        if self.final is not None:
            return self.final
        text = "".join(self.text)
        return {
            "object": "response",
            "status": "incomplete",
            "output": [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": text}]}],
        }


class _Anthropic(Assembler):
    """Messages API events into the final ``message``."""

    def __init__(self) -> None:
        self.message: dict[str, Any] = {"type": "message", "role": "assistant"}
        self.blocks: dict[int, dict[str, Any]] = {}
        self.json_parts: dict[int, list[str]] = {}

    def add(self, name: str | None, data: str) -> None:
        event = _json_object(data)
        if event is None:
            return
        kind = event.get("type") or name
        if kind == "message_start":
            self.message.update({k: v for k, v in (event.get("message") or {}).items() if k != "content"})
        elif kind == "content_block_start":
            self.blocks[event.get("index", 0)] = dict(event.get("content_block") or {})
        elif kind == "content_block_delta":
            index = event.get("index", 0)
            block = self.blocks.setdefault(index, {"type": "text", "text": ""})
            delta = event.get("delta") or {}
            for key, field in (("text_delta", "text"), ("thinking_delta", "thinking")):
                if delta.get("type") == key:
                    block[field] = block.get(field, "") + delta.get(field, "")
            if delta.get("type") == "input_json_delta":
                self.json_parts.setdefault(index, []).append(delta.get("partial_json", ""))
        elif kind == "message_delta":
            self.message.update(event.get("delta") or {})
            if isinstance(event.get("usage"), Mapping):
                usage = dict(self.message.get("usage") or {})
                usage.update(event["usage"])
                self.message["usage"] = usage

    def result(self) -> Any:
        for index, parts in self.json_parts.items():
            with contextlib.suppress(ValueError, KeyError):
                self.blocks[index]["input"] = json.loads("".join(parts) or "{}")
        return {**self.message, "content": [block for _, block in sorted(self.blocks.items())]}


class _VercelUI(Assembler):
    """A Vercel AI SDK UI message stream into the assistant's message (text and finish)."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.finish: Any = None
        self.message_id: Any = None

    def add(self, name: str | None, data: str) -> None:
        part = _json_object(data)
        if part is None:
            return
        kind = part.get("type")
        if kind == "start":
            self.message_id = part.get("messageId")
        elif kind == "text-delta" and isinstance(part.get("delta"), str):
            self.text.append(part["delta"])
        elif kind == "finish":
            self.finish = part.get("finishReason", "stop")

    def result(self) -> Any:
        answer: dict[str, Any] = {"role": "assistant", "content": "".join(self.text)}
        if self.message_id is not None:
            answer["id"] = self.message_id
        if self.finish is not None:
            answer["finish_reason"] = self.finish
        return answer


_ASSEMBLERS: dict[str, type[Assembler]] = {
    OPENAI_CHAT: _OpenAIChat,
    OPENAI_RESPONSES: _OpenAIResponses,
    ANTHROPIC: _Anthropic,
    VERCEL_UI: _VercelUI,
}


def assembler_for(wire_format: str) -> Assembler | None:
    """A fresh assembler for `wire_format`, or None where answers are not assembled (LangServe)."""
    cls = _ASSEMBLERS.get(wire_format)
    return cls() if cls is not None else None


def is_chat_request(body: Any) -> bool:
    """Whether a request body is an LLM call's input (chat messages, or a Responses API input)."""
    if not isinstance(body, dict):
        return False
    return isinstance(body.get("messages"), list) or ("input" in body and "model" in body)


def is_chat_answer(body: Any) -> bool:
    """Whether a JSON response body is a non-streamed LLM answer the MLflow UI shows as chat."""
    if not isinstance(body, dict):
        return False
    if body.get("object") in ("chat.completion", "response"):
        return True
    return body.get("type") == "message" and body.get("role") == "assistant"
