"""The options, defined once in `config.Settings`: the middleware's arguments, the MLFLOW_FEEDBACK_* variables and
the configuration page's tables (docs/configuration.md) all come from it. No server."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from mlflow_feedback_middleware import MlflowFeedbackMiddleware
from mlflow_feedback_middleware.config import UNSET, Settings, options, options_table
from mlflow_feedback_middleware.env_config import variable
from mlflow_feedback_middleware.insight.cli import main as cli
from mlflow_feedback_middleware.intake.limits import RateLimit

CONFIGURATION_PAGE = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_arguments_left_unset_take_the_environment() -> None:
    environ = {
        "MLFLOW_FEEDBACK_RATE_LIMIT": "2.5,10",
        "MLFLOW_FEEDBACK_SSE_FINAL_EVENT": "false",
        "MLFLOW_FEEDBACK_EXCLUDE_PATHS": '["^/internal/"]',
        "MLFLOW_FEEDBACK_OUTBOX": "/tmp/old-name.db",
    }
    settings = Settings.from_arguments({}, environ)
    assert settings.rate_limit == RateLimit(per_second=2.5, burst=10)
    assert settings.sse_final_event is False and settings.exclude_paths == ("^/internal/",)
    assert settings.outbox_path == "/tmp/old-name.db"  # the variable documented first still works
    assert settings.export == "mlflow"  # unset everywhere: the default


def test_an_argument_given_in_code_wins_even_when_it_equals_the_default() -> None:
    environ = {"MLFLOW_FEEDBACK_EXPORT": "otlp", "MLFLOW_FEEDBACK_FEEDBACK_PATH": "/votes"}
    assert Settings.from_arguments({"export": "mlflow", "feedback_path": "/feedback"}, environ).export == "mlflow"
    assert Settings.from_arguments({"feedback_path": "/feedback"}, environ).feedback_path == "/feedback"
    assert Settings.from_arguments({}, environ).feedback_path == "/votes"


def test_a_bad_value_names_the_variable() -> None:
    with pytest.raises(ValueError, match="MLFLOW_FEEDBACK_RATE_LIMIT='fast' is not a valid rate_limit"):
        Settings.from_arguments({}, {"MLFLOW_FEEDBACK_RATE_LIMIT": "fast"})


def test_the_secret_pair_and_none_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_FEEDBACK_PREVIOUS_SECRET", "p" * 16)
    settings = Settings.from_arguments({}, {"MLFLOW_FEEDBACK_SECRET": "s" * 16, "MLFLOW_FEEDBACK_RATE_LIMIT": "none"})
    assert settings.feedback_secret == (b"s" * 16, b"p" * 16) and settings.rate_limit is None
    assert Settings.from_arguments({}, {"MLFLOW_FEEDBACK_SECRET": ""}).feedback_secret == ()


def test_an_unknown_argument_is_refused() -> None:
    with pytest.raises(TypeError, match="experiment"):
        Settings.from_arguments({"experiment": "x"}, {})


def test_the_middlewares_arguments_are_the_options() -> None:
    """The constructor lists each option once, typed, defaulting to UNSET; defaults live in Settings only."""
    parameters = dict(inspect.signature(MlflowFeedbackMiddleware.__init__).parameters)
    del parameters["self"], parameters["app"]
    assert list(parameters) == [option.name for option in options()]
    assert all(p.default is UNSET and p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters.values())


def test_every_option_has_a_variable_a_group_and_a_description() -> None:
    for option in options():
        assert option.metadata["parse"] is not None and option.metadata["doc"].endswith((".", ")")), option.name
    assert variable("outbox_path") == "MLFLOW_FEEDBACK_OUTBOX_PATH"


def test_the_documented_table_is_the_generated_one() -> None:
    """Fails when the configuration page's tables and `Settings` disagree; `mlflow-feedback options` prints
    the tables to paste between its options markers."""
    text = CONFIGURATION_PAGE.read_text()
    start = text.index("<!-- options:start")
    start = text.index("\n", start) + 1
    end = text.index("<!-- options:end -->")
    assert text[start:end].strip() == options_table().strip()


def test_the_cli_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["options"]) == 0
    assert capsys.readouterr().out == options_table()
