"""Start-up without a usable MLflow: the app answers as if the middleware were not there, and says why.

Each case runs in its own process, since MLflow's tracking URI and tracer are process-wide.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .support import ROOT, MlflowServer, free_port

SCRIPT = "startup_outcomes"  # tests/scripts/startup_outcomes.py


def run_app(kwargs: dict[str, object], env: dict[str, str]) -> dict[str, object]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | env
    full_env["MLFLOW_FEEDBACK_OUTBOX"] = os.environ["MLFLOW_FEEDBACK_OUTBOX"]
    result = subprocess.run(
        [sys.executable, "-m", f"tests.scripts.{SCRIPT}", json.dumps(kwargs)],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def assert_untraced(outcome: dict[str, object]) -> None:
    responses = outcome["responses"]
    assert isinstance(responses, list)
    for response in responses[:-1]:
        assert response["status"] == 200
        assert response["body"]["response"] == "echo: hi"
        assert "x-mlflow-trace-id" not in response["headers"]
        assert response["body"]["helper_trace_id"] is None


def test_unreachable_tracking_server_serves_untraced_with_one_warning() -> None:
    outcome = run_app(
        {"tracking_uri": f"http://127.0.0.1:{free_port()}", "experiment_name": "x", "startup_timeout_seconds": 1},
        {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"},
    )
    assert_untraced(outcome)
    responses = outcome["responses"]
    assert isinstance(responses, list)
    assert outcome["waits"] == 1  # only the first request waited, for start-up; the others passed at once
    # Feedback is still accepted: it waits in the outbox until the server is back (another replica
    # may have issued the trace).
    assert responses[-1]["status"] == 202 and responses[-1]["body"]["status"] == "accepted"
    warnings = [message for level, message in outcome["logs"] if level == "WARNING"]  # type: ignore[union-attr]
    assert sum("unreachable" in w for w in warnings) == 1, warnings


def test_tracing_only_install_with_local_store_is_disabled_loudly(tmp_path: object) -> None:
    pytest.importorskip("mlflow.tracing")
    try:
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("full mlflow is installed here; this checks the mlflow-tracing-only install")
    outcome = run_app({"tracking_uri": "sqlite:///mlflow.db"}, {})
    assert_untraced(outcome)
    errors = [message for level, message in outcome["logs"] if level == "ERROR"]  # type: ignore[union-attr]
    assert len(errors) == 1 and "DISABLED" in errors[0] and "sqlite" in errors[0]


def test_no_tracking_uri_at_all_is_disabled_loudly() -> None:
    try:
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("full mlflow defaults to a local sqlite store; this checks mlflow-tracing alone")
    outcome = run_app({}, {})
    assert_untraced(outcome)
    errors = [message for level, message in outcome["logs"] if level == "ERROR"]  # type: ignore[union-attr]
    assert len(errors) == 1 and "DISABLED" in errors[0]


def test_tracking_uri_from_the_environment(mlflow_server: MlflowServer) -> None:
    outcome = run_app(
        {"experiment_name": "from-env", "feedback_wait_seconds": 2}, {"MLFLOW_TRACKING_URI": mlflow_server.url}
    )
    responses = outcome["responses"]
    assert isinstance(responses, list)
    assert all(r["headers"]["x-mlflow-trace-id"].startswith("tr-") for r in responses[:-1])
    assert responses[-1]["status"] == 404, responses[-1]  # a well-formed ID this service never issued
