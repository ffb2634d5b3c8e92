"""The default export path: MLflow's own exporter with the fast trace-info client, checked for stored facts."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import mlflow
import pytest
from google.protobuf import json_format
from mlflow.entities import TraceInfo, TraceState
from mlflow.entities.assessment import AssessmentSource, Feedback
from mlflow.entities.trace_location import TraceLocation
from mlflow.protos.service_pb2 import StartTraceV3
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mlflow_feedback_middleware._mlflow.export import flush_exports
from mlflow_feedback_middleware._mlflow.trace_info_client import FastTraceInfoClient, _proto_body, start_trace_body

from .apps import build_app
from .support import MlflowServer, UvicornThread, client_for, get_trace, root_span, run_script, wait_until

TRACE_HEADER = "x-mlflow-trace-id"


def trace_info(**fields: object) -> TraceInfo:
    values: dict[str, object] = {
        "trace_id": f"tr-{uuid.uuid4().hex}",
        "trace_location": TraceLocation.from_experiment_id("7"),
        "request_time": 1_764_500_000_123,
        "state": TraceState.OK,
        "execution_duration": 5,
        "client_request_id": "req-1",
        "request_preview": '{"message": "grüß dich \\u2603"}',
        "response_preview": '{"response": "ok"}',
        "trace_metadata": {"mlflow.trace.user": "alice", "long": "x" * 300_000, "number": 5},
        "tags": {"mlflow.traceName": "POST /chat", "app.topic": "billing", "k" * 300: "v" * 10_000},
    }
    values.update(fields)
    return TraceInfo(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "info",
    [
        trace_info(),
        trace_info(client_request_id=None, execution_duration=None, request_preview=None, response_preview=None),
        trace_info(request_time=1_000_000_000_000, execution_duration=123_456, state=TraceState.ERROR),
        trace_info(execution_duration=0, trace_metadata={}, tags={}),
        trace_info(
            assessments=[Feedback(name="x", value=True, source=AssessmentSource("HUMAN", "u"), trace_id="tr-1")]
        ),
    ],
)
def test_the_fast_body_is_what_mlflows_client_sends(info: TraceInfo) -> None:
    """Same protobuf message as MLflow's own conversion, truncation of long metadata and tags included."""
    ours = json_format.Parse(start_trace_body(info), StartTraceV3())
    mlflows = json_format.Parse(_proto_body(info), StartTraceV3())
    assert ours == mlflows


def fast_client() -> FastTraceInfoClient:
    from mlflow.tracing.provider import _get_trace_exporter

    client = _get_trace_exporter()._client
    assert isinstance(client, FastTraceInfoClient), type(client)
    return client


