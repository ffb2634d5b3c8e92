"""A trace per request, checked in the real tracking server: names, inputs, outputs, IDs, nesting, errors."""

from __future__ import annotations

import asyncio
import json

import httpx
import mlflow
import pytest

from .apps import build_app
from .support import UvicornThread, client_for, get_trace, root_span

pytestmark = pytest.mark.anyio

TRACE_HEADER = "x-mlflow-trace-id"
REQUEST_HEADER = "x-request-id"


def experiment_id_of(name: str) -> str:
    from mlflow.tracking._tracking_service.client import TrackingServiceClient

    experiment = TrackingServiceClient(mlflow.get_tracking_uri()).get_experiment_by_name(name)
    assert experiment is not None
    return str(experiment.experiment_id)


async def test_json_request_is_one_trace_with_inputs_outputs_and_ids(experiment_name: str) -> None:
    app = build_app(experiment_name=experiment_name)
    async with client_for(app) as client:
        response = await client.post(
            "/chat?lang=en",
            json={"message": "hello"},
            headers={"X-Request-ID": "req-abc_123", "X-User-ID": "alice", "X-Session-ID": "session-9"},
        )
    assert response.status_code == 200
    trace_id = response.headers[TRACE_HEADER]
    assert response.headers[REQUEST_HEADER] == "req-abc_123"

    trace = get_trace(trace_id)
    assert trace.info.experiment_id == experiment_id_of(experiment_name)
    assert trace.info.client_request_id == "req-abc_123"
    assert trace.info.trace_metadata["mlflow.trace.user"] == "alice"
    assert trace.info.trace_metadata["mlflow.trace.session"] == "session-9"
    assert trace.info.tags["mlflow.traceName"] == "POST /chat"
    assert trace.info.state.value == "OK"
    root = root_span(trace)
    assert root.name == "POST /chat"
    assert root.inputs == {"method": "POST", "path": "/chat", "query": {"lang": "en"}, "body": {"message": "hello"}}
    assert root.outputs["status_code"] == 200
    assert root.outputs["body"]["response"] == "echo: hello"
    assert root.attributes["http.route"] == "/chat"
    assert root.attributes["http.outcome"] == "completed"
    child = next(span for span in trace.data.spans if span.name == "fake_llm_async")
    assert child.parent_id == root.span_id


@pytest.mark.parametrize("path", ["/chat", "/chat-sync"])
async def test_handler_code_sees_the_request_trace(experiment_name: str, path: str) -> None:
    """Async handlers and sync ones in the threadpool both run inside the request's trace."""
    app = build_app(experiment_name=experiment_name)
    async with client_for(app) as client:
        response = await client.post(path, json={"message": "hi"})
    body = response.json()
    trace_id = response.headers[TRACE_HEADER]
    assert body["span_trace_id"] == body["helper_trace_id"] == body["state_trace_id"] == trace_id
    assert body["helper_request_id"] == response.headers[REQUEST_HEADER]
    trace = get_trace(trace_id)
    root = root_span(trace)
    llm = next(span for span in trace.data.spans if span.name.startswith("fake_llm"))
    assert llm.parent_id == root.span_id


async def test_route_template_names_the_trace(experiment_name: str) -> None:
    app = build_app(experiment_name=experiment_name)
    async with client_for(app) as client:
        response = await client.get("/items/42")
    trace = get_trace(response.headers[TRACE_HEADER])
    assert trace.info.tags["mlflow.traceName"] == "GET /items/{item_id}"
    assert root_span(trace).inputs["path"] == "/items/42"


@pytest.mark.parametrize(
    "incoming",
    ["", "has space", "x" * 51, "quote'd", "new\nline", "ünïcode", "-leading-dash"],
)
async def test_malformed_request_id_is_replaced(experiment_name: str, incoming: str) -> None:
    app = build_app(experiment_name=experiment_name)
    async with client_for(app) as client:
        headers = {"X-Request-ID": incoming.encode("utf-8")} if incoming else {}
        response = await client.get("/items/1", headers=headers)  # type: ignore[arg-type]
    generated = response.headers[REQUEST_HEADER]
    assert generated != incoming and len(generated) == 32
    assert get_trace(response.headers[TRACE_HEADER]).info.client_request_id == generated


