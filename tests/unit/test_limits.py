"""The feedback rate limiter: buckets, refill, keys and trusted proxies. No server."""

from __future__ import annotations

import pytest
from starlette.requests import HTTPConnection

from mlflow_feedback_middleware.intake.limits import FeedbackLimits, RateLimit, RateLimiter


def conn(peer: str = "203.0.113.7", forwarded: str | None = None, user: object = None) -> HTTPConnection:
    headers = [(b"x-forwarded-for", forwarded.encode())] if forwarded else []
    scope = {"type": "http", "client": (peer, 1234), "headers": headers}
    if user is not None:
        scope["user"] = user
    return HTTPConnection(scope)


def test_a_burst_then_the_refill_rate() -> None:
    limiter = RateLimiter(RateLimit(per_second=2, burst=3))
    assert [limiter.take(conn(), now=0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take(conn(), now=0.0) == pytest.approx(0.5)  # seconds until the next token
    assert limiter.take(conn(), now=0.5) == 0.0
    assert limiter.take(conn("198.51.100.1"), now=0.5) == 0.0  # another client, its own bucket


def test_forwarded_addresses_count_only_from_trusted_proxies() -> None:
    limit = RateLimit(trusted_proxies=("10.0.0.0/8",))
    assert limit.address(conn("10.1.2.3", "198.51.100.9, 10.0.0.5")) == "198.51.100.9"
    assert limit.address(conn("203.0.113.7", "198.51.100.9")) == "203.0.113.7"  # a client picking its bucket
    assert limit.address(conn("10.1.2.3")) == "10.1.2.3"


class _User:
    is_authenticated = True
    display_name = "alice"


def test_the_bucket_is_the_answer_then_the_user_then_the_address() -> None:
    limit = RateLimit()
    assert limit.client_of(conn(), lambda c: "tr-1").startswith("token:")
    assert limit.client_of(conn(user=_User()), lambda c: None) == "user:alice"
    assert limit.client_of(conn(), None) == "ip:203.0.113.7"
    assert RateLimit(key=lambda c: "k").client_of(conn(), lambda c: "tr-1") == "k"


def test_memory_is_bounded() -> None:
    limiter = RateLimiter(RateLimit(max_clients=2))
    for peer in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
        limiter.take(conn(peer), now=0.0)
    assert len(limiter._buckets) == 2


@pytest.mark.parametrize(
    "bad", [{"per_second": 0}, {"burst": 0}, {"per_second": float("inf")}, {"trusted_proxies": "10.0.0.0/8"}]
)
def test_nonsense_limits_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises((ValueError, TypeError)):
        RateLimit(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        FeedbackLimits(max_text_chars=0)