@pytest.mark.anyio
async def test_default_export_stores_complete_traces_on_the_fast_path(
    mlflow_server: MlflowServer, experiment_name: str
) -> None:
    app = build_app(experiment_name=experiment_name)
    async with client_for(app) as client:
        first = await client.post(
            "/chat-tagged",
            json={"message": "hello"},
            headers={"X-Request-ID": "fast-req-1", "X-User-ID": "alice", "X-Session-ID": "s-1"},
        )
        before = (fast_client().fast_calls, fast_client().delegated_calls)
        responses = [await client.post("/chat", json={"message": f"m{i}"}) for i in range(5)]
    flush_exports(30)
    after = (fast_client().fast_calls, fast_client().delegated_calls)
    assert after[0] - before[0] >= 5 and after[1] == before[1], (before, after)

    # The info and the spans land in separate calls, in either order; the spans' call tags their location.
    trace = wait_until(
        lambda: (t := get_trace(first.headers[TRACE_HEADER])).info.tags.get("mlflow.trace.spansLocation") and t,
        30,
        "the trace's spans location tagged",
    )
    info = trace.info
    assert info.client_request_id == "fast-req-1"  # the column, searchable as trace.client_request_id
    assert info.trace_metadata["mlflow.trace.user"] == "alice"
    assert info.trace_metadata["mlflow.trace.session"] == "s-1"
    assert int(info.trace_metadata["mlflow.trace.sizeBytes"]) > 0
    assert info.tags["app.topic"] == "billing"
    assert info.tags["mlflow.traceName"] == "POST /chat-tagged"
    assert info.tags["mlflow.trace.spansLocation"] == "TRACKING_STORE"
    assert info.state.value == "OK" and info.execution_duration is not None
    assert info.request_preview and "hello" in info.request_preview
    assert info.response_preview and "echo: hello" in info.response_preview
    assert root_span(trace).outputs["body"]["response"] == "echo: hello"
    assert [span.name for span in trace.data.spans if span.parent_id] == ["fake_llm_async"]
    found = mlflow.search_traces(
        locations=[info.experiment_id], filter_string="trace.client_request_id = 'fast-req-1'", return_type="list"
    )
    assert [t.info.trace_id for t in found] == [info.trace_id]
    for response in responses:
        assert get_trace(response.headers[TRACE_HEADER]).info.client_request_id == response.headers["x-request-id"]
    # The spans went to the tracking store only: no second copy uploaded as an artifact.
    uploaded = list(Path(mlflow_server.workdir, "artifacts", info.experiment_id).rglob("traces.json"))
    assert uploaded == []


