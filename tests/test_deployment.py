"""Deployment behaviour: several workers sharing one outbox file, votes reaching the worker that did not
answer before MLflow has the trace, and votes whose trace lands after they were given up on."""

from __future__ import annotations

import os
import signal
import stat
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from mlflow.tracing.client import TracingClient

from mlflow_feedback_middleware import MlflowFeedbackMiddleware, RateLimit
from mlflow_feedback_middleware._mlflow.tracing import find_experiment
from mlflow_feedback_middleware.delivery.writer import FEEDBACK_ID_KEY

from .apps import build_app
from .support import AppProcess, MlflowServer, PostgresCluster, client_for, get_trace, wait_until
from .test_no_loss import outbox_health
from .test_security import SECRET, TOKEN_HEADER

TRACE_HEADER = "x-mlflow-trace-id"


def _stream_in_background(url: str) -> tuple[httpx.Headers, threading.Thread]:
    """Start a 20 s streamed answer (its trace reaches MLflow only when it ends); its headers."""
    ready, box = threading.Event(), {}

    def read() -> None:
        with httpx.stream("GET", f"{url}/slow-stream", timeout=120) as response:
            box["headers"] = response.headers
            ready.set()
            for _ in response.iter_bytes():
                pass

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    assert ready.wait(30), "the stream did not start"
    return box["headers"], thread


def test_a_vote_on_the_other_worker_waits_for_a_trace_exported_late(
    tmp_path: Path, mlflow_server: MlflowServer, experiment_name: str
) -> None:
    """Worker A answers with a 20 s stream: MLflow gets the trace when it ends. Worker B gets the votes at
    once, by trace ID and by request ID, and knows from the shared outbox that A issued the trace: it answers
    202 and delivers once the trace lands, instead of giving up after `feedback_wait_seconds` (404)."""
    outbox = str(tmp_path / "outbox.db")
    common = {"experiment_name": experiment_name, "outbox_path": outbox, "feedback_wait_seconds": 3}
    env = {"MLFLOW_TRACKING_URI": mlflow_server.url}
    with AppProcess(tmp_path, env, common) as a, AppProcess(tmp_path, env, common) as b:
        votes, streams = [], []
        for by in ("trace_id", "client_request_id"):
            headers, stream = _stream_in_background(a.url)
            streams.append(stream)
            key = headers[TRACE_HEADER] if by == "trace_id" else headers["x-request-id"]
            vote = httpx.post(f"{b.url}/feedback?{by}={key}", json={"is_correct": True}, timeout=60)
            assert vote.status_code == 202, vote.text  # vouched for by A's record: accepted, not 404
            votes.append((headers[TRACE_HEADER], vote.json()["feedback_id"]))
        for stream in streams:
            stream.join(120)
        wait_until(lambda: outbox_health(b)["outbox"]["pending"] == 0, 120, "the votes were delivered")
    for trace_id, feedback_id in votes:
        assessments = get_trace(trace_id).info.assessments
        assert [a.name for a in assessments] == ["user_feedback"]
        assert assessments[0].metadata["mlflow_feedback.feedback_id"] == feedback_id + "/0"


def stored_trace(client: TracingClient, trace_id: str) -> Any:
    """The trace with its request's root span, once the tracking server has both; else None."""
    try:
        trace = client.get_trace(trace_id)
    except Exception:
        return None
    return trace if trace is not None and any(span.name == "POST /chat" for span in trace.data.spans) else None


def _middleware(app: Any) -> MlflowFeedbackMiddleware:
    layer = app.middleware_stack
    while not isinstance(layer, MlflowFeedbackMiddleware):
        layer = layer.app
    return layer


@pytest.mark.anyio
async def test_a_vote_given_up_on_is_delivered_when_its_trace_lands_late(experiment_name: str) -> None:
    """With no wait at all, a vote on a trace MLflow does not have yet fails ("trace not found after 0 s");
    the re-check finds the trace later and delivers the vote, and the health route says it did."""
    app = build_app(experiment_name=experiment_name, trace_wait_seconds=0, feedback_sync_seconds=0)
    async with client_for(app) as client:
        trace_id = (await client.post("/chat", json={"message": "hi"})).headers[TRACE_HEADER]
        vote = await client.post(f"/feedback?trace_id={trace_id}", json={"is_correct": False})
        assert vote.status_code == 202
        status_url = vote.json()["status_url"]
        wait_until(lambda: _state(app, status_url) == "failed", 60, "the vote was given up on")
        get_trace(trace_id)  # the trace lands
        delivery = _middleware(app).delivery
        assert delivery.recheck_failed() == 1
        delivery.wake()
        wait_until(lambda: _state(app, status_url) == "delivered", 60, "the vote was delivered")
        health = (await client.get("/feedback/health")).json()
    assert health["outbox"]["revived_by_this_process"] == 1
    assert [a.value for a in get_trace(trace_id).info.assessments] == [False]


def _state(app: Any, status_url: str) -> str:
    item = _middleware(app).delivery.outbox.get(status_url.rsplit("/", 1)[1])
    return item.state if item else "missing"


