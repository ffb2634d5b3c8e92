"""The feedback routes: the seed guide's shapes, the general and rating shapes, and every bad input."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import mlflow
import pytest

from mlflow_feedback_middleware import Binary, FeedbackSchema, Scale
from mlflow_feedback_middleware._mlflow.tracing import find_experiment
from mlflow_feedback_middleware.insight.datasets import feedback_records
from mlflow_feedback_middleware.insight.report import build_report, search_requests
from mlflow_feedback_middleware.intake.models import RETRACTED_KEY

from .apps import build_app
from .support import client_for, get_trace, http_scope

pytestmark = pytest.mark.anyio

TRACE_HEADER = "x-mlflow-trace-id"


def feedback_on(trace_id: str, *names: str, timeout: float = 30.0) -> dict[str, Any]:
    """The stored trace's assessments by name, once those `names` have landed."""
    deadline = time.monotonic() + timeout
    while True:
        found = {a.name: a for a in get_trace(trace_id).info.assessments}
        if set(names) <= set(found):
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"assessments {names} did not land on {trace_id}; found {sorted(found)}")
        time.sleep(0.2)


async def answered(client: httpx.AsyncClient, **headers: str) -> httpx.Response:
    response = await client.post("/chat", json={"message": "hello"}, headers=headers)
    assert response.status_code == 200
    return response


async def test_seed_trace_id_shape_right_after_the_answer(experiment_name: str) -> None:
    """The seed's React flow: POST /feedback?trace_id=... the moment the answer arrives, no flush."""
    app = build_app(experiment_name=experiment_name)
    async with client_for(app) as client:
        trace_id = (await answered(client)).headers[TRACE_HEADER]
        response = await client.post(
            f"/feedback?trace_id={trace_id}&user_id=alice", json={"is_correct": True, "comment": "spot on"}
        )
    # Written at once (200) or queued until MLflow has exported the trace (202); stored either way.
    assert response.status_code in (200, 202), response.text
    body = response.json()
    assert body["status"] in ("success", "accepted") and body["trace_id"] == trace_id
    assert TRACE_HEADER not in response.headers  # the feedback route is never traced
    stored = feedback_on(trace_id, "user_feedback")["user_feedback"]
    assert stored.value is True
    assert stored.rationale == "spot on"
    assert stored.source.source_type == "HUMAN"
    assert stored.source.source_id == "alice"


async def test_seed_client_request_id_shape_with_user_header(experiment_name: str) -> None:
    app = build_app(experiment_name=experiment_name)
    async with client_for(app) as client:
        # As in the guide, the service draws the client request ID and hands it out (here in X-Request-ID).
        answer = await answered(client)
        response = await client.post(
            f"/feedback?client_request_id={answer.headers['x-request-id']}",
            json={"is_correct": False, "comment": None},
            headers={"X-User-ID": "bob"},
        )
    assert response.status_code in (200, 202), response.text
    assert response.json()["trace_id"] == answer.headers[TRACE_HEADER]
    stored = feedback_on(answer.headers[TRACE_HEADER], "user_feedback")["user_feedback"]
    assert stored.value is False and stored.source.source_id == "bob" and stored.rationale is None


async def test_client_request_id_found_by_search_from_another_process(experiment_name: str) -> None:
    """A fresh middleware (as in another worker) has no memory of the request and searches MLflow."""
    async with client_for(build_app(experiment_name=experiment_name)) as client:
        answer = await answered(client)
    get_trace(answer.headers[TRACE_HEADER])
    async with client_for(build_app(experiment_name=experiment_name)) as other:
        request_id = answer.headers["x-request-id"]
        response = await other.post(f"/feedback?client_request_id={request_id}", json={"is_correct": True})
    assert response.status_code == 200, response.text
    assert response.json()["trace_id"] == answer.headers[TRACE_HEADER]


async def test_user_in_query_and_body_may_agree(experiment_name: str) -> None:
    app = build_app(experiment_name=experiment_name, feedback_sync_seconds=30)
    async with client_for(app) as client:
        trace_id = (await answered(client)).headers[TRACE_HEADER]
        agree = await client.post(
            f"/feedback?trace_id={trace_id}&user_id=dan", json={"user_id": "dan", "is_correct": True}
        )
        differ = await client.post(
            f"/feedback?trace_id={trace_id}&user_id=dan", json={"user_id": "eve", "is_correct": True}
        )
    assert agree.status_code == 200, agree.text
    assert differ.status_code == 400 and "user_id" in differ.json()["message"]
    assert feedback_on(trace_id)["user_feedback"].source.source_id == "dan"


