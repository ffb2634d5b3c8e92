"""Feedback tokens: what verifies, what is refused and with which status. No server."""

from __future__ import annotations

import pytest

from mlflow_feedback_middleware.intake.tokens import FeedbackTokens, TokenError, as_secret_list

NEW, OLD = b"n" * 32, b"o" * 32
TRACE = "tr-" + "a" * 32


def test_a_token_carries_its_grant() -> None:
    tokens = FeedbackTokens([NEW], ttl_seconds=60)
    grant = tokens.verify(tokens.issue(TRACE, "req-1", "alice", now=1000.0), now=1030.0)
    assert (grant.trace_id, grant.client_request_id, grant.user_id, grant.expires_at) == (TRACE, "req-1", "alice", 1060)


def test_expired_forged_and_retired_tokens_are_401() -> None:
    tokens = FeedbackTokens([NEW], ttl_seconds=60)
    token = tokens.issue(TRACE, "req-1", None, now=1000.0)
    with pytest.raises(TokenError, match="expired") as expired:
        tokens.verify(token, now=1061.0)
    assert expired.value.status == 401
    with pytest.raises(TokenError, match="not valid"):
        FeedbackTokens([OLD], ttl_seconds=60).verify(token, now=1000.0)  # another service's secret
    payload, signature = token.split(".")[1:]
    with pytest.raises(TokenError):
        tokens.verify(f"v1.{payload}x.{signature}", now=1000.0)


def test_rotation_old_tokens_verify_until_they_expire() -> None:
    old_token = FeedbackTokens([OLD], ttl_seconds=60).issue(TRACE, "r", "bob", now=0.0)
    rotated = FeedbackTokens([NEW, OLD], ttl_seconds=60)
    assert rotated.verify(old_token, now=10.0).user_id == "bob"
    new_token = rotated.issue(TRACE, "r", "bob", now=0.0)
    with pytest.raises(TokenError):
        FeedbackTokens([OLD], ttl_seconds=60).verify(new_token, now=10.0)  # signed with the new secret


@pytest.mark.parametrize(
    "mangle", [lambda t: t + "=", lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"), lambda t: "é" + t]
)
def test_a_token_has_one_spelling(mangle: object) -> None:
    tokens = FeedbackTokens([NEW], ttl_seconds=60)
    token = tokens.issue(TRACE, "r", None, now=0.0)
    with pytest.raises(TokenError) as refused:
        tokens.verify(mangle(token), now=0.0)  # type: ignore[operator]
    assert refused.value.status == 401


def test_short_secrets_are_refused() -> None:
    with pytest.raises(ValueError):
        as_secret_list("short")
    assert as_secret_list(["a" * 16, b"b" * 16]) == [b"a" * 16, b"b" * 16]
