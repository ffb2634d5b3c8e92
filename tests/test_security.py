"""Who may write feedback: signed tokens, the service's own experiment, identity, one vote per user,
idempotent retries, limits, rate limiting, CORS, and what request capture keeps out of traces."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import httpx
import pytest
from mlflow.entities import Assessment
from starlette.authentication import AuthCredentials, AuthenticationBackend, SimpleUser
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import HTTPConnection

from mlflow_feedback_middleware import (
    Categorical,
    FeedbackLimits,
    FeedbackSchema,
    FeedbackTokens,
    MlflowFeedbackMiddleware,
    RateLimit,
    Text,
)
from mlflow_feedback_middleware.intake.tokens import as_secret_list

from .apps import build_app
from .support import client_for, get_trace, http_scope, outbox_drained
from .test_feedback import feedback_on

pytestmark = pytest.mark.anyio

SECRET = "s3cret-for-tests-only-0123456789"
OLD_SECRET = "the-previous-secret-0123456789ab"
TOKEN_HEADER = "x-mlflow-feedback-token"
TRACE_HEADER = "x-mlflow-trace-id"


def human_feedback(trace_id: str) -> list[Assessment]:
    return [a for a in get_trace(trace_id).info.assessments if a.source.source_type == "HUMAN"]


async def answer(client: httpx.AsyncClient, **headers: str) -> httpx.Response:
    response = await client.post("/chat", json={"message": "hello"}, headers=headers)
    assert response.status_code == 200, response.text
    return response


def tokens_with(secret: str, ttl: float = 3600) -> FeedbackTokens:
    return FeedbackTokens(as_secret_list(secret), ttl)


# -- signed tokens ---------------------------------------------------------------------------------


async def test_every_traced_answer_carries_a_token_for_its_trace_and_user(experiment_name: str) -> None:
    app = build_app(experiment_name=experiment_name, feedback_secret=SECRET)
    async with client_for(app) as client:
        response = await answer(client, **{"X-User-ID": "alice", "X-Request-ID": "req-token-1"})
        async with client.stream("POST", "/chat/stream", json={"message": "hi there"}) as stream:
            body = b"".join([chunk async for chunk in stream.aiter_bytes()]).decode()
    grant = tokens_with(SECRET).verify(response.headers[TOKEN_HEADER])
    assert (grant.trace_id, grant.client_request_id, grant.user_id) == (
        response.headers[TRACE_HEADER],
        "req-token-1",
        "alice",
    )
    assert 23 * 3600 < grant.expires_at - time.time() <= 24 * 3600  # hours by default
    final = json.loads(body.rsplit("event: mlflow_trace\ndata: ", 1)[1].split("\n", 1)[0])
    assert final["feedback_token"] == stream.headers[TOKEN_HEADER]
    assert tokens_with(SECRET).verify(final["feedback_token"]).trace_id == stream.headers[TRACE_HEADER]


async def test_without_a_secret_there_is_no_token_and_a_warning(
    experiment_name: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_FEEDBACK_SECRET", raising=False)
    with caplog.at_level(logging.WARNING, logger="mlflow_feedback_middleware"):
        app = build_app(experiment_name=experiment_name)
        async with client_for(app) as client:
            response = await answer(client)
    assert TOKEN_HEADER not in response.headers
    assert any("unauthenticated" in r.getMessage() for r in caplog.records)


async def test_the_secret_comes_from_the_environment_with_a_previous_one_for_rotation(
    experiment_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_FEEDBACK_SECRET", SECRET)
    monkeypatch.setenv("MLFLOW_FEEDBACK_PREVIOUS_SECRET", OLD_SECRET)
    async with client_for(build_app(experiment_name=experiment_name)) as client:
        response = await answer(client)
        trace_id = response.headers[TRACE_HEADER]
        tokens_with(SECRET).verify(response.headers[TOKEN_HEADER])  # the first secret signs
        old = tokens_with(OLD_SECRET).issue(trace_id, response.headers["x-request-id"], None)
        accepted = await client.post(
            f"/feedback?trace_id={trace_id}", json={"is_correct": True}, headers={TOKEN_HEADER: old}
        )
    assert accepted.status_code in (200, 202), accepted.text


async def test_only_a_valid_token_for_that_trace_and_user_writes_feedback(experiment_name: str) -> None:
    app = build_app(experiment_name=experiment_name, feedback_secret=[SECRET])
    async with client_for(app) as client:
        alice = await answer(client, **{"X-User-ID": "alice"})
        other = await answer(client, **{"X-User-ID": "alice"})
        trace_id, token = alice.headers[TRACE_HEADER], alice.headers[TOKEN_HEADER]
        request_id = alice.headers["x-request-id"]
        payload, signature = token.split(".")[1:]
        forged_claims = json.loads(_unb64(payload)) | {"u": "mallory"}
        forged = f"v1.{_b64(json.dumps(forged_claims).encode())}.{signature}"
        cases = {
            "missing": (None, {}, 401, "required"),
            "garbage": ("not-a-token", {}, 401, "malformed"),
            "forged user": (forged, {}, 401, "not valid"),
            "other secret": (tokens_with(OLD_SECRET).issue(trace_id, request_id, "alice"), {}, 401, "not valid"),
            "expired": (
                tokens_with(SECRET).issue(trace_id, request_id, "alice", now=time.time() - 90_000),
                {},
                401,
                "expired",
            ),
            "another trace": (other.headers[TOKEN_HEADER], {}, 403, "another trace"),
            "another user": (token, {"X-User-ID": "bob"}, 403, "another user"),
        }
        for case, (sent, headers, status, words) in cases.items():
            if sent is not None:
                headers = {**headers, TOKEN_HEADER: sent}
            response = await client.post(f"/feedback?trace_id={trace_id}", json={"is_correct": False}, headers=headers)
            assert response.status_code == status, (case, response.text)
            assert words in response.json()["message"], (case, response.json())
            assert response.json()["errors"][0]["field"] == "feedback_token"
            if status == 401:
                assert response.headers["www-authenticate"].startswith("MLflow-Feedback-Token")
        # The token in the body, and the trace taken from the token: the seed's client-request-ID shape works too.
        ok = await client.post(
            f"/feedback?client_request_id={request_id}",
            json={"is_correct": True, "comment": "good", "feedback_token": token},
        )
        assert ok.status_code in (200, 202), ok.text
        replayed_elsewhere = await client.post(
            f"/feedback?trace_id={other.headers[TRACE_HEADER]}", json={"is_correct": True, "feedback_token": token}
        )
        assert replayed_elsewhere.status_code == 403
    stored = feedback_on(trace_id, "user_feedback")
    assert [a.source.source_id for a in human_feedback(trace_id)] == ["alice"]  # the token's user, nothing else
    assert stored["user_feedback"].value is True
    assert human_feedback(other.headers[TRACE_HEADER]) == []


def _b64(raw: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


async def test_rotation_accepts_the_previous_secret_only_while_it_is_listed(experiment_name: str) -> None:
    async with client_for(build_app(experiment_name=experiment_name, feedback_secret=OLD_SECRET)) as client:
        response = await answer(client)
    trace_id, old_token = response.headers[TRACE_HEADER], response.headers[TOKEN_HEADER]
    get_trace(trace_id)
    rotated = build_app(experiment_name=experiment_name, feedback_secret=[SECRET, OLD_SECRET])
    retired = build_app(experiment_name=experiment_name, feedback_secret=SECRET)
    body = {"is_correct": True, "feedback_token": old_token}
    async with client_for(retired) as client:
        assert (await client.post(f"/feedback?trace_id={trace_id}", json=body)).status_code == 401
    async with client_for(rotated) as client:
        assert (await client.post(f"/feedback?trace_id={trace_id}", json=body)).status_code == 200


def test_short_secrets_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        MlflowFeedbackMiddleware(build_app(), feedback_secret="short")


# -- the service's own traces ----------------------------------------------------------------------


async def test_a_trace_of_another_experiment_is_not_found(experiment_name: str) -> None:
    async with client_for(build_app(experiment_name=experiment_name + "-other", feedback_secret=SECRET)) as other:
        foreign = await answer(other, **{"X-User-ID": "alice"})
    foreign_id = foreign.headers[TRACE_HEADER]
    get_trace(foreign_id)
    # The same secret (two services sharing one), a valid token: still not ours.
    async with client_for(build_app(experiment_name=experiment_name, feedback_secret=SECRET)) as client:
        await answer(client)  # resolves this service's experiment
        response = await client.post(
            f"/feedback?trace_id={foreign_id}",
            json={"is_correct": True},
            headers={TOKEN_HEADER: foreign.headers[TOKEN_HEADER], "X-User-ID": "alice"},
        )
    assert response.status_code == 404, response.text
    async with client_for(build_app(experiment_name=experiment_name)) as client:
        assert (await client.post(f"/feedback?trace_id={foreign_id}", json={"is_correct": True})).status_code == 404
    assert human_feedback(foreign_id) == []


# -- identity --------------------------------------------------------------------------------------


class BearerUser(AuthenticationBackend):
    """``Authorization: Bearer <name>`` authenticates as <name> (a stand-in for a real identity provider)."""

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, SimpleUser] | None:
        scheme, _, name = conn.headers.get("authorization", "").partition(" ")
        if scheme != "Bearer" or not name:
            return None
        return AuthCredentials(["authenticated"]), SimpleUser(name)


async def test_the_authenticated_user_is_the_trace_user_and_the_feedback_source(experiment_name: str) -> None:
    app = build_app(experiment_name=experiment_name, feedback_secret=SECRET)
    app.add_middleware(AuthenticationMiddleware, backend=BearerUser())  # outside the feedback middleware
    auth = {"Authorization": "Bearer carol"}
    async with client_for(app) as client:
        response = await answer(client, **auth, **{"X-User-ID": "spoofed"})
        trace_id, token = response.headers[TRACE_HEADER], response.headers[TOKEN_HEADER]
        assert tokens_with(SECRET).verify(token).user_id == "carol"
        spoof = await client.post(
            f"/feedback?trace_id={trace_id}&user_id=dave",
            json={"is_correct": True},
            headers={**auth, TOKEN_HEADER: token},
        )
        assert spoof.status_code == 403 and spoof.json()["errors"][0]["field"] == "user_id"
        ok = await client.post(
            f"/feedback?trace_id={trace_id}", json={"is_correct": True}, headers={**auth, TOKEN_HEADER: token}
        )
        assert ok.status_code in (200, 202), ok.text
    assert get_trace(trace_id).info.request_metadata["mlflow.trace.user"] == "carol"
    assert feedback_on(trace_id, "user_feedback")["user_feedback"].source.source_id == "carol"


async def test_a_custom_identity_resolver(experiment_name: str) -> None:
    app = build_app(experiment_name=experiment_name, identity=lambda conn: conn.headers.get("x-employee"))
    async with client_for(app) as client:
        response = await answer(client, **{"X-Employee": "emp-42", "X-User-ID": "ignored"})
        trace_id = response.headers[TRACE_HEADER]
        sent = await client.post(
            f"/feedback?trace_id={trace_id}", json={"is_correct": True}, headers={"X-Employee": "emp-42"}
        )
        assert sent.status_code in (200, 202), sent.text
    assert get_trace(trace_id).info.request_metadata["mlflow.trace.user"] == "emp-42"
    assert feedback_on(trace_id, "user_feedback")["user_feedback"].source.source_id == "emp-42"


# -- one vote per user, idempotent retries ---------------------------------------------------------


async def test_a_user_voting_again_overrides_their_vote_and_others_keep_theirs(experiment_name: str) -> None:
    async with client_for(build_app(experiment_name=experiment_name)) as client:
        trace_id = (await answer(client)).headers[TRACE_HEADER]
        get_trace(trace_id)
        votes = [
            ("alice", {"is_correct": True, "comment": "nice"}),
            ("bob", {"is_correct": True}),
            ("alice", {"is_correct": False, "comment": "actually wrong"}),
            (None, {"is_correct": True}),
            (None, {"is_correct": False}),
            ("alice", {"ratings": {"accuracy": 2}}),
            ("alice", {"ratings": {"accuracy": 4}}),
        ]
        for user, body in votes:
            headers = {"X-User-ID": user} if user else {}
            response = await client.post(f"/feedback?trace_id={trace_id}", json=body, headers=headers)
            assert response.status_code == 200, response.text
    by_source: dict[tuple[str, str], list[Any]] = {}
    history = human_feedback(trace_id)
    for a in history:
        if a.valid:  # the current vote; MLflow keeps the ones it overrode, invalid
            by_source.setdefault((a.source.source_id, a.name), []).append(a.value)
    by_source = {key: sorted(values) for key, values in by_source.items()}
    assert by_source == {
        ("alice", "user_feedback"): [False],
        ("bob", "user_feedback"): [True],
        ("anonymous", "user_feedback"): [False],  # one anonymous voter per answer: the last vote counts
        ("alice", "user_accuracy"): [0.8],
    }
    assert sorted(a.value for a in history if not a.valid) == [0.4, True, True]  # alice's 👍 and 2, anonymous 👍
    alice = next(a for a in history if a.source.source_id == "alice" and a.name == "user_feedback" and a.valid)
    assert alice.rationale == "actually wrong"


async def test_an_idempotency_key_makes_retries_write_once(experiment_name: str) -> None:
    app = build_app(experiment_name=experiment_name)
    async with client_for(app) as client:
        trace_id = (await answer(client)).headers[TRACE_HEADER]
        body = {"is_correct": True, "comment": "retry me"}
        headers = {"Idempotency-Key": "click-7f3a", "X-User-ID": "erin"}
        first = await client.post(f"/feedback?trace_id={trace_id}", json=body, headers=headers)
        second = await client.post(f"/feedback?trace_id={trace_id}", json=body, headers=headers)
        changed = await client.post(f"/feedback?trace_id={trace_id}", json={"is_correct": False}, headers=headers)
        bad_key = await client.post(f"/feedback?trace_id={trace_id}", json=body, headers={"Idempotency-Key": "x" * 300})
        await asyncio.to_thread(outbox_drained, app)  # a duplicate would have been written by now
    assert first.status_code in (200, 202) and second.status_code in (200, 202), (first.text, second.text)
    assert second.headers["idempotent-replayed"] == "true"
    assert second.json()["feedback_id"] == first.json()["feedback_id"]
    assert changed.status_code == 422 and changed.json()["errors"][0]["field"] == "Idempotency-Key"
    assert bad_key.status_code == 400
    feedback_on(trace_id, "user_feedback")
    assert [(a.source.source_id, a.value) for a in human_feedback(trace_id)] == [("erin", True)]


# -- limits ----------------------------------------------------------------------------------------


async def test_an_oversized_body_is_refused_before_it_is_read(experiment_name: str) -> None:
    app = build_app(experiment_name=experiment_name, max_feedback_body_bytes=1024)
    received: list[dict[str, Any]] = []
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        message = {"type": "http.request", "body": b"x" * 1024, "more_body": True}
        received.append(message)
        return message

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    headers = [(b"content-type", b"application/json"), (b"content-length", b"10000000")]
    scope = http_scope("POST", "/feedback", b"trace_id=tr-0123", headers)
    await app(scope, receive, send)
    assert sent[0]["status"] == 413 and received == []
    # Without a declared length (chunked), reading stops at the cap.
    scope["headers"] = [(b"content-type", b"application/json")]
    sent.clear()
    await app(scope, receive, send)
    assert sent[0]["status"] == 413 and len(received) == 2


async def test_field_caps_name_the_field(experiment_name: str) -> None:
    limits = FeedbackLimits(
        max_text_chars=100, max_metadata_entries=2, max_metadata_bytes=200, max_ratings=2, max_value_bytes=64
    )
    app = build_app(experiment_name=experiment_name, feedback_limits=limits)
    bodies = {
        "comment": {"is_correct": True, "comment": "é" * 101},
        "metadata": {"is_correct": True, "metadata": {"a": 1, "b": 2, "c": 3}},
        "ratings": {"ratings": {"a": 1, "b": 2, "c": 3}},
        "value": {"name": "tags", "value": ["x" * 30, "y" * 30, "z"]},
    }
    async with client_for(app) as client:
        trace_id = (await answer(client)).headers[TRACE_HEADER]
        for field, body in bodies.items():
            response = await client.post(f"/feedback?trace_id={trace_id}", json=body)
            assert response.status_code == 422, (field, response.text)
            assert response.json()["errors"][0]["field"] == field
        outbox = await asyncio.to_thread(outbox_drained, app)
    assert outbox["delivered"] == 0 and outbox["failed"] == 0  # nothing was accepted, so nothing is written
    assert human_feedback(trace_id) == []


async def test_the_rate_limit_answers_429_with_retry_after(experiment_name: str) -> None:
    limited = build_app(experiment_name=experiment_name, rate_limit=RateLimit(per_second=0.5, burst=3))
    async with client_for(limited) as client:
        codes = [(await client.post("/feedback", json={})).status_code for _ in range(5)]
        refused = await client.post("/feedback", json={})
    assert codes == [422, 422, 422, 429, 429]
    assert refused.status_code == 429 and refused.headers["retry-after"] == "2"
    async with client_for(build_app(experiment_name=experiment_name, rate_limit=None)) as client:
        assert {(await client.post("/feedback", json={})).status_code for _ in range(80)} == {422}


# -- browsers --------------------------------------------------------------------------------------


async def test_behind_cors_middleware_browsers_can_preflight_and_read_the_ids(experiment_name: str) -> None:
    app = build_app(experiment_name=experiment_name, feedback_secret=SECRET)
    # The configuration the README gives: added last, so it runs outermost.
    app.add_middleware(
        CORSMiddleware,
        allow_origins=["https://chat.example.com"],
        allow_methods=["GET", "POST"],
        allow_headers=["Content-Type", "X-MLflow-Feedback-Token", "X-Request-ID", "X-User-ID", "Idempotency-Key"],
        expose_headers=["X-MLflow-Trace-Id", "X-Request-ID", "X-MLflow-Feedback-Token"],
    )
    origin = {"Origin": "https://chat.example.com"}
    async with client_for(app) as client:
        preflight = await client.options(
            "/feedback",
            headers={
                **origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type,x-mlflow-feedback-token,idempotency-key",
            },
        )
        chat = await answer(client, **origin)
        feedback = await client.post(
            f"/feedback?trace_id={chat.headers[TRACE_HEADER]}",
            json={"is_correct": True},
            headers={**origin, TOKEN_HEADER: chat.headers[TOKEN_HEADER]},
        )
    assert preflight.status_code == 200
    assert "x-mlflow-feedback-token" in preflight.headers["access-control-allow-headers"].lower()
    exposed = chat.headers["access-control-expose-headers"].lower()
    assert {"x-mlflow-trace-id", "x-request-id", "x-mlflow-feedback-token"} <= set(exposed.replace(" ", "").split(","))
    assert feedback.status_code in (200, 202) and feedback.headers["access-control-allow-origin"] == origin["Origin"]


# -- capture hygiene -------------------------------------------------------------------------------


async def test_credentials_and_redacted_fields_never_reach_the_trace(experiment_name: str) -> None:
    app = build_app(
        experiment_name=experiment_name, feedback_secret=SECRET, redact_fields=["password", "API-Key", "card"]
    )
    body = {"message": "hi", "password": "hunter2-pw", "profile": [{"api_key": "sk-live-999"}], "card": {"n": "4111"}}
    async with client_for(app) as client:
        response = await client.post(
            "/echo?password=query-pw&q=ok",
            json=body,
            headers={"Authorization": "Bearer auth-secret-123", "Cookie": "session=cookie-secret-456"},
        )
    trace = get_trace(response.headers[TRACE_HEADER])
    stored = json.dumps(trace.to_dict())
    for secret in ("hunter2-pw", "sk-live-999", "4111", "query-pw", "auth-secret-123", "cookie-secret-456"):
        assert secret not in stored, secret
    assert response.headers[TOKEN_HEADER] not in stored
    span = next(s for s in trace.data.spans if s.parent_id is None)
    assert span.inputs["body"]["password"] == "[REDACTED]"
    assert span.inputs["body"]["profile"] == [{"api_key": "[REDACTED]"}]
    assert span.inputs["query"] == {"password": "[REDACTED]", "q": "ok"}
    assert span.outputs["body"]["received"]["password"] == "[REDACTED]"
    assert span.inputs["body"]["message"] == "hi"


# -- comment hygiene -------------------------------------------------------------------------------


async def test_personal_data_in_comments_never_reaches_mlflow(experiment_name: str) -> None:
    """What a user pastes into a comment (an email, a card number, an API key) is replaced before it is stored,
    in the rationale and in free-text values; declared choices are kept; `comment_scrubber=None` turns it off."""
    schema = FeedbackSchema(Text("correction"), Categorical("reason", {"wrong": None, "other": None}))
    app = build_app(experiment_name=experiment_name, feedback_schema=schema, rate_limit=None)
    raw = build_app(experiment_name=experiment_name, comment_scrubber=None)
    async with client_for(app) as client, client_for(raw) as raw_client:
        trace_id = (await answer(client)).headers[TRACE_HEADER]
        comment = "wrong total, mail ann@example.com, card 4111 1111 1111 1111"
        for body in (
            {"name": "reason", "value": "wrong", "comment": comment},
            {"name": "correction", "value": "it is 42; my key is sk-abcdefghijklmnopqrstuv"},
        ):
            vote = await client.post(f"/feedback?trace_id={trace_id}", json=body, headers={"X-User-ID": "ann"})
            assert vote.status_code in (200, 202), vote.text
        kept_id = (await answer(raw_client)).headers[TRACE_HEADER]
        kept = await raw_client.post(f"/feedback?trace_id={kept_id}", json={"is_correct": False, "comment": comment})
        assert kept.status_code in (200, 202), kept.text
        await asyncio.to_thread(outbox_drained, app)
        await asyncio.to_thread(outbox_drained, raw)
    stored = {a.name: a for a in human_feedback(trace_id)}
    assert stored["reason"].value == "wrong"
    assert stored["reason"].rationale == "wrong total, mail [email], card [card]"
    assert stored["reason"].metadata["mlflow_feedback.scrubbed"] == "card,email"
    assert stored["correction"].value == "it is 42; my key is [secret]"
    assert "ann@example.com" not in str(get_trace(trace_id).info.assessments)
    [unscrubbed] = human_feedback(kept_id)
    assert unscrubbed.rationale == comment