async def test_concurrent_requests_never_share_a_trace(experiment_name: str) -> None:
    app = build_app(experiment_name=experiment_name)
    async with client_for(app) as client:
        responses = await asyncio.gather(
            *(
                client.post(
                    "/chat" if i % 2 else "/chat-sync", json={"message": f"m{i}"}, headers={"X-User-ID": f"u{i}"}
                )
                for i in range(60)
            )
        )
    trace_ids = [r.headers[TRACE_HEADER] for r in responses]
    assert len(set(trace_ids)) == 60
    for i, response in enumerate(responses):
        assert response.json()["span_trace_id"] == trace_ids[i]
    mlflow.flush_trace_async_logging()
    for i, trace_id in enumerate(trace_ids):
        trace = get_trace(trace_id)
        root = root_span(trace)
        assert root.inputs["body"] == {"message": f"m{i}"}
        assert root.outputs["body"]["response"] == f"echo: m{i}"
        assert trace.info.trace_metadata["mlflow.trace.user"] == f"u{i}"
        assert len(trace.data.spans) == 2


async def test_unhandled_error_answers_500_with_ids_and_no_detail(experiment_name: str) -> None:
    app = build_app(experiment_name=experiment_name)
    async with client_for(app) as client:
        with pytest.raises(RuntimeError, match="secret internal detail"):
            # ASGITransport re-raises app errors after the response, as a server would log them.
            await client.get("/boom")
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get("/boom")
    assert response.status_code == 500
    assert response.text == "Internal Server Error"
    assert "secret" not in response.text
    trace = get_trace(response.headers[TRACE_HEADER])
    assert response.headers[REQUEST_HEADER] == trace.info.client_request_id
    assert trace.info.state.value == "ERROR"
    root = root_span(trace)
    assert root.status.status_code.value == "ERROR"
    assert any(event.name == "exception" for event in root.events)
    assert trace.info.tags["http.outcome"] == "error"


