"""Fixtures: one real `mlflow server` per test session, and a fresh experiment per test."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator

import mlflow
import pytest

from .support import MlflowServer


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    mlflow.set_tracking_uri(server.url)
    try:
        yield server
    finally:
        mlflow.flush_trace_async_logging()  # let in-flight traces land before their server goes
        server.stop()


@pytest.fixture(scope="session", autouse=True)
def outbox_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Every middleware of the session shares one outbox file, as a service's workers would."""
    path = str(tmp_path_factory.mktemp("outbox") / "outbox.db")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_FEEDBACK_OUTBOX", path)
        yield path


@pytest.fixture
def experiment_name(mlflow_server: MlflowServer) -> str:
    """A fresh experiment name per test, so tests never read each other's traces."""
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def pytest_report_header() -> list[str]:
    return [f"mlflow client: {mlflow.__version__} ({sys.executable})"]