@pytest.mark.anyio
async def test_a_traces_info_is_stored_before_its_spans(
    mlflow_server: MlflowServer, experiment_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow's exporter sends a trace's spans and its info at once; the span upload that lands first creates
    the trace's row and the info upsert then takes the tracking server's costliest path (a failed insert,
    a rollback and a merge: twice the server's CPU per trace on PostgreSQL, `make bench-ingest`). The fast
    client holds a trace's spans until its info is stored."""
    app = build_app(experiment_name=experiment_name)
    async with client_for(app) as client:
        await client.post("/chat", json={"message": "warm-up"})  # the server stores spans: holding starts
        flush_exports(30)
        fast = fast_client()
        uploads: list[tuple[str, bool]] = []  # (trace ID, its info stored when its spans were uploaded)
        upload = fast._delegate.log_spans

        def recorded(location: str, spans: list[Any]) -> Any:
            for span in spans:
                uploads.append((span.trace_id, span.trace_id in fast._stored_infos))
            return upload(location, spans)

        monkeypatch.setattr(fast._delegate, "log_spans", recorded)
        responses = await asyncio.gather(*(client.post("/chat", json={"message": f"m{i}"}) for i in range(20)))
        flush_exports(30)
    trace_ids = {response.headers[TRACE_HEADER] for response in responses}
    assert {trace_id for trace_id, _ in uploads} == trace_ids
    assert [trace_id for trace_id, info_first in uploads if not info_first] == []
    assert fast._held == {} and fast._held_spans == 0
    for trace_id in trace_ids:
        trace = get_trace(trace_id)
        assert [span.name for span in trace.data.spans if span.parent_id] == ["fake_llm_async"]
        assert trace.info.tags["mlflow.trace.spansLocation"] == "TRACKING_STORE"


@pytest.mark.anyio
async def test_the_fast_path_survives_the_server_closing_idle_connections(experiment_name: str) -> None:
    """The tracking server drops kept-alive connections after a few idle seconds; the next trace still
    goes on the fast path (one resend on a fresh connection), not through MLflow's client."""
    app = build_app(experiment_name=experiment_name)
    async with client_for(app) as client:
        first = await client.post("/chat", json={"message": "before"})
        flush_exports(30)
        before = (fast_client().fast_calls, fast_client().delegated_calls)
        time.sleep(7)  # uvicorn's keep-alive timeout is 5 s
        second = await client.post("/chat", json={"message": "after"})
    flush_exports(30)
    assert fast_client().fast_calls > before[0]
    assert fast_client().delegated_calls == before[1]
    for response in (first, second):
        assert get_trace(response.headers[TRACE_HEADER]).info.client_request_id == response.headers["x-request-id"]


AUTH_SCRIPT = "export_with_basic_auth"  # tests/scripts/export_with_basic_auth.py


def test_the_fast_path_sends_the_tracking_servers_credentials(tmp_path: Path) -> None:
    """Against a server with MLflow's basic-auth app: MLFLOW_TRACKING_USERNAME/PASSWORD reach the fast
    path's requests (a refused call would have gone to MLflow's client and been counted as delegated)."""
    password = f"pw-{uuid.uuid4().hex}"
    server_env = {"MLFLOW_AUTH_ADMIN_PASSWORD": password, "MLFLOW_FLASK_SERVER_SECRET_KEY": uuid.uuid4().hex}
    server = MlflowServer(tmp_path, app_name="basic-auth", env=server_env)
    server.start()
    try:
        anonymous = httpx.post(f"{server.url}/api/3.0/mlflow/traces", json={}, timeout=10)
        out = run_script(
            AUTH_SCRIPT, [server.url], {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": password}
        )
    finally:
        server.stop()
    assert anonymous.status_code == 401  # the server does check
    assert out == {"client": "FastTraceInfoClient", "fast": 3, "delegated": 0, "stored": [True, True, True]}


DROPPED_SPANS_SCRIPT = "export_dropped_spans"  # tests/scripts/export_dropped_spans.py


def test_a_trace_whose_span_batch_was_dropped_keeps_mlflows_artifact_copy(
    mlflow_server: MlflowServer, experiment_name: str
) -> None:
    """The fast client skips MLflow's artifact upload only when the spans went to the tracking store: a
    trace whose span batch was dropped keeps the upload, its only copy of the spans."""
    out = run_script(DROPPED_SPANS_SCRIPT, [experiment_name], {"MLFLOW_TRACKING_URI": mlflow_server.url})
    assert out["dropped"] >= 1 and out["remembered"] is True
    assert out["spans"] == ["POST /chat", "fake_llm_async"]


REBUILT_PROVIDER_SCRIPT = "export_after_provider_rebuild"  # tests/scripts/export_after_provider_rebuild.py


def test_the_fast_path_and_the_loss_counters_survive_mlflow_rebuilding_its_exporter(
    mlflow_server: MlflowServer, experiment_name: str
) -> None:
    """`mlflow.set_experiment` and `mlflow.set_tracking_uri` reset MLflow's tracer provider, which builds a new
    exporter; the middleware hooks the new one at the next request (the fast trace-info client, which also
    orders a trace's info before its spans, and the loss counters), rather than losing both silently."""
    out = run_script(REBUILT_PROVIDER_SCRIPT, [experiment_name], {"MLFLOW_TRACKING_URI": mlflow_server.url})
    rounds = out["rounds"]
    assert len({r["id"] for r in rounds}) == 3, rounds  # MLflow did build a new exporter each time
    assert all(r["fast"] and r["fast_calls"] >= 1 and r["counting"] for r in rounds), rounds
    assert out["stored"] == [True, True, True] and out["watching"] is True


SLOW_VERSION_SCRIPT = "export_after_a_slow_version_answer"  # tests/scripts/export_after_a_slow_version_answer.py


def slow_version(upstream: str, seen: list[str], slow: int) -> Starlette:
    """A reverse proxy to the tracking server at `upstream` whose first `slow` /version answers take 4 s: past
    the 3 s MLflow's client waits for one before it gives up (as a busy basic-auth server on a loaded machine
    does: it checks the password on every call)."""
    client = httpx.AsyncClient(base_url=upstream, timeout=120)
    dropped = {"host", "content-length", "content-encoding", "transfer-encoding", "connection"}

    async def forward(request: Request) -> Response:
        seen.append(request.url.path)
        body = await request.body()  # before a client that gave up has gone
        if request.url.path == "/version" and seen.count("/version") <= slow:
            await asyncio.sleep(4)
        answer = await client.request(
            request.method,
            request.url.path,
            params=request.query_params,
            content=body,
            headers={k: v for k, v in request.headers.items() if k not in dropped},
        )
        headers = {k: v for k, v in answer.headers.items() if k not in dropped}
        return Response(answer.content, status_code=answer.status_code, headers=headers)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with client:  # closed on the server's loop, before it ends
            yield

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)], lifespan=lifespan)