async def test_anonymous_when_no_user_is_given(experiment_name: str) -> None:
    app = build_app(experiment_name=experiment_name, feedback_sync_seconds=30)
    async with client_for(app) as client:
        trace_id = (await answered(client)).headers[TRACE_HEADER]
        response = await client.post("/feedback", json={"trace_id": trace_id, "is_correct": True})
    assert response.status_code == 200
    assert feedback_on(trace_id)["user_feedback"].source.source_id == "anonymous"


@pytest.mark.parametrize(
    "value",
    [True, 3, 0.25, "too formal", ["wrong", "slow"], {"category": "tone", "severity": 2}],
)
async def test_general_shape_keeps_the_value_type(experiment_name: str, value: Any) -> None:
    app = build_app(experiment_name=experiment_name, feedback_sync_seconds=30)
    async with client_for(app) as client:
        trace_id = (await answered(client)).headers[TRACE_HEADER]
        response = await client.post(
            "/feedback",
            json={
                "trace_id": trace_id,
                "name": "issue",
                "value": value,
                "rationale": "why",
                "metadata": {"page": "chat", "n": 1},
            },
            headers={"X-User-ID": "carol"},
        )
    assert response.status_code == 200, response.text
    stored = feedback_on(trace_id)["issue"]
    expected = float(value) if type(value) is int else value  # REST returns numbers as floats
    if isinstance(value, dict):
        expected = {k: float(v) if type(v) is int else v for k, v in value.items()}
    assert stored.value == expected
    assert stored.rationale == "why"
    feedback_id = response.json()["feedback_id"]
    cast_at = stored.metadata.pop("mlflow_feedback.cast_at_ms")  # when the vote was cast, for its ordering
    assert cast_at.isdigit()
    assert stored.metadata == {"page": "chat", "n": "1", "mlflow_feedback.feedback_id": f"{feedback_id}/0"}
    assert stored.source.source_id == "carol"


async def test_ratings_are_normalised_with_raw_value_kept(experiment_name: str) -> None:
    app = build_app(experiment_name=experiment_name, feedback_sync_seconds=30)
    async with client_for(app) as client:
        trace_id = (await answered(client)).headers[TRACE_HEADER]
        response = await client.post(
            f"/feedback?trace_id={trace_id}",
            json={"ratings": {"accuracy": 4, "helpfulness": 5, "relevance": 2.5}, "comment": "good"},
        )
    assert response.status_code == 200, response.text
    assert response.json()["feedback_recorded"] == {
        "user_accuracy": 0.8,
        "user_helpfulness": 1.0,
        "user_relevance": 0.5,
    }
    stored = feedback_on(trace_id)
    assert stored["user_accuracy"].value == pytest.approx(0.8)
    assert stored["user_accuracy"].metadata["raw_rating"] == "4"
    assert stored["user_accuracy"].rationale == "good"
    assert stored["user_helpfulness"].rationale is None
    assert stored["user_relevance"].value == pytest.approx(0.5)
    feedback_id = response.json()["feedback_id"]
    assert stored["user_relevance"].metadata["mlflow_feedback.feedback_id"] == f"{feedback_id}/2"


async def test_seed_and_ratings_in_one_request(experiment_name: str) -> None:
    app = build_app(experiment_name=experiment_name, feedback_sync_seconds=30)
    async with client_for(app) as client:
        trace_id = (await answered(client)).headers[TRACE_HEADER]
        response = await client.post(
            f"/feedback?trace_id={trace_id}", json={"is_correct": True, "ratings": {"accuracy": 5}}
        )
    assert response.status_code == 200
    assert set(feedback_on(trace_id)) == {"user_feedback", "user_accuracy"}


