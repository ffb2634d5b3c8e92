"""Resource hygiene: nothing the app created outlives it, and the first request finds MLflow ready.

Each runs in a fresh process: MLflow's tracer, exporter and their connections are process-wide.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from .support import ROOT, AppProcess, MlflowServer, run_script, wait_until

_NO_LIFESPAN = "hygiene_without_lifespan"  # tests/scripts/hygiene_without_lifespan.py


def test_apps_torn_down_without_lifespan_leave_no_socket_to_warn_about(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "MLFLOW_TRACKING_URI": mlflow_server.url}
    result = subprocess.run(
        [sys.executable, "-X", "tracemalloc=5", "-W", "error::ResourceWarning", "-m", f"tests.scripts.{_NO_LIFESPAN}"],
        cwd=ROOT,
        env=env | {"MLFLOW_FEEDBACK_OUTBOX": str(tmp_path / "outbox.db")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ResourceWarning" not in result.stderr, result.stderr[-3000:]
    assert "unclosed" not in result.stderr


_LIFESPAN = "hygiene_with_lifespan"  # tests/scripts/hygiene_with_lifespan.py


def test_lifespan_starts_mlflow_off_the_loop_and_shutdown_releases_threads_and_sockets(
    mlflow_server: MlflowServer,
) -> None:
    report = run_script(_LIFESPAN, [], {"MLFLOW_TRACKING_URI": mlflow_server.url})
    assert report["tracer_ready_before_first_request"] is True
    assert report["fast_client_before_first_request"] == "FastTraceInfoClient"
    assert report["open_connections"] == 0
    print(f"first request / second request: {report['first_over_second']:.2f}x")  # measured, not asserted


def test_a_lifespan_entered_twice_still_traces_and_delivers_feedback(experiment_name: str) -> None:
    """`with TestClient(app)` twice on one app: shutdown released the threads, the second start gets new ones."""
    from fastapi.testclient import TestClient

    from .apps import build_app

    app = build_app(experiment_name=experiment_name)
    for _ in range(2):
        with TestClient(app) as client:
            answer = client.post("/chat", json={"message": "again"})
            trace_id = answer.headers["x-mlflow-trace-id"]
            feedback = client.post(f"/feedback?trace_id={trace_id}", json={"is_correct": True})
            assert feedback.status_code in (200, 202), feedback.text
            if feedback.status_code == 202:
                status_url = feedback.json()["status_url"]
                wait_until(lambda: client.get(status_url).json()["state"] == "delivered", 60, "delivered")  # noqa: B023


def test_shutdown_with_the_tracking_server_hung_completes_within_its_deadline(tmp_path: Path) -> None:
    """A tracking server that accepts connections and never answers (SIGSTOP): SIGTERM still ends the app
    within shutdown_timeout_seconds plus start-up margins, not after MLflow's minutes of retries."""
    server = MlflowServer(tmp_path / "server")
    (tmp_path / "server").mkdir()
    server.start()
    kwargs = {"experiment_name": "hung", "outbox_path": str(tmp_path / "outbox.db"), "shutdown_timeout_seconds": 5}
    try:
        with AppProcess(tmp_path, {"MLFLOW_TRACKING_URI": server.url}, kwargs) as app:
            for _ in range(5):
                assert "x-mlflow-trace-id" in httpx.post(f"{app.url}/chat", json={"message": "x"}, timeout=30).headers
            assert server.process is not None
            os.killpg(server.process.pid, signal.SIGSTOP)
            for _ in range(5):  # traces and a vote now queue for a server that will not answer
                httpx.post(f"{app.url}/chat", json={"message": "x"}, timeout=30)
            trace_id = "tr-" + "a" * 32
            httpx.post(f"{app.url}/feedback?trace_id={trace_id}", json={"is_correct": True}, timeout=60)
            assert app.process is not None
            app.process.send_signal(signal.SIGTERM)
            # 5 s of shutdown deadline, with room for a loaded machine; MLflow's own retries take minutes.
            wait_until(lambda: app.process is not None and app.process.poll() is not None, 60, "the app exits")
    finally:
        if server.process is not None:
            os.killpg(server.process.pid, signal.SIGCONT)
        server.stop()
