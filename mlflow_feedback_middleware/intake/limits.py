"""Caps on what one feedback request may contain, and a per-client rate limit for the feedback routes."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

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


def _in(address: str, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address.strip())
    except ValueError:
        return False
    return any(ip in network for network in networks)


@dataclass(frozen=True)
class RateLimit:
    """A token bucket per client: `burst` requests at once, refilled at `per_second`.

    Who "a client" is: `key(conn)` when given; else the valid feedback token the request carries (one bucket
    per answer: behind a proxy or NAT, users never share one), else the user `AuthenticationMiddleware`
    authenticated, else the IP address. `trusted_proxies` (addresses or networks, e.g. ``"10.0.0.0/8"``)
    are the only peers whose ``X-Forwarded-For`` is believed: the client is then the right-most address
    in it that is not itself a trusted proxy.
    """

    per_second: float = 5.0
    burst: int = 50
    key: Callable[[HTTPConnection], str] | None = None
    max_clients: int = 10_000  # buckets kept; the least recently seen client is forgotten first
    trusted_proxies: tuple[str, ...] = ()
    _networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not (self.per_second > 0 and math.isfinite(self.per_second)) or self.burst < 1 or self.max_clients < 1:
            raise ValueError("RateLimit needs per_second > 0, burst >= 1 and max_clients >= 1")
        if isinstance(self.trusted_proxies, str):
            raise TypeError("trusted_proxies takes a list of addresses or networks, not one string")
        try:
            networks = tuple(ipaddress.ip_network(p, strict=False) for p in self.trusted_proxies)
        except ValueError as exc:
            raise ValueError(f"trusted_proxies: {exc}") from None
        object.__setattr__(self, "_networks", networks)

    def address(self, conn: HTTPConnection) -> str:
        """The client's IP address, through trusted proxies' ``X-Forwarded-For``."""
        peer = client_address(conn)
        if not self._networks or not _in(peer, self._networks):
            return peer
        hops = [hop.strip() for hop in conn.headers.get("x-forwarded-for", "").split(",") if hop.strip()]
        for hop in reversed(hops):
            if not _in(hop, self._networks):
                return hop
        return peer

    def client_of(self, conn: HTTPConnection, answer_of: Callable[[HTTPConnection], str | None] | None) -> str:
        """The bucket a request draws from (see the class docstring). `answer_of` names the answer a request's
        feedback token was signed for, or None for no valid token: a made-up token never earns a bucket."""
        if self.key is not None:
            return self.key(conn)
        answer = answer_of(conn) if answer_of is not None else None
        if answer is not None:
            return "token:" + hashlib.sha256(answer.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        user = conn.scope.get("user")
        if user is not None and getattr(user, "is_authenticated", False):
            return "user:" + str(getattr(user, "display_name", "") or getattr(user, "identity", ""))
        return "ip:" + self.address(conn)


class RateLimiter:
    """Applies a `RateLimit`; thread-safe, O(1) per request, memory bounded by `max_clients`."""

    def __init__(self, limit: RateLimit, answer_of: Callable[[HTTPConnection], str | None] | None = None) -> None:
        self.limit = limit
        self._answer_of = answer_of
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)
        self._lock = threading.Lock()

    def take(self, conn: HTTPConnection, now: float | None = None) -> float:
        """Spend one token for the client of `conn`: 0.0 if allowed, else seconds until one is available."""
        limit = self.limit
        key = limit.client_of(conn, self._answer_of)
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