async def test_custom_error_handler_is_left_in_charge(experiment_name: str) -> None:
    from fastapi.responses import JSONResponse

    app = build_app(experiment_name=experiment_name)

    @app.exception_handler(Exception)
    async def handler(request: object, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": "custom"}, status_code=500)

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get("/boom")
    assert response.status_code == 500
    assert response.json() == {"detail": "custom"}


async def test_wrapping_outside_keeps_ids_on_custom_error_responses(experiment_name: str) -> None:
    """Wrapped around the whole app, the middleware sees even ServerErrorMiddleware's answers."""
    from fastapi.responses import JSONResponse

    from mlflow_feedback_middleware import MlflowFeedbackMiddleware

    inner = build_app(feedback_path=None, exclude_paths=[r"."])  # the inner copy stays out of the way

    @inner.exception_handler(Exception)
    async def handler(request: object, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": "custom"}, status_code=500)

    app = MlflowFeedbackMiddleware(inner, experiment_name=experiment_name)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get("/boom")
        named = await client.get("/items/5")
    assert response.status_code == 500 and response.json() == {"detail": "custom"}
    assert get_trace(response.headers[TRACE_HEADER]).info.state.value == "ERROR"
    assert get_trace(named.headers[TRACE_HEADER]).info.tags["mlflow.traceName"] == "GET /items/{item_id}"


@pytest.mark.parametrize(("path", "state"), [("/unavailable", "ERROR"), ("/missing", "OK")])
async def test_http_errors_set_the_trace_state(experiment_name: str, path: str, state: str) -> None:
    app = build_app(experiment_name=experiment_name)
    async with client_for(app) as client:
        response = await client.get(path)
    trace = get_trace(response.headers[TRACE_HEADER])
    assert trace.info.state.value == state
    assert root_span(trace).outputs["status_code"] == response.status_code


async def test_excluded_paths_get_no_trace(experiment_name: str) -> None:
    app = build_app(experiment_name=experiment_name)
    async with client_for(app) as client:
        assert TRACE_HEADER not in (await client.get("/health")).headers
        assert TRACE_HEADER not in (await client.get("/openapi.json")).headers
        assert TRACE_HEADER in (await client.get("/items/1")).headers
    custom = build_app(experiment_name=experiment_name, exclude_paths=[r"^/items/"])
    async with client_for(custom) as client:
        assert TRACE_HEADER not in (await client.get("/items/1")).headers
        assert TRACE_HEADER in (await client.get("/health")).headers


async def test_lifespan_and_websocket_pass_through(experiment_name: str) -> None:
    app = build_app(experiment_name=experiment_name)

    async def drive(scope: dict[str, object], incoming: list[dict[str, object]]) -> list[dict[str, object]]:
        sent: list[dict[str, object]] = []
        queue = list(incoming)

        async def receive() -> dict[str, object]:
            return queue.pop(0)

        async def send(message: dict[str, object]) -> None:
            sent.append(message)

        await app(scope, receive, send)  # type: ignore[arg-type]
        return sent

    lifespan = await drive(
        {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},
        [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}],
    )
    assert [m["type"] for m in lifespan] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    ws_scope = {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "path": "/ws",
        "raw_path": b"/ws",
        "root_path": "",
        "scheme": "ws",
        "query_string": b"",
        "headers": [],
        "subprotocols": [],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
    }
    sent = await drive(
        ws_scope,
        [{"type": "websocket.connect"}, {"type": "websocket.receive", "text": "ping"}],
    )
    assert sent[0] == {"type": "websocket.accept", "subprotocol": None, "headers": []}
    assert sent[1]["type"] == "websocket.send" and sent[1]["text"] == "echo ping"


async def test_streamed_answer_is_inside_one_trace_with_final_event(experiment_name: str) -> None:
    app = build_app(experiment_name=experiment_name)
    async with client_for(app) as client:
        response = await client.post("/chat/stream", json={"message": "one two three"}, headers={"X-Request-ID": "r-1"})
    trace_id = response.headers[TRACE_HEADER]
    events = [block for block in response.text.split("\n\n") if block]
    assert events[:-1] == [
        f"data: {json.dumps({'type': 'token', 'content': word + ' '})}" for word in ("echo:", "one", "two", "three")
    ]
    assert events[-1] == (
        f'event: mlflow_trace\ndata: {{"type":"done","trace_id":"{trace_id}","client_request_id":"r-1"}}'
    )
    trace = get_trace(trace_id)
    root = root_span(trace)
    generate = next(span for span in trace.data.spans if span.name == "generate")
    assert generate.parent_id == root.span_id
    assert root.end_time_ns >= generate.end_time_ns
    # A stream in no LLM wire format reads as its text in MLflow, not as raw frames; the trace event is not in it.
    assert root.outputs["body"] == {"text": "echo: one two three ", "events": 4}


async def test_sync_generator_streams_inside_the_trace(experiment_name: str) -> None:
    app = build_app(experiment_name=experiment_name)
    async with client_for(app) as client:
        response = await client.get("/chat/stream-sync")
    first = json.loads(response.text.split("\n\n")[0].removeprefix("data: "))
    assert first["span_trace_id"] == response.headers[TRACE_HEADER]


async def test_sse_starlette_stream_gets_final_event_with_its_separator(experiment_name: str) -> None:
    app = build_app(experiment_name=experiment_name)
    async with client_for(app) as client:
        response = await client.get("/sse")
    trace_id = response.headers[TRACE_HEADER]
    assert response.text.startswith("event: token\r\ndata: part 0\r\n\r\n")
    assert response.text.endswith(
        "data: part 2\r\n\r\nevent: mlflow_trace\r\n"
        f'data: {{"type":"done","trace_id":"{trace_id}","client_request_id":"{response.headers[REQUEST_HEADER]}"}}'
        "\r\n\r\n"
    )


async def test_an_openai_style_stream_passes_byte_for_byte_by_default(experiment_name: str) -> None:
    """Its clients parse every data line as a chunk of theirs: the trace ID stays in the headers."""
    app = build_app(experiment_name=experiment_name)
    async with client_for(app) as client:
        response = await client.get("/openai-stream")
    assert response.text == 'data: {"choices": [{"delta": {"content": "Hi"}}]}\n\ndata: [DONE]\n\n'
    assert response.headers[TRACE_HEADER].startswith("tr-")


async def test_forced_final_event_goes_before_done_sentinel(experiment_name: str) -> None:
    app = build_app(experiment_name=experiment_name, sse_final_event=True)
    async with client_for(app) as client:
        response = await client.get("/openai-stream")
    blocks = response.text.split("\n\n")
    assert blocks[0].startswith('data: {"choices"')
    assert blocks[1].startswith("event: mlflow_trace\n")
    assert blocks[2] == "data: [DONE]"
    assert blocks[3] == ""


async def test_unterminated_last_event_is_closed_first(experiment_name: str) -> None:
    app = build_app(experiment_name=experiment_name)
    async with client_for(app) as client:
        response = await client.get("/unterminated-stream")
    assert response.text.startswith("data: first\n\ndata: last-without-blank-line\n\nevent: mlflow_trace\n")


async def test_compressed_stream_is_left_alone(experiment_name: str) -> None:
    app = build_app(experiment_name=experiment_name)
    async with client_for(app) as client:
        response = await client.get("/compressed-stream")
    assert response.headers["content-encoding"] == "gzip"
    assert TRACE_HEADER in response.headers
    assert response.text == "data: compressed\n\n"


async def test_final_event_can_be_turned_off(experiment_name: str) -> None:
    app = build_app(experiment_name=experiment_name, sse_final_event=False)
    async with client_for(app) as client:
        response = await client.post("/chat/stream", json={"message": "hi"})
        asked = await client.post("/chat/stream", json={"message": "hi"}, headers={"x-mlflow-return-trace-id": "true"})
    assert "mlflow_trace" not in response.text
    assert "trace_id" not in asked.text  # off is off, whatever a client asks


def test_client_disconnect_mid_stream_is_a_recorded_outcome(experiment_name: str) -> None:
    """Over a real socket: the trace still ends and lands, marked disconnected, with the partial answer."""
    app = build_app(experiment_name=experiment_name)
    with UvicornThread(app) as server, httpx.Client(base_url=server.url) as client:
        with client.stream("GET", "/slow-stream") as response:
            trace_id = response.headers[TRACE_HEADER]
            lines = response.iter_lines()
            received = [next(lines) for _ in range(5)]
        assert received[0] == "data: chunk 0"
        trace = get_trace(trace_id)
    root = root_span(trace)
    assert trace.info.state.value == "OK"
    assert root.attributes["http.outcome"] == "client_disconnected"
    assert trace.info.tags["http.outcome"] == "client_disconnected"
    assert root.outputs["disconnected"] is True
    events = root.outputs["body"]["events"]
    assert events[:2] == ["chunk 0", "chunk 1"] and "chunk 999" not in events
    assert app.state.closed_streams == 1  # the generator was closed, not left suspended


def test_lifespan_shutdown_exports_pending_traces(experiment_name: str) -> None:
    """Traces still batched in MLflow's exporter (5 s by default) are exported before the server exits."""
    app = build_app(experiment_name=experiment_name)
    with UvicornThread(app) as server, httpx.Client(base_url=server.url) as client:
        trace_id = client.post("/chat", json={"message": "last words"}).headers[TRACE_HEADER]
    trace = mlflow.get_trace(trace_id)  # no flush here: the shutdown did it
    assert trace is not None and root_span(trace).inputs["body"] == {"message": "last words"}
