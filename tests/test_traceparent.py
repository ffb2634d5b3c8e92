"""W3C traceparent: by default a caller's context is linked and the service stores a trace of its own;
with ``trust_traceparent=True`` a request from another MLflow-traced service continues the caller's trace.

Two processes, as in production: the caller (this test) opens its own MLflow trace and sends its
``traceparent``; the service (a uvicorn subprocess with the middleware) adds its spans to that trace.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import mlflow
import pytest
from mlflow.entities import MlflowExperimentLocation
from mlflow.tracing import get_tracing_context_headers_for_http_request

from mlflow_feedback_middleware._mlflow.distributed import valid_traceparent
from mlflow_feedback_middleware._mlflow.tracing import find_experiment

from .apps import build_app
from .support import AppProcess, MlflowServer, client_for, get_trace, root_span, wait_until

TRACE_HEADER = "x-mlflow-trace-id"


def test_traceparent_values_are_validated() -> None:
    good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert valid_traceparent(good) == good
    assert valid_traceparent(" " + good.upper() + " ") == good
    for bad in (
        None,
        "",
        "garbage",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # all-zero trace ID
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # all-zero span ID
        "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # unknown version
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\nX: y",
    ):
        assert valid_traceparent(bad) is None, bad


def test_a_request_with_traceparent_continues_the_callers_trace(
    mlflow_server: MlflowServer, experiment_name: str, tmp_path: Path
) -> None:
    experiment_id = find_experiment(mlflow_server.url, experiment_name, None, create=True)
    env = {"MLFLOW_TRACKING_URI": mlflow_server.url, "MLFLOW_ASYNC_TRACE_LOGGING_MAX_INTERVAL_MILLIS": "500"}
    kwargs = {"experiment_name": experiment_name, "outbox_path": str(tmp_path / "outbox.db"), "trust_traceparent": True}
    with AppProcess(tmp_path, env, kwargs) as app:
        location = MlflowExperimentLocation(experiment_id=experiment_id)
        with mlflow.start_span("caller: plan the answer", trace_destination=location) as caller:
            headers = get_tracing_context_headers_for_http_request()
            continued = httpx.post(f"{app.url}/chat", json={"message": "from upstream"}, headers=headers, timeout=30)
        unrelated = httpx.post(
            f"{app.url}/chat",
            json={"message": "bad header"},
            headers={"traceparent": "00-00000000000000000000000000000000-00f067aa0ba902b7-01"},
            timeout=30,
        )
        assert continued.status_code == 200 and unrelated.status_code == 200
        assert continued.headers[TRACE_HEADER] == caller.trace_id  # the same distributed trace
        assert unrelated.headers[TRACE_HEADER] != caller.trace_id  # an invalid header is ignored
        assert continued.json()["span_trace_id"] == caller.trace_id  # handler spans join it too

        def spans() -> list[Any] | None:
            found = get_trace(caller.trace_id).data.spans
            return found if len(found) >= 3 else None

        stored = wait_until(spans, 60, "the service's spans did not join the caller's trace")
        by_name = {s.name: s for s in stored}
        service_root = by_name["POST /chat"]
        assert service_root.parent_id == caller.span_id
        assert by_name["fake_llm_async"].parent_id == service_root.span_id
        assert service_root.inputs["body"] == {"message": "from upstream"}

        feedback = httpx.post(f"{app.url}/feedback?trace_id={caller.trace_id}", json={"is_correct": True}, timeout=60)
        assert feedback.status_code in (200, 202), feedback.text
        wait_until(
            lambda: any(a.name == "user_feedback" for a in get_trace(caller.trace_id).info.assessments),
            60,
            "feedback on the continued trace did not land",
        )
        get_trace(unrelated.headers[TRACE_HEADER])  # the other request got a trace of its own


@pytest.mark.anyio
async def test_a_continuation_mlflow_refuses_still_answers_with_a_trace_of_its_own(
    experiment_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow_feedback_middleware._mlflow.distributed as distributed

    def broken(*args: Any, **kwargs: Any) -> None:
        raise TypeError("MLflow's TraceInfo changed")

    monkeypatch.setattr(distributed, "TraceInfo", broken)
    caller = "4bf92f3577b34da6a3ce929d0e0e4736"
    async with client_for(build_app(experiment_name=experiment_name, trust_traceparent=True)) as client:
        response = await client.post(
            "/chat", json={"message": "hi"}, headers={"traceparent": f"00-{caller}-00f067aa0ba902b7-01"}
        )
    assert response.status_code == 200
    assert response.headers[TRACE_HEADER] != f"tr-{caller}"
    assert root_span(get_trace(response.headers[TRACE_HEADER])).name == "POST /chat"


GATEWAY_TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.mark.anyio
async def test_a_gateways_traceparent_links_the_caller_and_the_request_gets_a_stored_trace(
    experiment_name: str,
) -> None:
    """An OpenTelemetry gateway (Envoy, an ingress) exports no MLflow trace: continuing its trace would leave
    this request's spans in a trace that never becomes readable."""
    async with client_for(build_app(experiment_name=experiment_name, feedback_wait_seconds=0)) as client:
        response = await client.post("/chat", json={"message": "hi"}, headers={"traceparent": GATEWAY_TRACEPARENT})
        trace_id = response.headers[TRACE_HEADER]
        assert trace_id != "tr-0af7651916cd43dd8448eb211c80319c"
        trace = get_trace(trace_id)  # readable: not "span data is corrupted"
        root = root_span(trace)
        assert root.parent_id is None and root.name == "POST /chat"
        assert root.attributes["http.request.header.traceparent"] == [GATEWAY_TRACEPARENT]
        assert trace.info.tags["mlflow_feedback.caller_trace_id"] == "tr-0af7651916cd43dd8448eb211c80319c"
        feedback = await client.post(f"/feedback?trace_id={trace_id}", json={"is_correct": True})
        assert feedback.status_code in (200, 202), feedback.text


@pytest.mark.anyio
async def test_a_forged_traceparent_cannot_take_over_another_experiments_trace(
    mlflow_server: MlflowServer, experiment_name: str
) -> None:
    """The attack of the security review: a traceparent naming a trace in another experiment. By default it
    is only a link: the request gets its own trace, feedback on the named trace is 404, and the victim's
    trace stays whole, in its own experiment."""
    from mlflow.tracing.client import TracingClient

    victim_experiment = find_experiment(mlflow_server.url, experiment_name + "-victim", None, create=True)
    with mlflow.start_span("victim", trace_destination=MlflowExperimentLocation(victim_experiment)) as victim:
        pass
    get_trace(victim.trace_id)
    forged = {"traceparent": f"00-{victim.trace_id[3:]}-00000000000000aa-01"}
    async with client_for(build_app(experiment_name=experiment_name, feedback_wait_seconds=0)) as client:
        response = await client.post("/chat", json={"message": "mine"}, headers=forged)
        own = response.headers[TRACE_HEADER]
        assert own != victim.trace_id
        get_trace(own)
        by_id = await client.post(f"/feedback?trace_id={victim.trace_id}", json={"is_correct": False})
        by_request = await client.post(
            f"/feedback?client_request_id={response.headers['x-request-id']}", json={"is_correct": False}
        )
    assert by_id.status_code == 404, by_id.text
    assert by_request.status_code in (200, 202) and by_request.json()["trace_id"] == own  # its own trace
    stored = TracingClient().get_trace_info(victim.trace_id)
    assert stored.experiment_id == victim_experiment
    assert not stored.assessments
    assert [s.name for s in mlflow.get_trace(victim.trace_id).data.spans] == ["victim"]