async def test_feedback_from_the_final_sse_event(experiment_name: str) -> None:
    """The seed's streaming hook: read the trace ID from the stream's last event, then send feedback."""
    app = build_app(experiment_name=experiment_name, feedback_sync_seconds=30)
    async with client_for(app) as client:
        stream = await client.post("/chat/stream", json={"message": "a b"})
        last = [block for block in stream.text.split("\n\n") if block][-1]
        event = json.loads(last.split("data: ", 1)[1])
        assert event["type"] == "done"
        response = await client.post(f"/feedback?trace_id={event['trace_id']}", json={"is_correct": True})
    assert response.status_code in (200, 202), response.text
    assert feedback_on(stream.headers[TRACE_HEADER], "user_feedback")["user_feedback"].value is True


BAD_REQUESTS: list[tuple[str, str, bytes | None, int, str]] = [
    # (description, query, raw body, status, text the message must contain)
    ("malformed JSON", "trace_id=tr-{t}", b'{"is_correct": tru', 400, "not valid JSON"),
    ("NaN", "trace_id=tr-{t}", b'{"name": "x", "value": NaN}', 400, "NaN"),
    ("array body", "trace_id=tr-{t}", b"[true]", 422, "JSON object"),
    ("wrong type", "trace_id=tr-{t}", b'{"is_correct": "perhaps"}', 422, "is_correct"),
    ("no feedback", "trace_id=tr-{t}", b"{}", 422, "no feedback given"),
    ("name without value", "trace_id=tr-{t}", b'{"name": "x"}', 422, "'name' and 'value'"),
    ("rating out of range", "trace_id=tr-{t}", b'{"ratings": {"accuracy": 6}}', 422, "ratings"),
    ("rating not a number", "trace_id=tr-{t}", b'{"ratings": {"accuracy": "5"}}', 422, "ratings.accuracy"),
    ("unknown field", "trace_id=tr-{t}", b'{"is_correct": true, "score": 1}', 422, "score"),
    ("both IDs", "trace_id=tr-{t}&client_request_id=abc", b'{"is_correct": true}', 400, "not both"),
    ("neither ID", "", b'{"is_correct": true}', 422, "trace_id or client_request_id"),
    ("bad trace ID", "trace_id=tr%0d%0aX:1", b'{"is_correct": true}', 422, "trace_id"),
    ("bad request ID", "client_request_id=a%20b", b'{"is_correct": true}', 422, "client_request_id"),
    ("bad user ID", "trace_id=tr-{t}&user_id=%0a", b'{"is_correct": true}', 422, "user_id"),
    ("unknown trace", "trace_id=tr-00000000000000000000000000000000", b'{"is_correct": true}', 404, "not found"),
    ("unknown request ID", "client_request_id=never-issued", b'{"is_correct": true}', 404, "never-issued"),
    ("too large", "trace_id=tr-{t}", b'{"comment": "' + b"x" * 70_000 + b'"}', 413, "larger than"),
]


def human_votes(trace_id: str, count: int, timeout: float = 30.0) -> list[Any]:
    """The trace's HUMAN assessments in the order written, once there are `count` of them."""
    deadline = time.monotonic() + timeout
    while True:
        found = [a for a in get_trace(trace_id).info.assessments if a.source.source_type == "HUMAN"]
        if len(found) >= count:
            return sorted(found, key=lambda a: (a.create_time_ms, a.assessment_id))
        if time.monotonic() > deadline:
            raise AssertionError(f"{count} assessments did not land on {trace_id}; found {len(found)}")
        time.sleep(0.2)


