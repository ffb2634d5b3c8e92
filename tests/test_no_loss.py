"""No accepted feedback is lost: tracking-server outages, app crashes, replays and several replicas.

These run the app in its own uvicorn process (killed with SIGKILL where a crash is the point) against
a real tracking server that the tests stop and start again.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from mlflow.tracing.client import TracingClient
from mlflow.tracing.trace_manager import InMemoryTraceManager

from mlflow_feedback_middleware.delivery.outbox import Item, Outbox
from mlflow_feedback_middleware.delivery.writer import FEEDBACK_ID_KEY, log_feedback
from mlflow_feedback_middleware.intake.models import Assessment

from .apps import build_app
from .support import (
    AppProcess,
    MlflowServer,
    UvicornThread,
    client_for,
    get_trace,
    root_span,
    run_script,
    wait_until,
)

TRACE_HEADER = "x-mlflow-trace-id"


def written(client: TracingClient, trace_id: str, feedback_id: str) -> list[Any]:
    """The assessments on `trace_id` that outbox item `feedback_id` wrote."""
    info = client.get_trace_info(trace_id)
    return [a for a in info.assessments if (a.metadata or {}).get(FEEDBACK_ID_KEY, "").startswith(feedback_id + "/")]


def landed(client: TracingClient, trace_id: str) -> bool:
    try:
        return client.get_trace_info(trace_id).state.value == "OK"
    except Exception:
        return False


def outbox_health(app: AppProcess) -> dict[str, Any]:
    return httpx.get(f"{app.url}/feedback/health", timeout=10).json()  # type: ignore[no-any-return]


def test_outage_then_crash_loses_no_feedback(tmp_path: Path) -> None:
    """Server down: answers keep their speed and IDs, feedback is queued (202). The app is then killed
    with its outbox full; the server comes back; a new app process delivers every vote exactly once."""
    (tmp_path / "server").mkdir()
    server = MlflowServer(tmp_path / "server")
    server.start()
    env = {"MLFLOW_TRACKING_URI": server.url, "MLFLOW_ASYNC_TRACE_LOGGING_MAX_INTERVAL_MILLIS": "200"}
    kwargs = {"experiment_name": "outage", "outbox_path": str(tmp_path / "outbox.db")}
    mlflow_client = TracingClient(tracking_uri=server.url)
    try:
        with AppProcess(tmp_path, env, kwargs) as app:
            trace_ids = [
                httpx.post(f"{app.url}/chat", json={"message": f"q{i}"}, timeout=30).headers[TRACE_HEADER]
                for i in range(4)
            ]
            wait_until(lambda: all(landed(mlflow_client, t) for t in trace_ids), 60, "the traces did not land")

            server.stop()
            during = [httpx.post(f"{app.url}/chat", json={"message": "down"}, timeout=30) for _ in range(3)]
            for response in during:
                # MLflow's client retries a refused connection for minutes; none of that is on the request (the
                # client's 30 s timeout would end it).
                assert response.status_code == 200 and TRACE_HEADER in response.headers
            feedback_ids = []
            for i, trace_id in enumerate(trace_ids):
                response = httpx.post(
                    f"{app.url}/feedback?trace_id={trace_id}&user_id=u{i}",
                    json={"is_correct": i % 2 == 0, "comment": f"vote {i}"},
                    timeout=30,
                )
                assert response.status_code == 202, response.text
                feedback_ids.append(response.json()["feedback_id"])
            health = httpx.get(f"{app.url}/feedback/health", timeout=10)
            assert health.status_code == 503
            assert health.json()["reachable"] is False and health.json()["outbox"]["pending"] == 4
            app.kill()

        server.start()
        with AppProcess(tmp_path, env, kwargs) as restarted:
            wait_until(lambda: outbox_health(restarted)["outbox"]["pending"] == 0, 120, "the outbox did not drain")
            health = outbox_health(restarted)
            assert health["status"] == "ok" and health["outbox"]["delivered"] == 4
        for i, (trace_id, feedback_id) in enumerate(zip(trace_ids, feedback_ids, strict=True)):
            [assessment] = written(mlflow_client, trace_id, feedback_id)
            assert assessment.value is (i % 2 == 0) and assessment.rationale == f"vote {i}"
            assert assessment.source.source_id == f"u{i}"
    finally:
        server.stop()


def test_feedback_to_another_replica_is_written_once(
    tmp_path: Path, mlflow_server: MlflowServer, experiment_name: str
) -> None:
    """Two app processes share a tracking server and an outbox file. Feedback sent to the replica that
    did not answer, the moment the answer arrives (before MLflow has the trace), is written exactly once,
    by trace ID and by client request ID."""
    env = {"MLFLOW_TRACKING_URI": mlflow_server.url}
    kwargs = {"experiment_name": experiment_name, "outbox_path": str(tmp_path / "outbox.db")}
    with AppProcess(tmp_path, env, kwargs) as a, AppProcess(tmp_path, env, kwargs) as b:
        sent: list[tuple[str, str]] = []
        for answering, other, by in ((a, b, "trace_id"), (b, a, "client_request_id"), (a, b, "client_request_id")):
            answer = httpx.post(f"{answering.url}/chat", json={"message": "hi"}, timeout=30)
            key = answer.headers[TRACE_HEADER] if by == "trace_id" else answer.headers["x-request-id"]
            response = httpx.post(f"{other.url}/feedback?{by}={key}", json={"is_correct": True}, timeout=60)
            assert response.status_code in (200, 202), response.text
            sent.append((answer.headers[TRACE_HEADER], response.json()["feedback_id"]))
        for app in (a, b):
            wait_until(lambda app=app: outbox_health(app)["outbox"]["pending"] == 0, 60, "the outbox did not drain")
    mlflow_client = TracingClient()
    for trace_id, feedback_id in sent:
        get_trace(trace_id)
        assert len(written(mlflow_client, trace_id, feedback_id)) == 1
        assert [a.name for a in get_trace(trace_id).info.assessments] == ["user_feedback"]


@pytest.mark.anyio
async def test_replay_after_a_crash_mid_write_adds_no_second_assessment(experiment_name: str) -> None:
    """A process died after MLflow stored the first of two assessments but before its outbox row said
    so: whoever takes the row over finds that one by its feedback ID and writes only the second."""
    app = build_app(experiment_name=experiment_name)
    async with client_for(app) as client:
        trace_id = (await client.post("/chat", json={"message": "hi"})).headers[TRACE_HEADER]
    get_trace(trace_id)
    stack: Any = app.middleware_stack  # built by the first request; the middleware is inside it
    while stack.__class__.__name__ != "MlflowFeedbackMiddleware":
        stack = stack.app
    delivery = stack.delivery
    item = Item(
        delivery.destination,
        trace_id,
        None,
        "dora",
        [Assessment("user_feedback", True), Assessment("user_accuracy", 0.8)],
        issued_here=True,
    )
    crashed = Outbox(delivery.outbox.path)  # another process's handle on the same file
    crashed.add(item, lease_seconds=0)  # its lease has run out, as a dead owner's does
    log_feedback(trace_id, item.assessments[0], "dora", item.id, 0)  # the write the crash interrupted
    delivery.start()
    delivery.wake()

    mlflow_client = TracingClient()
    stored = wait_until(
        lambda: (row := delivery.outbox.get(item.id)) is not None and row.state == "delivered" and row,
        30,
        "the replay did not deliver",
    )
    assert stored.assessment_ids[0] is not None
    names = sorted(a.name for a in written(mlflow_client, trace_id, item.id))
    assert names == ["user_accuracy", "user_feedback"]


@pytest.mark.anyio
async def test_hundreds_of_concurrent_mixed_requests_keep_their_own_traces(experiment_name: str) -> None:
    """JSON (async and threadpool), streams and failures at once: each trace holds its own request, the
    header and final-event IDs match the stored traces, and nothing stays behind in memory."""
    app = build_app(experiment_name=experiment_name)

    async def one(client: httpx.AsyncClient, i: int) -> tuple[int, httpx.Response]:
        kind = i % 4
        if kind == 0:
            return i, await client.post("/chat", json={"message": f"m{i}"})
        if kind == 1:
            return i, await client.post("/chat-sync", json={"message": f"m{i}"})
        if kind == 2:
            return i, await client.post("/chat/stream", json={"message": f"m{i} w{i}"})
        return i, await client.get("/missing")

    async with client_for(app) as client:
        await asyncio.gather(*(one(client, i) for i in range(300)))  # pools fill up to their bounds
        threads_after_first_round = threading.active_count()
        results = await asyncio.gather(*(one(client, i) for i in range(300)))
    trace_ids = [response.headers[TRACE_HEADER] for _, response in results]
    assert len(set(trace_ids)) == 300
    for i, response in results:
        if i % 4 in (0, 1):
            assert response.json()["span_trace_id"] == response.headers[TRACE_HEADER]
        elif i % 4 == 2:
            last = [block for block in response.text.split("\n\n") if block][-1]
            assert json.loads(last.split("data: ", 1)[1])["trace_id"] == response.headers[TRACE_HEADER]
        else:
            assert response.status_code == 404

    for i, response in results:
        trace = get_trace(response.headers[TRACE_HEADER])
        root = root_span(trace)
        if i % 4 == 3:
            assert root.inputs == {"method": "GET", "path": "/missing"} and root.outputs["status_code"] == 404
        else:
            assert root.inputs["body"] == {"message": f"m{i}" if i % 4 != 2 else f"m{i} w{i}"}
            assert f"m{i}" in json.dumps(root.outputs["body"])

    # Every trace ended and was handed over: MLflow's in-progress buffer and ours are empty again.
    buffer = InMemoryTraceManager.get_instance()._traces
    assert not [trace_id for trace_id in trace_ids if trace_id in buffer]
    stack: Any = app.middleware_stack
    while stack.__class__.__name__ != "MlflowFeedbackMiddleware":
        stack = stack.app
    assert not stack.recent._open
    assert threading.active_count() <= threads_after_first_round  # bounded pools, not a thread per request
    assert stack.status()["traces_dropped"] == 0  # MLflow's default queue absorbed a burst of 600


OVERFLOW_SCRIPT = "export_queue_overflow"  # tests/scripts/export_queue_overflow.py
# A queue of 4 tasks and one export thread: most of a 150-request burst overflows MLflow's export queue.
TINY_QUEUE = {"MLFLOW_ASYNC_TRACE_LOGGING_MAX_QUEUE_SIZE": "4", "MLFLOW_ASYNC_TRACE_LOGGING_MAX_WORKERS": "1"}


def test_export_queue_overflow_goes_to_the_spool(mlflow_server: MlflowServer, experiment_name: str) -> None:
    """MLflow's exporter drops what its full queue refuses. The middleware spools it instead and replays it
    at the server's pace: every trace of a burst far above the queue's size is stored, with its metadata and
    its spans, and nothing is counted as dropped."""
    out = run_script(OVERFLOW_SCRIPT, [experiment_name, "0"], {"MLFLOW_TRACKING_URI": mlflow_server.url} | TINY_QUEUE)
    health = out["health"]
    assert health["export_queue_overflow_spooled"] > 0, health
    assert health["traces_dropped"] == 0 and health["span_batches_dropped"] == 0, health
    assert health["trace_spool"]["spooled_traces_by_this_process"] > 0, health  # replayed by any process
    assert out["issued"] == out["stored_ok"] == out["with_metadata"] == 150, out
    assert out["unreadable"] == []


def test_export_queue_overflow_past_the_spool_budget_is_counted(
    mlflow_server: MlflowServer, experiment_name: str
) -> None:
    """With a spool too small for the burst, what neither MLflow's queue nor the spool can take is dropped
    and counted: every trace issued is stored or counted."""
    out = run_script(
        OVERFLOW_SCRIPT, [experiment_name, "20000"], {"MLFLOW_TRACKING_URI": mlflow_server.url} | TINY_QUEUE
    )
    health = out["health"]
    assert health["traces_dropped"] > 0 and health["export_failures"] == 0, health
    assert health["trace_spool"]["dropped_traces_by_this_process"] > 0, health
    assert out["issued"] == 150
    # No silent loss: every trace missing from MLflow is counted. (A trace whose final trace-info task
    # was dropped may still land from its spans, so the count can exceed the missing ones.)
    assert out["issued"] - out["stored_ok"] <= health["traces_dropped"]
    # Dropped span batches included: a trace info that landed has its spans readable somewhere.
    assert health["span_batches_dropped"] > 0 and out["unreadable"] == []


def test_lifespan_shutdown_delivers_queued_feedback(experiment_name: str) -> None:
    """Feedback queued (202) for a trace MLflow has not exported yet is delivered during shutdown."""
    app = build_app(experiment_name=experiment_name, feedback_sync_seconds=0)
    with UvicornThread(app) as server, httpx.Client(base_url=server.url) as client:
        trace_id = client.post("/chat", json={"message": "bye"}).headers[TRACE_HEADER]
        response = client.post(f"/feedback?trace_id={trace_id}", json={"is_correct": False, "comment": "late"})
        assert response.status_code == 202, response.text
    [assessment] = written(TracingClient(), trace_id, response.json()["feedback_id"])  # no waiting here
    assert assessment.value is False and assessment.rationale == "late"


NO_LIFESPAN_SCRIPT = "exit_without_lifespan"  # tests/scripts/exit_without_lifespan.py


def test_exit_without_lifespan_delivers_queued_feedback(mlflow_server: MlflowServer, experiment_name: str) -> None:
    out = run_script(NO_LIFESPAN_SCRIPT, [experiment_name], {"MLFLOW_TRACKING_URI": mlflow_server.url})
    assert out["status"] == 202
    [assessment] = written(TracingClient(), out["trace_id"], out["feedback_id"])  # no waiting here
    assert assessment.value is True