@pytest.mark.parametrize(
    ("slow", "failed"),
    [
        (1, 0),  # MLflow's lookup; the middleware's own question is answered, and MLflow's client asks again
        (3, 1),  # and MLflow's second lookup too: the batch waits in the spool, whose replay asks once more
    ],
)
def test_slow_version_answers_do_not_send_spans_to_artifacts_for_good(
    mlflow_server: MlflowServer, experiment_name: str, slow: int, failed: int
) -> None:
    """MLflow's client asks the server's version before its first span upload, caches a failed answer for the
    process and then calls span logging "not supported": its exporter would upload every later trace as an
    artifact (the costly path), and the batch in hand would be lost (seen in CI under load, against a
    basic-auth server). The middleware asks the server itself, and a server that stores spans gets them."""
    seen: list[str] = []
    with UvicornThread(slow_version(mlflow_server.url, seen, slow)) as proxy:
        out = run_script(SLOW_VERSION_SCRIPT, [experiment_name], {"MLFLOW_TRACKING_URI": proxy.url})
    assert out["logs_spans"] is True
    assert seen.count("/version") >= slow + 1, seen  # the slow answers, then one in time
    assert out["failures"] == failed  # a failed batch went to the spool, which the script saw emptied
    for trace_id in out["trace_ids"]:
        trace = wait_until(
            lambda t=trace_id: (trace := get_trace(t)).info.tags.get("mlflow.trace.spansLocation") and trace,
            60,
            f"trace {trace_id}'s spans location tagged",
        )
        assert trace.info.tags["mlflow.trace.spansLocation"] == "TRACKING_STORE"
        assert [span.name for span in trace.data.spans] == ["POST /chat", "fake_llm_async"]  # none lost


MISSING_INTERNAL_SCRIPT = "export_without_an_internal"  # tests/scripts/export_without_an_internal.py


def test_a_missing_mlflow_internal_falls_back_to_mlflows_client_with_one_warning(
    mlflow_server: MlflowServer, experiment_name: str
) -> None:
    """Where an MLflow internal the fast trace-info client mirrors is gone (another MLflow version), the
    package still imports, MLflow's own client sends every trace info, and one warning names the version."""
    out = run_script(MISSING_INTERNAL_SCRIPT, [experiment_name], {"MLFLOW_TRACKING_URI": mlflow_server.url})
    assert out["client"] != "FastTraceInfoClient" and out["stored"] == [True, True]
    [warning] = out["warnings"]
    assert mlflow.__version__ in warning and "StartTraceV3" in warning


MOVED_CLIENT_SCRIPT = "startup_without_the_experiment_client"  # tests/scripts/startup_without_the_experiment_client.py


def test_a_moved_mlflow_client_is_reported_as_an_api_change_not_an_outage(
    mlflow_server: MlflowServer, experiment_name: str
) -> None:
    """If MLflow moves the client the middleware finds experiments with, the service answers untraced and
    says why once; it does not call a healthy server unreachable and retry forever."""
    out = run_script(MOVED_CLIENT_SCRIPT, [experiment_name], {"MLFLOW_TRACKING_URI": mlflow_server.url})
    assert out["status"] == 200 and out["traced"] is False
    [error] = [e for e in out["errors"] if "DISABLED" in e]
    assert "MLflow API changed" in error and "TrackingServiceClient" in error and "unreachable" not in error
