"""Appends one final event to a Server-Sent-Events stream without holding back any of its bytes.

The stream passes through chunk by chunk. A small line-level state machine tracks where events begin
and end, so the trace event can be placed:

- just before an OpenAI-style ``data: [DONE]`` sentinel event, when that event starts within a chunk
  (clients stop reading at the sentinel);
- otherwise at the very end, after closing any unfinished line and event so it cannot merge with the
  app's last event.

What the event is (the named ``mlflow_trace`` event, MLflow AgentServer's ``data: {"trace_id": ...}``, or
nothing at all) is asked only when it is placed: by then the stream's wire format is known.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

_LINE_END = re.compile(rb"\r\n|\r|\n")
_DONE_LINES = (b"data: [DONE]", b"data:[DONE]")


def encode_event(name: str | None, data: dict[str, str], sep: bytes = b"\n") -> bytes:
    """One SSE event with a single-line JSON payload, framed with `sep`; unnamed when `name` is None."""
    payload = json.dumps(data, separators=(",", ":")).encode()
    head = b"" if name is None else b"event: " + name.encode() + sep
    return head + b"data: " + payload + sep + sep


class SseTrailer:
    """Feeds a stream's chunks through and says what to add, and where, for the final event.

    `make_event(sep)` gives the event's bytes framed with the stream's separator, or b"" to add nothing
    (then the stream passes byte for byte).
    """

    __slots__ = ("_in_event", "_last_cr", "_make_event", "_partial", "_sep", "sent")

    def __init__(self, make_event: Callable[[bytes], bytes]) -> None:
        self._make_event = make_event
        self._sep: bytes | None = None  # the stream's own line separator, once seen
        self._partial = False  # the last chunk ended inside a non-empty line
        self._in_event = False  # a non-blank line came since the last blank line
        self._last_cr = False  # the last chunk ended with "\r" (maybe half of "\r\n")
        self.sent = False

    def _event(self) -> bytes:
        return self._make_event(self._sep or b"\n")

    def feed(self, chunk: bytes) -> bytes:
        """The bytes to send for `chunk`: the chunk itself, with the event inserted before a sentinel."""
        if not chunk:
            return chunk
        pos = 0
        if self._last_cr and chunk[:1] == b"\n":
            pos = 1  # the second half of a "\r\n" split across chunks, not a blank line
        insert_at: int | None = None
        event_start: int | None = None  # where the current event began, if in this chunk
        for match in _LINE_END.finditer(chunk, pos):
            start, end = match.start(), match.end()
            if self._sep is None:
                self._sep = match.group()
            line_began_here = not self._partial
            blank = line_began_here and start == pos
            if blank:
                self._in_event = False
                event_start = None
            else:
                if not self._in_event:
                    self._in_event = True
                    event_start = pos if line_began_here else None
                if (
                    not self.sent
                    and insert_at is None
                    and line_began_here
                    and event_start is not None
                    and chunk[pos:start] in _DONE_LINES
                ):
                    insert_at = event_start
            self._partial = False
            pos = end
        if pos < len(chunk):
            if not self._partial and not self._in_event:
                self._in_event = True
            self._partial = True
        self._last_cr = chunk.endswith(b"\r")
        if insert_at is None:
            return chunk
        self.sent = True
        event = self._event()
        return chunk[:insert_at] + event + chunk[insert_at:] if event else chunk

    def finish(self) -> bytes:
        """What to send just before the stream ends: the closing of an open event, then the event."""
        if self.sent:
            return b""
        self.sent = True
        event = self._event()
        if not event:
            return b""
        sep = self._sep or b"\n"
        closing = b""
        if self._partial:
            closing += sep
        if self._in_event:
            closing += sep
        return closing + event