@pytest.mark.anyio
async def test_behind_one_proxy_address_each_answer_has_its_own_rate_limit(experiment_name: str) -> None:
    """Every request comes from the proxy's address: keyed by IP, one user's clicks would use up everyone's
    budget. Keyed by the answer's token, each user keeps theirs; an attacker's forged X-Forwarded-For counts
    only from a trusted proxy."""
    limit = RateLimit(per_second=0.01, burst=2, trusted_proxies=("127.0.0.0/8",))
    app = build_app(experiment_name=experiment_name, feedback_secret=SECRET, rate_limit=limit)
    async with client_for(app) as client:  # the ASGI client's address is 127.0.0.1: "the proxy"
        tokens = [(await client.post("/chat", json={"message": "hi"})).headers[TOKEN_HEADER] for _ in range(3)]
        statuses = [
            (await client.post("/feedback", json={"is_correct": True}, headers={TOKEN_HEADER: token})).status_code
            for token in tokens
            for _ in range(2)
        ]
        assert all(s in (200, 202) for s in statuses), statuses  # three users, two votes each: none throttled
        again = await client.post("/feedback", json={"is_correct": True}, headers={TOKEN_HEADER: tokens[0]})
        assert again.status_code == 429  # but each answer's own budget holds
        forwarded = [
            (await client.get("/feedback/schema", headers={"x-forwarded-for": f"203.0.113.{i % 2}"})).status_code
            for i in range(4)
        ]
    assert forwarded == [200, 200, 200, 200]  # two clients behind the trusted proxy, two reads each


def test_forwarded_addresses_count_only_from_trusted_proxies() -> None:
    from starlette.requests import HTTPConnection

    def conn(peer: str, forwarded: str) -> HTTPConnection:
        headers = [(b"x-forwarded-for", forwarded.encode())]
        return HTTPConnection({"type": "http", "client": (peer, 1), "headers": headers})

    trusting = RateLimit(trusted_proxies=("10.0.0.0/8",))
    assert trusting.address(conn("10.1.2.3", "198.51.100.7, 10.9.9.9")) == "198.51.100.7"
    assert trusting.address(conn("198.51.100.8", "1.2.3.4")) == "198.51.100.8"  # not a trusted proxy: ignored
    assert RateLimit().address(conn("10.1.2.3", "1.2.3.4")) == "10.1.2.3"  # nobody trusted by default
    with pytest.raises(ValueError, match="trusted_proxies"):
        RateLimit(trusted_proxies=("not-an-address",))


def test_traces_served_during_an_outage_and_a_restart_are_spooled_then_stored(tmp_path: Path) -> None:
    """The tracking server goes away; the app keeps answering (with trace IDs). MLflow's exporter would drop
    those traces; they are spooled beside the outbox instead, counted as export failures, and the app is
    restarted (SIGTERM) in the middle of it. When the server is back, the new process replays the spool:
    every trace served is stored, with its spans."""
    (tmp_path / "server").mkdir()
    server = MlflowServer(tmp_path / "server")
    server.start()
    kwargs = {"experiment_name": "outage", "outbox_path": str(tmp_path / "outbox.db"), "shutdown_timeout_seconds": 5}
    env = {"MLFLOW_TRACKING_URI": server.url}
    served: list[str] = []
    try:
        with AppProcess(tmp_path, env, kwargs) as app:
            served += [httpx.post(f"{app.url}/chat", json={"message": "before"}, timeout=30).headers[TRACE_HEADER]]
            server.stop()
            for _ in range(6):
                answer = httpx.post(f"{app.url}/chat", json={"message": "during"}, timeout=30)
                served.append(answer.headers[TRACE_HEADER])

            def spooled() -> dict[str, Any] | None:
                health = outbox_health(app)
                return health if (health["trace_spool"] or {}).get("spooled_traces_by_this_process", 0) >= 6 else None

            health = wait_until(spooled, 60, "the traces were spooled")
            assert health["export_failures"] >= 6  # counted, not only logged
        server.start()  # same port, same store
        with AppProcess(tmp_path, env, kwargs) as restarted:
            wait_until(lambda: outbox_health(restarted)["trace_spool"]["pending_parts"] == 0, 90, "the spool drained")
        client = TracingClient(tracking_uri=server.url)
        for trace_id in served:
            wait_until(lambda trace_id=trace_id: stored_trace(client, trace_id), 60, f"trace {trace_id} is stored")
    finally:
        server.stop()


def test_the_spool_is_bounded_and_counts_what_it_drops(tmp_path: Path) -> None:
    from mlflow.entities import TraceInfo, TraceLocation, TraceState

    from mlflow_feedback_middleware._mlflow.trace_spool import TraceSpool

    spool = TraceSpool(str(tmp_path / "spool.db"), max_bytes=2_000)
    location, metadata = TraceLocation.from_experiment_id("1"), {"x": "y" * 300}
    infos = [TraceInfo(f"tr-{i:032x}", location, 0, TraceState.OK, trace_metadata=metadata) for i in range(10)]
    kept = [spool.add_info(info) for info in infos]
    stats = spool.stats()
    assert 0 < sum(kept) < 10
    assert stats["spooled_traces_by_this_process"] == sum(kept)
    assert stats["dropped_traces_by_this_process"] == 10 - sum(kept)
    assert stats["bytes"] <= 2_000
    assert stat.S_IMODE(os.stat(tmp_path / "spool.db").st_mode) == 0o600


