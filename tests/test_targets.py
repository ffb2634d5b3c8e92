"""Feedback on one step of an answer (a span) and on a whole conversation (a session), against a real tracking
server: where it is stored, what is refused, and that the one-vote, token and schema rules apply alike."""

from __future__ import annotations

import httpx
import mlflow
import pytest

from mlflow_feedback_middleware import Binary, FeedbackSchema
from mlflow_feedback_middleware._mlflow.tracing import find_experiment
from mlflow_feedback_middleware.insight.report import build_report, search_requests
from mlflow_feedback_middleware.intake.models import SESSION_KEY

from .apps import build_app
from .support import client_for, get_trace
from .test_feedback import human_votes

pytestmark = pytest.mark.anyio

TRACE_HEADER = "x-mlflow-trace-id"
TOKEN_HEADER = "x-mlflow-feedback-token"
SECRET = "s3cret-for-tests-only-0123456789"
# Each answer below is exported before it is voted on, so the delivery thread's verdict (written, or a refusal
# naming the field) is what the route answers, however loaded the machine: never a 202 for lack of time.
DECIDED = {"feedback_sync_seconds": 30.0}


async def test_feedback_on_a_retrieval_step_is_stored_on_its_span(experiment_name: str) -> None:
    async with client_for(build_app(experiment_name=experiment_name, **DECIDED)) as client:
        answer = await client.post("/rag", json={"message": "pricing"})
        trace_id, span_id = answer.headers[TRACE_HEADER], answer.json()["retrieval_span_id"]
        get_trace(trace_id)
        url = f"/feedback?trace_id={trace_id}&user_id=alice"
        step = {"span_id": span_id, "name": "relevant_documents", "value": False, "rationale": "an old page"}
        assert (await client.post(url, json=step)).status_code == 200
        # The same name on the whole answer is another vote; a changed mind on the step overrides the step's vote.
        assert (await client.post(url, json={"name": "relevant_documents", "value": True})).status_code == 200
        assert (await client.post(url, json={**step, "value": True, "rationale": None})).status_code == 200
        invented = await client.post(url, json={**step, "span_id": "0123456789abcdef"})
        malformed = await client.post(url, json={**step, "span_id": "not-a-span"})
    assert invented.status_code == 422, invented.text
    assert invented.json()["errors"][0]["field"] == "span_id" and "is not a span of trace" in invented.text
    assert malformed.status_code == 422 and malformed.json()["errors"][0]["field"] == "span_id"

    history = human_votes(trace_id, 3)
    current = {(a.span_id, a.value) for a in history if a.valid}
    assert current == {(span_id, True), (None, True)}
    assert [(a.span_id, a.value, a.rationale) for a in history if not a.valid] == [(span_id, False, "an old page")]
    experiment_id = find_experiment(mlflow.get_tracking_uri(), experiment_name, None, create=False)
    report = build_report(search_requests(experiment_id))
    assert report["step_feedback"] == {"relevant_documents": {"count": 1, "positive_count": 0, "negative_count": 0}}
    assert report["traces_with_feedback"] == 1 and report["categories"] == {}


async def test_feedback_on_a_conversation_goes_to_its_first_trace(experiment_name: str) -> None:
    """Three turns of one session; the session vote names the last turn and lands where MLflow's multi-turn
    evaluation keeps session-level assessments: the session's first trace, with the session in its metadata."""
    app = build_app(experiment_name=experiment_name, feedback_secret=SECRET, **DECIDED)
    async with client_for(app) as client:
        turns = []
        for i in range(3):
            sent = await client.post("/chat", json={"message": f"turn {i}"}, headers={"X-Session-ID": "chat-42"})
            turns.append(sent)
        alone = await client.post("/chat", json={"message": "no session"})
        for turn in [*turns, alone]:
            get_trace(turn.headers[TRACE_HEADER])
        first, last = turns[0].headers[TRACE_HEADER], turns[-1].headers

        async def vote(headers: httpx.Headers, body: dict[str, object]) -> httpx.Response:
            return await client.post("/feedback", json=body, headers={TOKEN_HEADER: headers[TOKEN_HEADER]})

        assert (await vote(turns[0].headers, {"is_correct": True})).status_code == 200  # on the first answer
        assert (await vote(last, {"is_correct": False, "scope": "session"})).status_code == 200
        assert (await vote(last, {"is_correct": True, "scope": "session", "comment": "got there"})).status_code == 200
        refused = await vote(alone.headers, {"is_correct": True, "scope": "session"})
        stolen = await client.post(
            f"/feedback?trace_id={first}",
            json={"is_correct": True, "scope": "session"},
            headers={TOKEN_HEADER: last[TOKEN_HEADER]},
        )
    assert refused.status_code == 422 and refused.json()["errors"][0]["field"] == "scope", refused.text
    assert stolen.status_code == 403  # the token names the trace: a session vote is no way around it

    history = human_votes(first, 3)
    on_session = [a for a in history if (a.metadata or {}).get(SESSION_KEY) == "chat-42"]
    assert [(a.value, a.valid) for a in sorted(on_session, key=lambda a: a.create_time_ms)] == [
        (False, False),
        (True, True),
    ]
    on_answer = [a for a in history if SESSION_KEY not in (a.metadata or {})]
    assert [(a.value, a.valid) for a in on_answer] == [(True, True)]  # the voter's answer vote stays
    for turn in turns[1:]:
        assert not [
            a for a in get_trace(turn.headers[TRACE_HEADER]).info.assessments if a.source.source_type == "HUMAN"
        ]

    experiment_id = find_experiment(mlflow.get_tracking_uri(), experiment_name, None, create=False)
    report = build_report(search_requests(experiment_id))
    assert report["session_feedback"] == {"sessions_with_feedback": 1, "positive_count": 1, "negative_count": 0}
    assert (report["traces_with_feedback"], report["positive_count"]) == (1, 1)  # the first answer's own vote


async def test_with_a_schema_step_and_session_votes_take_only_declared_names(experiment_name: str) -> None:
    schema = FeedbackSchema(Binary("user_feedback"))
    async with client_for(build_app(experiment_name=experiment_name, feedback_schema=schema)) as client:
        answer = await client.post("/rag", json={"message": "pricing"})
        trace_id, span_id = answer.headers[TRACE_HEADER], answer.json()["retrieval_span_id"]
        url = f"/feedback?trace_id={trace_id}"
        invented = await client.post(url, json={"span_id": span_id, "name": "relevant_documents", "value": False})
        both = await client.post(url, json={"span_id": span_id, "scope": "session", "is_correct": True})
    assert invented.status_code == 422 and invented.json()["errors"][0]["field"] == "name"
    assert both.status_code == 422 and "a session-wide vote takes none" in both.text
