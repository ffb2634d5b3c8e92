"""Body capture and redaction of secrets. No server."""

from __future__ import annotations

import pytest

from mlflow_feedback_middleware.asgi.capture import capture_for
from mlflow_feedback_middleware.config import DEFAULT_REDACT_FIELDS
from mlflow_feedback_middleware.redaction import REDACTED, is_sensitive, redact

FIELDS = frozenset(DEFAULT_REDACT_FIELDS)


@pytest.mark.parametrize(
    ("key", "secret"),
    [
        ("password", True),
        ("passwordConfirm", True),
        ("OPENAI_API_KEY", True),
        ("x-api-key", True),
        ("session_token", True),
        ("aws_secret_access_key", True),
        ("max_tokens", False),
        ("token_type", False),
        ("message", False),
    ],
)
def test_which_names_are_secrets(key: str, secret: bool) -> None:
    assert is_sensitive(key, FIELDS) is secret


def test_redaction_at_any_depth_and_inside_text() -> None:
    body = {"message": "hi", "auth": {"password": "p", "nested": [{"api_key": "k"}]}, "max_tokens": 5}
    assert redact(body, FIELDS) == {
        "message": "hi",
        "auth": {"password": REDACTED, "nested": [{"api_key": REDACTED}]},
        "max_tokens": 5,
    }
    text = 'log in with password=hunter2 and "api_key": "sk-123", then ask'
    assert redact(text, FIELDS) == f'log in with password={REDACTED} and "api_key": "{REDACTED}", then ask'
    assert redact("a plain answer: nothing secret", FIELDS) == "a plain answer: nothing secret"


def test_capture_keeps_json_parses_complete_and_marks_cut_bodies() -> None:
    capture = capture_for("application/json; charset=utf-8", limit=1000)
    assert capture is not None
    capture.add(b'{"a": ')
    capture.add(b"1}")
    assert capture.value() == {"a": 1}
    cut = capture_for("text/plain", limit=4)
    assert cut is not None
    cut.add(b"abcdefgh")
    assert cut.truncated and cut.value() == "abcd... [truncated: 8 bytes in all]"
    assert capture_for("image/png", limit=10) is None
