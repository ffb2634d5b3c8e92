"""Reading the middleware's arguments from MLFLOW_FEEDBACK_* variables. No server."""

from __future__ import annotations

import pytest

from mlflow_feedback_middleware.env_config import PARSERS, apply_environment, variable
from mlflow_feedback_middleware.intake.limits import RateLimit

DEFAULTS = {"rate_limit": RateLimit(), "export": "mlflow", "sse_final_event": None, "exclude_paths": ["/health"]}


def test_arguments_at_their_default_take_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_FEEDBACK_RATE_LIMIT", "2.5,10")
    monkeypatch.setenv("MLFLOW_FEEDBACK_SSE_FINAL_EVENT", "false")
    monkeypatch.setenv("MLFLOW_FEEDBACK_EXCLUDE_PATHS", '["^/internal/"]')
    out = apply_environment(dict(DEFAULTS), DEFAULTS)
    assert out["rate_limit"] == RateLimit(per_second=2.5, burst=10)
    assert out["sse_final_event"] is False and out["exclude_paths"] == ["^/internal/"]
    assert out["export"] == "mlflow"  # unset: the default stays


def test_arguments_set_in_code_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_FEEDBACK_EXPORT", "otlp")
    assert apply_environment(dict(DEFAULTS, export="custom"), DEFAULTS)["export"] == "custom"


def test_a_bad_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_FEEDBACK_RATE_LIMIT", "fast")
    with pytest.raises(ValueError, match="MLFLOW_FEEDBACK_RATE_LIMIT='fast'"):
        apply_environment(dict(DEFAULTS), DEFAULTS)


def test_every_argument_has_its_variable() -> None:
    assert variable("outbox_path") == "MLFLOW_FEEDBACK_OUTBOX_PATH"
    assert all(name.islower() for name in PARSERS)
