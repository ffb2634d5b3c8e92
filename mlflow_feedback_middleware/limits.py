"""Caps on what one feedback request may contain, and a per-client rate limit for the feedback routes."""

from __future__ import annotations

import json
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from starlette.requests import HTTPConnection


@dataclass(frozen=True)
class FeedbackLimits:
    """Caps on one feedback request; anything over them is refused with a 4xx naming the field."""

    max_text_chars: int = 5_000  # comment, rationale, and a string value
    max_metadata_entries: int = 20
    max_metadata_bytes: int = 4_096  # the metadata as compact JSON
    max_ratings: int = 20
    max_value_bytes: int = 4_096  # a list or dict value as compact JSON

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"FeedbackLimits.{name} must be a positive integer")


def json_size(value: object) -> int:
    """Bytes of `value` as compact JSON."""
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


def client_address(conn: HTTPConnection) -> str:
    """The client's IP address as the ASGI server reports it (behind a proxy, enable its proxy headers)."""
    client = conn.scope.get("client")
    return str(client[0]) if client else "unknown"


@dataclass(frozen=True)
class RateLimit:
    """A token bucket per client: `burst` requests at once, refilled at `per_second`.

    `key` names the client; by default its IP address.
    """

    per_second: float = 5.0
    burst: int = 50
    key: Callable[[HTTPConnection], str] = client_address
    max_clients: int = 10_000  # buckets kept; the least recently seen client is forgotten first

    def __post_init__(self) -> None:
        if not (self.per_second > 0 and math.isfinite(self.per_second)) or self.burst < 1 or self.max_clients < 1:
            raise ValueError("RateLimit needs per_second > 0, burst >= 1 and max_clients >= 1")


class RateLimiter:
    """Applies a `RateLimit`; thread-safe, O(1) per request, memory bounded by `max_clients`."""

    def __init__(self, limit: RateLimit) -> None:
        self.limit = limit
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)
        self._lock = threading.Lock()

    def take(self, conn: HTTPConnection, now: float | None = None) -> float:
        """Spend one token for the client of `conn`: 0.0 if allowed, else seconds until one is available."""
        limit = self.limit
        key = limit.key(conn)
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, at = self._buckets.pop(key, (float(limit.burst), now))
            tokens = min(float(limit.burst), tokens + (now - at) * limit.per_second)
            wait = 0.0
            if tokens >= 1.0:
                tokens -= 1.0
            else:
                wait = (1.0 - tokens) / limit.per_second
            self._buckets[key] = (tokens, now)
            if len(self._buckets) > limit.max_clients:
                self._buckets.popitem(last=False)
        return wait