def test_two_workers_on_a_postgres_server_lose_nothing_across_a_server_kill_and_an_app_restart(
    tmp_path: Path,
) -> None:
    """The deployment of the issue: MLflow's server on PostgreSQL with 4 workers, the app under uvicorn with
    2 workers sharing one outbox. Answers and votes go through fresh connections (so through both workers),
    before, during and after a SIGKILL of the tracking server; then the app is restarted (SIGTERM). Every
    served trace is stored, every accepted vote exactly once."""
    (tmp_path / "server").mkdir()
    postgres = PostgresCluster().start()
    server = MlflowServer(tmp_path / "server", backend_store_uri=postgres.uri, workers=4)
    kwargs = {
        "experiment_name": "deployment",
        "outbox_path": str(tmp_path / "outbox.db"),
        "shutdown_timeout_seconds": 10,
    }
    served: list[str] = []
    votes: list[tuple[str, str]] = []

    def serve_and_vote(app: AppProcess, count: int) -> None:
        for i in range(count):
            answer = httpx.post(f"{app.url}/chat", json={"message": f"question {i}"}, timeout=60)
            served.append(answer.headers[TRACE_HEADER])
            vote = httpx.post(f"{app.url}/feedback?trace_id={served[-1]}", json={"is_correct": i % 2 == 0}, timeout=60)
            assert vote.status_code in (200, 202), vote.text
            votes.append((served[-1], vote.json()["feedback_id"]))

    try:
        server.start(timeout=240)
        # As the README recommends beside the outbox and the spool: MLflow's client retrying one upload for
        # minutes only holds an export thread (and the process at exit); a failed one is spooled anyway.
        env = {
            "MLFLOW_TRACKING_URI": server.url,
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
        }
        with AppProcess(tmp_path, env, kwargs, workers=2) as app:
            serve_and_vote(app, 20)
            server.stop(signal.SIGKILL)
            serve_and_vote(app, 10)  # answered, traced and accepted while the server is gone
            server.start(timeout=240)
            serve_and_vote(app, 10)
        with AppProcess(tmp_path, env, kwargs, workers=2) as restarted:

            def drained() -> bool:
                health = outbox_health(restarted)
                return health["outbox"]["pending"] == 0 and health["trace_spool"]["pending_parts"] == 0

            wait_until(drained, 240, "the outbox and the trace spool drained")
        client = TracingClient(tracking_uri=server.url)
        for trace_id, feedback_id in votes:
            trace = wait_until(
                lambda trace_id=trace_id: stored_trace(client, trace_id), 120, f"trace {trace_id} is stored"
            )
            mine = [
                a for a in trace.info.assessments if (a.metadata or {}).get(FEEDBACK_ID_KEY, "").startswith(feedback_id)
            ]
            assert len(mine) == 1, (trace_id, feedback_id, trace.info.assessments)
            assert [a.name for a in trace.info.assessments] == ["user_feedback"]  # nothing twice
        assert len(set(served)) == len(served) == 40
    finally:
        server.stop()
        postgres.stop()


@pytest.mark.parametrize("secret", [SECRET, None])
@pytest.mark.anyio
async def test_made_up_tokens_never_buy_a_fresh_rate_limit_bucket(experiment_name: str, secret: str | None) -> None:
    """Keyed by token only when the token is valid: a flood with a new invented token per request stays
    in the sender's IP bucket."""
    limit = RateLimit(per_second=0.01, burst=2)
    app = build_app(experiment_name=experiment_name, feedback_secret=secret, rate_limit=limit)
    async with client_for(app) as client:
        statuses = [
            (
                await client.post("/feedback", json={"is_correct": True}, headers={TOKEN_HEADER: f"v1.made-up-{i}.x"})
            ).status_code
            for i in range(4)
        ]
    assert statuses[2:] == [429, 429], statuses


def test_app_workers_starting_together_resolve_one_experiment(mlflow_server: MlflowServer) -> None:
    """Two app workers starting at once both find the experiment missing and create it; the server refuses
    the second (RESOURCE_ALREADY_EXISTS, a 400) and that worker reads the first one's ID."""
    for round_ in range(5):
        name = f"race-{uuid.uuid4().hex[:8]}-{round_}"
        barrier = threading.Barrier(4)

        def resolve(name: str = name, barrier: threading.Barrier = barrier) -> str:
            barrier.wait()
            return find_experiment(mlflow_server.url, name, None, create=True)

        with ThreadPoolExecutor(4) as pool:
            ids = {future.result() for future in [pool.submit(resolve) for _ in range(4)]}
        assert len(ids) == 1, ids
