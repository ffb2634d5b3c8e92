"""Bounded copies of request and response bodies for a trace's inputs and outputs.

Chunks are copied as they pass (the body itself is never delayed) until the cap is reached; past it,
only the size is counted.
"""

from __future__ import annotations

import json
from typing import Any


def media_type(content_type: str) -> str:
    """The bare, lower-cased media type of a Content-Type header value."""
    return content_type.split(";", 1)[0].strip().lower()


def capture_for(content_type: str, limit: int) -> BodyCapture | None:
    """A capture for a body of this Content-Type, when it is JSON or text; None for anything else."""
    media = media_type(content_type)
    as_json = media == "application/json" or media.endswith("+json")
    if as_json or media.startswith("text/"):
        return BodyCapture(limit, as_json)
    return None


class BodyCapture:
    """Up to `limit` bytes of a body, decoded at the end as JSON (when `as_json`) or text."""

    __slots__ = ("_parts", "_stored", "as_json", "limit", "size")

    def __init__(self, limit: int, as_json: bool) -> None:
        self.limit = limit
        self.as_json = as_json
        self.size = 0
        self._stored = 0
        self._parts: list[bytes] = []

    def add(self, chunk: bytes) -> None:
        """Copy what still fits of `chunk`."""
        self.size += len(chunk)
        room = self.limit - self._stored
        if room > 0 and chunk:
            part = chunk[:room]
            self._parts.append(part)
            self._stored += len(part)

    @property
    def truncated(self) -> bool:
        """Whether the body was larger than the cap."""
        return self.size > self._stored

    def value(self) -> Any:
        """The captured body: parsed JSON when it is JSON and complete, else text (marked when cut)."""
        raw = b"".join(self._parts)
        if self.as_json and not self.truncated and raw:
            try:
                return json.loads(raw)
            except ValueError:
                pass
        text = raw.decode("utf-8", errors="replace")
        if self.truncated:
            return f"{text}... [truncated: {self.size} bytes in all]"
        return text
