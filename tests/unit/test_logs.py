"""The package's log lines: visible with level and name where the app configured no logging, the app's own
handlers otherwise; no credentials in them. No server."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from mlflow_feedback_middleware.logs import logger, show_logs, without_credentials


def test_credentials_never_reach_a_log_line() -> None:
    assert (
        without_credentials("https://ann:s3cret@mlflow.example.com:8443/x?y=1")
        == "https://mlflow.example.com:8443/x?y=1"
    )
    assert without_credentials("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert without_credentials("databricks") == "databricks"


@pytest.fixture
def bare_logging() -> Iterator[None]:
    """The package's logger as it is at import; tests remove the root's handlers (pytest's) with `no_root`."""
    saved_own, saved_level = logger.handlers[:], logger.level
    logger.handlers.clear()
    logger.setLevel(logging.NOTSET)
    yield
    logger.handlers[:] = saved_own
    logger.setLevel(saved_level)


@contextmanager
def no_root() -> Iterator[None]:
    """No root handler, as under uvicorn, which configures only its own loggers."""
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers.clear()
    try:
        yield
    finally:
        root.handlers[:] = saved


def test_without_app_logging_lines_show_with_level_and_name(
    bare_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    show_logs()
    show_logs()  # once
    with no_root():
        logger.info("tracing requests to experiment 1")
    assert capsys.readouterr().err == "INFO mlflow_feedback_middleware: tracing requests to experiment 1\n"


def test_once_the_app_configures_logging_its_handlers_take_over(
    bare_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    show_logs()
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    with no_root():
        logging.getLogger().addHandler(handler)
        logger.warning("one line")
    assert capsys.readouterr().err == "" and [r.getMessage() for r in records] == ["one line"]


def test_a_level_the_app_set_is_kept(bare_logging: None) -> None:
    logger.setLevel(logging.ERROR)
    show_logs()
    assert logger.level == logging.ERROR
