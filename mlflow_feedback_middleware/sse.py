"""Appends one final named event to a Server-Sent-Events stream without holding back any of its bytes.

The stream passes through chunk by chunk. A small line-level state machine tracks where events begin
and end, so the trace event can be placed:

- just before an OpenAI-style ``data: [DONE]`` sentinel event, when that event starts within a chunk
  (clients stop reading at the sentinel);
- otherwise at the very end, after closing any unfinished line and event so it cannot merge with the
  app's last event.

It is a *named* event (``event: mlflow_trace``), so ``EventSource.onmessage`` handlers never see it.
"""

from __future__ import annotations

import json
import re

_LINE_END = re.compile(rb"\r\n|\r|\n")
_DONE_LINES = (b"data: [DONE]", b"data:[DONE]")


def encode_event(name: str, data: dict[str, str], sep: bytes = b"\n") -> bytes:
    """One SSE event with a single-line JSON payload, framed with `sep`."""
    payload = json.dumps(data, separators=(",", ":")).encode()
    return b"event: " + name.encode() + sep + b"data: " + payload + sep + sep


class SseTrailer:
    """Feeds a stream's chunks through and says what to add, and where, for the final event."""

    __slots__ = ("_event_data", "_event_name", "_in_event", "_last_cr", "_partial", "_sep", "sent")

    def __init__(self, event_name: str, event_data: dict[str, str]) -> None:
        self._event_name = event_name
        self._event_data = event_data
        self._sep: bytes | None = None  # the stream's own line separator, once seen
        self._partial = False  # the last chunk ended inside a non-empty line
        self._in_event = False  # a non-blank line came since the last blank line
        self._last_cr = False  # the last chunk ended with "\r" (maybe half of "\r\n")
        self.sent = False

    def _event(self) -> bytes:
        return encode_event(self._event_name, self._event_data, self._sep or b"\n")

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
        return chunk[:insert_at] + self._event() + chunk[insert_at:]

    def finish(self) -> bytes:
        """What to send just before the stream ends: the closing of an open event, then the event."""
        if self.sent:
            return b""
        self.sent = True
        sep = self._sep or b"\n"
        closing = b""
        if self._partial:
            closing += sep
        if self._in_event:
            closing += sep
        return closing + self._event()
