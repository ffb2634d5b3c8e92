"""WebSocket chat: a trace per turn, its IDs as the turn's last message, feedback through the same routes."""

from __future__ import annotations

import json

import httpx
from websockets.sync.client import connect

from mlflow_feedback_middleware.intake.tokens import FeedbackTokens, as_secret_list

from .apps import build_app
from .support import UvicornThread, get_trace, root_span
from .test_feedback import feedback_on

SECRET = "websocket-secret-0123456789abcdef"


def test_each_turn_is_a_trace_that_takes_feedback(experiment_name: str) -> None:
    app = build_app(experiment_name=experiment_name, feedback_secret=SECRET)
    with UvicornThread(app) as server, httpx.Client(base_url=server.url) as client:
        ws_url = server.url.replace("http://", "ws://") + "/ws/chat"
        with connect(ws_url, additional_headers={"X-User-ID": "wendy", "X-Session-ID": "chat-7"}) as ws:
            turns = []
            for text in ("hello", "and again"):
                ws.send(text)
                answer, ids = json.loads(ws.recv(timeout=30)), json.loads(ws.recv(timeout=30))
                assert answer["type"] == "answer" and ids["type"] == "mlflow_trace"
                assert answer["trace_id"] == ids["trace_id"]  # handler code sees the turn's trace
                turns.append((text, answer, ids))
        assert turns[0][2]["trace_id"] != turns[1][2]["trace_id"]
        for i, (_, _, ids) in enumerate(turns):
            grant = FeedbackTokens(as_secret_list(SECRET), 60).verify(ids["feedback_token"])
            assert (grant.trace_id, grant.client_request_id, grant.user_id) == (
                ids["trace_id"],
                ids["client_request_id"],
                "wendy",
            )
            response = client.post(
                f"/feedback?client_request_id={ids['client_request_id']}",
                json={"is_correct": i == 0, "feedback_token": ids["feedback_token"]},
            )
            assert response.status_code in (200, 202), response.text
    for i, (text, answer, ids) in enumerate(turns):
        trace = get_trace(ids["trace_id"])
        root = root_span(trace)
        assert root.name == "WEBSOCKET /ws/chat"
        assert root.inputs == {"message": text} and root.outputs == {"response": answer["text"]}
        assert any(s.name == "fake_llm_async" and s.parent_id == root.span_id for s in trace.data.spans)
        assert trace.info.client_request_id == ids["client_request_id"]
        assert trace.info.request_metadata["mlflow.trace.user"] == "wendy"
        assert trace.info.request_metadata["mlflow.trace.session"] == "chat-7"
        vote = feedback_on(ids["trace_id"], "user_feedback")["user_feedback"]
        assert (vote.value, vote.source.source_id) == (i == 0, "wendy")


def test_without_the_middleware_turns_run_untraced() -> None:
    app = build_app(experiment_name="unused")
    app.user_middleware.clear()  # the same app without the middleware
    with UvicornThread(app) as server, connect(server.url.replace("http://", "ws://") + "/ws/chat") as ws:
        ws.send("hi")
        assert json.loads(ws.recv(timeout=30)) == {"type": "answer", "text": "echo: hi", "trace_id": None}
        ws.send("still fine")
        assert json.loads(ws.recv(timeout=30))["text"] == "echo: still fine"  # no mlflow_trace message between
