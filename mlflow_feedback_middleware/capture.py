"""Bounded copies of request and response bodies for a trace's inputs and outputs.

Chunks are copied as they pass (the body itself is never delayed) until the cap is reached; past it,
only the size is counted.
"""

from __future__ import annotations

import json
from typing import Any


class BodyCapture:
    """Up to `limit` bytes of a body, decoded at the end as JSON or text."""

    __slots__ = ("_parts", "_stored", "limit", "size")

    def __init__(self, limit: int) -> None:
        self.limit = limit
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

    def value(self, as_json: bool) -> Any:
        """The captured body: parsed JSON when asked and complete, else text (marked when cut)."""
        raw = b"".join(self._parts)
        if as_json and not self.truncated and raw:
            try:
                return json.loads(raw)
            except ValueError:
                pass
        text = raw.decode("utf-8", errors="replace")
        if self.truncated:
            return f"{text}... [truncated: {self.size} bytes in all]"
        return text


def is_json_type(content_type: str) -> bool:
    """Whether a Content-Type header value names JSON (application/json, application/*+json)."""
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")
