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

_NO_LIFESPAN = r"""
import asyncio, gc, sys, uuid
import httpx
from tests.apps import build_app
from mlflow_feedback_middleware._mlflow.export import flush_exports

async def main():
    for _ in range(3):  # a test suite builds many apps
        app = build_app(experiment_name="hygiene-" + uuid.uuid4().hex[:8])
        transport = httpx.ASGITransport(app=app)  # no lifespan, as in most test suites
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            for _ in range(5):
                assert "x-mlflow-trace-id" in (await client.post("/chat", json={"message": "x"})).headers
    flush_exports(30)  # the fast client's kept-alive connections have been used by now

asyncio.run(main())
gc.collect()
print("{}")
"""


def test_apps_torn_down_without_lifespan_leave_no_socket_to_warn_about(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "MLFLOW_TRACKING_URI": mlflow_server.url}
    result = subprocess.run(
        [sys.executable, "-X", "tracemalloc=5", "-W", "error::ResourceWarning", "-c", _NO_LIFESPAN],
        cwd=ROOT,
        env=env | {"MLFLOW_FEEDBACK_OUTBOX": str(tmp_path / "outbox.db")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ResourceWarning" not in result.stderr, result.stderr[-3000:]
    assert "unclosed" not in result.stderr


_LIFESPAN = r"""
import json, sys, threading, time, uuid
import httpx
from tests.apps import build_app
from tests.support import UvicornThread, wait_until
from mlflow.tracing.provider import _get_trace_exporter, provider

app = build_app(experiment_name="hygiene-" + uuid.uuid4().hex[:8])
report = {}
with UvicornThread(app) as server:
    # After lifespan start-up, before any request: MLflow's tracer and exporter are built and tuned.
    report["tracer_ready_before_first_request"] = provider.once._done
    exporter = _get_trace_exporter()
    report["fast_client_before_first_request"] = type(getattr(exporter, "_client", None)).__name__
    with httpx.Client(base_url=server.url) as client:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            assert "x-mlflow-trace-id" in client.post("/chat", json={"message": "x"}).headers
            times.append(time.perf_counter() - start)
    report["first_over_second"] = times[0] / times[1]
fast = getattr(_get_trace_exporter(), "_client", None)
wait_until(lambda: not [t for t in threading.enumerate() if t.name.startswith("mlflow-feedback")], 30, "threads end")
report["open_connections"] = sum(c.sock is not None for c in getattr(fast, "_connections", []))
print(json.dumps(report))
"""


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