async def test_a_changed_and_withdrawn_vote_keeps_its_history_and_counts_as_the_current_vote(
    experiment_name: str,
) -> None:
    """👍, then 👎 with a comment, then withdrawn (POST ``retract`` and DELETE): MLflow keeps each earlier vote,
    overridden and invalid; the report and the export count only what each user's vote is now."""
    app = build_app(experiment_name=experiment_name)
    async with client_for(app) as client:
        trace_id = (await answered(client)).headers[TRACE_HEADER]
        alice, bob = f"/feedback?trace_id={trace_id}&user_id=alice", f"/feedback?trace_id={trace_id}&user_id=bob"
        steps: list[tuple[str, str, dict[str, Any] | None]] = [
            ("post", alice, {"is_correct": True}),
            ("post", alice, {"is_correct": False, "comment": "on second thought, wrong"}),
            ("post", bob, {"is_correct": True}),
            ("post", alice, {"retract": True}),
        ]
        for count, (method, url, body) in enumerate(steps, start=1):
            response = await client.request(method, url, json=body)
            assert response.status_code in (200, 202), response.text
            human_votes(trace_id, count)  # delivered before the next step: one history, in order

        first, second, bobs, withdrawal = human_votes(trace_id, 4)
        assert (first.value, first.valid, first.overrides) == (True, False, None)
        assert (second.value, second.valid, second.overrides) == (False, False, first.assessment_id)
        assert second.rationale == "on second thought, wrong"
        assert (withdrawal.value, withdrawal.valid, withdrawal.overrides) == (None, True, second.assessment_id)
        assert withdrawal.metadata[RETRACTED_KEY] == "true" and withdrawal.source.source_id == "alice"
        assert (bobs.value, bobs.valid, bobs.source.source_id) == (True, True, "bob")

        experiment_id = find_experiment(mlflow.get_tracking_uri(), experiment_name, None, create=False)
        report = build_report(search_requests(experiment_id))
        assert (report["traces_with_feedback"], report["positive_count"], report["negative_count"]) == (1, 1, 0)
        assert report["withdrawn_count"] == 1
        exported = list(feedback_records(experiment_id, only="any"))
        assert [(v["user"], v["value"]) for v in exported[0]["feedback"]] == [("bob", True)]
        assert list(feedback_records(experiment_id, only="negative")) == []  # Alice's 👎 is withdrawn

        # Bob withdraws with DELETE; then Alice votes again, which overrides her withdrawal.
        assert (await client.delete(bob)).status_code in (200, 202)
        assert (await client.post(alice, json={"is_correct": True})).status_code in (200, 202)
        history = human_votes(trace_id, 6)
    current = [(a.source.source_id, a.value) for a in history if a.valid and not a.metadata.get(RETRACTED_KEY)]
    assert current == [("alice", True)]
    report = build_report(search_requests(experiment_id))
    assert (report["positive_count"], report["negative_count"], report["withdrawn_count"]) == (1, 0, 1)


async def test_a_retraction_is_checked_like_a_vote(experiment_name: str) -> None:
    """Retracting names the schema does not declare, or with a vote in the same body, is a 422 naming `retract`."""
    schema = FeedbackSchema(Binary("user_feedback"), Scale("accuracy", min=1, max=5))
    async with client_for(build_app(experiment_name=experiment_name, feedback_schema=schema)) as client:
        trace_id = (await answered(client)).headers[TRACE_HEADER]
        url = f"/feedback?trace_id={trace_id}"
        unknown = await client.post(url, json={"retract": ["accuracy"]})  # stored as user_accuracy
        assert unknown.status_code == 422 and unknown.json()["errors"][0]["field"] == "retract"
        assert "user_feedback, user_accuracy" in unknown.json()["message"]
        mixed = await client.post(url, json={"retract": True, "is_correct": True})
        assert mixed.status_code == 422 and "'retract' goes alone" in mixed.json()["message"]
        nothing = await client.post(url, json={"retract": False})
        assert nothing.status_code == 422 and nothing.json()["errors"][0]["field"] == "retract"
        ok = await client.delete(url + "&name=user_accuracy")
        assert ok.status_code in (200, 202), ok.text
        assert ok.json()["feedback_recorded"] == {"user_accuracy": None}


@pytest.mark.parametrize(("case", "query", "body", "status", "text"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
async def test_bad_input_gets_a_clear_4xx(
    experiment_name: str, case: str, query: str, body: bytes | None, status: int, text: str
) -> None:
    app = build_app(experiment_name=experiment_name, feedback_wait_seconds=1)
    async with client_for(app) as client:
        trace_id = (await answered(client)).headers[TRACE_HEADER]
        query = query.replace("tr-{t}", trace_id)
        response = await client.post(f"/feedback?{query}", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    payload = response.json()
    assert payload["status"] == "error"
    assert text in json.dumps(payload), payload
    assert feedback_on(trace_id) == {}  # nothing written for a rejected request


async def test_other_methods_and_subpaths(experiment_name: str) -> None:
    app = build_app(experiment_name=experiment_name)
    async with client_for(app) as client:
        get = await client.get("/feedback")
        assert get.status_code == 405 and get.headers["allow"] == "POST, DELETE"
        assert (await client.post("/feedback/nowhere", json={})).status_code == 404
        assert (await client.get("/feedback/fb-" + "0" * 32)).status_code == 404  # no such feedback
        assert (await client.post("/feedback/health")).status_code == 404


async def test_no_routes_when_feedback_path_is_none(experiment_name: str) -> None:
    app = build_app(experiment_name=experiment_name, feedback_path=None)
    async with client_for(app) as client:
        response = await client.post("/feedback?trace_id=tr-1", json={"is_correct": True})
    assert response.status_code == 404
    assert response.json() == {"detail": "Not Found"}  # FastAPI's own 404: the middleware stayed out


async def test_custom_feedback_path(experiment_name: str) -> None:
    app = build_app(experiment_name=experiment_name, feedback_path="/api/v1/votes", feedback_sync_seconds=30)
    async with client_for(app) as client:
        trace_id = (await answered(client)).headers[TRACE_HEADER]
        response = await client.post(f"/api/v1/votes?trace_id={trace_id}", json={"is_correct": True})
    assert response.status_code == 200
    assert mlflow.get_trace(trace_id) is not None


async def test_client_gone_before_the_body_arrives(experiment_name: str) -> None:
    """A feedback client that disconnects mid-body gets no answer and causes no error."""
    app = build_app(experiment_name=experiment_name)
    sent: list[dict[str, Any]] = []
    messages = [{"type": "http.request", "body": b'{"is_co', "more_body": True}, {"type": "http.disconnect"}]

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    query = b"trace_id=tr-0123456789abcdef0123456789abcdef"
    scope = http_scope("POST", "/feedback", query, [(b"content-type", b"application/json")])
    await app(scope, receive, send)  # type: ignore[arg-type]
    assert sent == []


async def test_queued_feedback_is_accepted_with_an_id_and_delivered(experiment_name: str) -> None:
    """Feedback sent while the answer is still streaming cannot be written yet: 202, then delivered."""
    app = build_app(experiment_name=experiment_name, feedback_sync_seconds=0.2)
    async with client_for(app) as client:
        trace_ids: list[str] = []
        responses: list[httpx.Response] = []

        async def vote_mid_stream(trace_id: str) -> None:
            trace_ids.append(trace_id)
            responses.append(await client.post(f"/feedback?trace_id={trace_id}", json={"is_correct": True}))

        app.state.on_stream_start = vote_mid_stream
        stream = await client.post("/chat/stream", json={"message": "a b"})
        assert stream.status_code == 200
        [response] = responses
        assert response.status_code == 202, response.text
        body = response.json()
        assert body["status"] == "accepted" and body["trace_id"] == trace_ids[0]
        assert body["feedback_id"].startswith("fb-") and response.headers["location"] == body["status_url"]
        stored = feedback_on(trace_ids[0], "user_feedback")["user_feedback"]
        assert stored.metadata["mlflow_feedback.feedback_id"] == body["feedback_id"] + "/0"
        status = (await client.get(body["status_url"])).json()
    assert status["state"] == "delivered" and status["assessment_ids"] == [stored.assessment_id]


async def test_health_reports_backend_and_outbox(experiment_name: str) -> None:
    app = build_app(experiment_name=experiment_name)
    async with client_for(app) as client:
        await answered(client)
        response = await client.get("/feedback/health")
    assert response.status_code == 200, response.text
    health = response.json()
    assert health["status"] == "ok" and health["reachable"] is True and health["traces_issued"] == 1
    assert health["outbox"]["pending"] == 0 and health["outbox"]["oldest_pending_seconds"] is None


async def test_unwritable_outbox_falls_back_to_memory(experiment_name: str, caplog: pytest.LogCaptureFixture) -> None:
    """A read-only disk must not keep the service from starting: one ERROR, and feedback still works."""
    unwritable = "/proc/no-such-dir/outbox.db"
    app = build_app(experiment_name=experiment_name, outbox_path=unwritable, feedback_sync_seconds=30)
    async with client_for(app) as client:  # Starlette builds the middleware at the first request
        trace_id = (await answered(client)).headers[TRACE_HEADER]
        response = await client.post(f"/feedback?trace_id={trace_id}", json={"is_correct": True})
        health = (await client.get("/feedback/health")).json()
    assert any("cannot open the feedback outbox" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    assert response.status_code == 200, response.text
    assert health["outbox"]["path"] is None and health["outbox"]["delivered"] == 1
