"""An attacker's afternoon, against the real tracking server: each test is one hole of the security review
(poison IDs, traversal, redaction bypasses, request-ID hijack, cross-site votes, vote stuffing, token
malleability, unthrottled reads, outbox hygiene), and fails on the code before its fix."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, WebSocket
from fastapi.testclient import TestClient
from mlflow.exceptions import MlflowException

import mlflow_feedback_middleware.delivery.outbox as outbox_module
from mlflow_feedback_middleware import FeedbackSchema, MlflowFeedbackMiddleware, RateLimit, traced_turn
from mlflow_feedback_middleware.delivery.outbox import Item, Outbox
from mlflow_feedback_middleware.delivery.writer import MlflowFeedbackWriter
from mlflow_feedback_middleware.intake.schema import Binary

from .apps import build_app
from .support import client_for, get_trace, http_scope, root_span
from .test_security import SECRET, TOKEN_HEADER, TRACE_HEADER, answer, human_feedback

pytestmark = pytest.mark.anyio


# -- poison items and traversal --------------------------------------------------------------------

TRAVERSAL = "tr-1/../../../../2.0/mlflow/experiments/get"


@pytest.mark.parametrize("trace_id", ["trace:/c.s/p1", TRAVERSAL, "tr-" + "0" * 31, "../" + "a" * 32])
async def test_trace_ids_of_no_form_mlflow_issues_never_reach_the_server(experiment_name: str, trace_id: str) -> None:
    async with client_for(build_app(experiment_name=experiment_name)) as client:
        response = await client.post("/feedback", params={"trace_id": trace_id}, json={"is_correct": True})
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "trace_id"


async def test_ids_the_server_refuses_fail_at_once_and_never_delay_a_genuine_vote(experiment_name: str) -> None:
    """Unity-Catalog-shaped IDs pass the form check, and an OSS server answers them with an error that is
    not "not found": each is refused on its own, the queue moves on, health stays about the backend."""
    app = build_app(experiment_name=experiment_name, feedback_wait_seconds=5)
    async with client_for(app) as client:
        trace_id = (await answer(client)).headers[TRACE_HEADER]
        get_trace(trace_id)
        poison = [
            await client.post("/feedback", params={"trace_id": f"trace:/c.s/{i:032x}"}, json={"is_correct": True})
            for i in range(10)
        ]
        genuine = await client.post(f"/feedback?trace_id={trace_id}", json={"is_correct": True})
        health = await client.get("/feedback/health")
    assert [p.status_code for p in poison] == [422] * 10
    assert all("404 != 200" not in p.text and "/api/" not in p.text for p in poison)  # no backend text
    assert genuine.status_code == 200, genuine.text
    assert health.status_code == 200, health.text


async def test_an_item_the_server_errs_on_is_retried_alone_while_the_rest_are_delivered(
    experiment_name: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A 5xx for one item while the server's health check passes is that item's problem: it backs off on its
    own, the items behind it go through, health stays 200, and each error is one log line."""
    app = build_app(experiment_name=experiment_name, feedback_sync_seconds=20)
    async with client_for(app) as client:
        poisoned = (await answer(client)).headers[TRACE_HEADER]
        healthy = (await answer(client)).headers[TRACE_HEADER]
        get_trace(poisoned)
        get_trace(healthy)
        real_log = MlflowFeedbackWriter.log_feedback

        def log_feedback(trace_id: str, *args: Any) -> Any:
            if trace_id == poisoned:  # the server's own 500 for this one item, multi-line as they come
                raise MlflowException("INTERNAL_ERROR: boom\nTraceback (most recent call last):\n  ...")
            return real_log(trace_id, *args)

        monkeypatch.setattr(MlflowFeedbackWriter, "log_feedback", staticmethod(log_feedback))
        with caplog.at_level(logging.WARNING, logger="mlflow_feedback_middleware"):
            first = await client.post(f"/feedback?trace_id={poisoned}", json={"is_correct": True})
            second = await client.post(f"/feedback?trace_id={healthy}", json={"is_correct": True})
            health = await client.get("/feedback/health")
    assert first.status_code == 202, first.text
    assert second.status_code == 200, second.text
    assert health.status_code == 200 and health.json()["outbox"]["retrying_item_errors"] == 1
    lines = [r.getMessage() for r in caplog.records if first.json()["feedback_id"] in r.getMessage()]
    assert lines and all("\n" not in line for line in lines)


async def test_the_status_route_never_shows_the_tracking_servers_error_text(experiment_name: str) -> None:
    async with client_for(build_app(experiment_name=experiment_name, feedback_wait_seconds=0)) as client:
        refused = await client.post("/feedback", params={"trace_id": "trace:/c.s/" + "a" * 32}, json={"is_correct": 1})
        assert refused.status_code == 422
        assert refused.json()["message"] == "the tracking server refused this feedback"


# -- redaction ---------------------------------------------------------------------------------------


async def test_secrets_are_redacted_whatever_shape_the_body_has(experiment_name: str) -> None:
    app = build_app(experiment_name=experiment_name, max_capture_bytes=300)
    secrets = {
        "OPENAI_API_KEY": "sk-one",
        "x-api-key": "key-two",
        "aws_secret_access_key": "aws-three",
        "passwordConfirm": "pw-four",
        "credentials": {"user": "u", "pass": "cred-five"},
        "session_token": "tok-six",
        "client_secret": "cs-seven",
    }
    async with client_for(app) as client:
        named = await client.post("/echo", json={**secrets, "max_tokens": 5})
        cut = await client.post("/sink", json={"password": "hunter-cut", "padding": "x" * 500})
        broken = await client.post(
            "/sink", content=b'{"password": "hunter-broken", ', headers={"content-type": "application/json"}
        )
        plain = await client.post(
            "/sink", content=b"user=a&password=hunter-plain", headers={"content-type": "text/plain"}
        )
    stored = json.dumps(root_span(get_trace(named.headers[TRACE_HEADER])).inputs)
    for value in ("sk-one", "key-two", "aws-three", "pw-four", "cred-five", "tok-six", "cs-seven"):
        assert value not in stored
    assert '"max_tokens": 5' in stored  # not a secret
    for response, value in ((cut, "hunter-cut"), (broken, "hunter-broken"), (plain, "hunter-plain")):
        text = json.dumps(root_span(get_trace(response.headers[TRACE_HEADER])).inputs)
        assert value not in text and "[REDACTED]" in text


def test_websocket_turn_outputs_are_redacted(experiment_name: str) -> None:
    app = FastAPI()

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        message = await websocket.receive_text()
        async with traced_turn(websocket, inputs={"message": message}) as turn:
            turn.set_outputs({"answer": "ok", "api_key": "sk-from-a-tool"})

    app.add_middleware(MlflowFeedbackMiddleware, experiment_name=experiment_name)
    with TestClient(app) as client, client.websocket_connect("/ws") as websocket:
        websocket.send_text("hi")
        trace_id = websocket.receive_json()["trace_id"]
    assert root_span(get_trace(trace_id)).outputs == {"answer": "ok", "api_key": "[REDACTED]"}


# -- client request IDs --------------------------------------------------------------------------------


async def test_a_client_chosen_request_id_never_says_whose_answer_a_vote_is_for(experiment_name: str) -> None:
    """The victim sends X-Request-ID: 544; the attacker votes by it, or answers a request of its own with it."""
    async with client_for(build_app(experiment_name=experiment_name, feedback_wait_seconds=5)) as client:
        victim = await answer(client, **{"X-Request-ID": "544"})
        by_attacker = await client.post("/feedback?client_request_id=544", json={"is_correct": False})
        ours = await answer(client)  # a request ID the service drew: unguessable, so it may name the answer
        by_own_id = await client.post(
            f"/feedback?client_request_id={ours.headers['x-request-id']}", json={"is_correct": True}
        )
        twice = [await answer(client, **{"X-Request-ID": "545"}) for _ in range(2)]  # one ID, two requests
        ambiguous = await client.post("/feedback?client_request_id=545", json={"is_correct": True})
    assert by_attacker.status_code == 403 and by_attacker.json()["errors"][0]["field"] == "client_request_id"
    assert by_own_id.status_code in (200, 202), by_own_id.text
    assert ambiguous.status_code == 409
    assert not human_feedback(victim.headers[TRACE_HEADER])
    # Another worker (a fresh middleware) knows only what the tracking server says: the same answers, once
    # it has every trace concerned (with one of the two "545" traces it would see no ambiguity yet).
    for response in (victim, *twice):
        get_trace(response.headers[TRACE_HEADER])
    async with client_for(build_app(experiment_name=experiment_name, feedback_wait_seconds=5)) as other:
        elsewhere = await other.post("/feedback?client_request_id=544", json={"is_correct": False})
        ambiguous_elsewhere = await other.post("/feedback?client_request_id=545", json={"is_correct": False})
    assert elsewhere.status_code == 403, elsewhere.text
    assert ambiguous_elsewhere.status_code == 409, ambiguous_elsewhere.text


# -- cross-site votes, vote stuffing, tokens ---------------------------------------------------------


async def test_a_cross_site_form_or_text_body_is_refused(experiment_name: str) -> None:
    async with client_for(build_app(experiment_name=experiment_name)) as client:
        trace_id = (await answer(client)).headers[TRACE_HEADER]
        forged = await client.post(
            f"/feedback?trace_id={trace_id}",
            content=b'{"is_correct": false, "comment": "csrf"}',
            headers={"content-type": "text/plain", "origin": "https://evil.example"},
        )
        form = await client.post(f"/feedback?trace_id={trace_id}", data={"is_correct": "false"})
    assert forged.status_code == 415 and forged.json()["errors"][0]["field"] == "Content-Type"
    assert form.status_code == 415
    assert not human_feedback(trace_id)


async def test_one_anonymous_token_is_one_vote_per_name(experiment_name: str) -> None:
    app = build_app(experiment_name=experiment_name, feedback_secret=SECRET)
    async with client_for(app) as client:
        response = await answer(client)
        trace_id, token = response.headers[TRACE_HEADER], response.headers[TOKEN_HEADER]
        get_trace(trace_id)
        for i in range(8):
            sent = await client.post("/feedback", json={"is_correct": i % 2 == 0}, headers={TOKEN_HEADER: token})
            assert sent.status_code == 200, sent.text
    votes = [a for a in human_feedback(trace_id) if a.name == "user_feedback"]
    assert [a.value for a in votes if a.valid] == [False]  # the last of the eight, once
    assert len(votes) == 8  # each earlier one kept by MLflow as overridden, never counted


async def test_with_a_schema_a_user_cannot_invent_feedback_names(experiment_name: str) -> None:
    schema = FeedbackSchema(Binary("helpful"))
    app = build_app(experiment_name=experiment_name, feedback_secret=SECRET, feedback_schema=schema)
    async with client_for(app) as client:
        response = await answer(client, **{"X-User-ID": "mallory"})
        token = response.headers[TOKEN_HEADER]
        invented = [
            await client.post(
                "/feedback",
                json={"name": f"name{i}", "value": True},
                headers={TOKEN_HEADER: token, "X-User-ID": "mallory"},
            )
            for i in range(5)
        ]
    assert [r.status_code for r in invented] == [422] * 5


@pytest.mark.parametrize("mutate", ["pad", "surrogate", "bits"])
async def test_a_token_has_one_spelling_and_odd_ones_are_401_not_500(experiment_name: str, mutate: str) -> None:
    app = build_app(experiment_name=experiment_name, feedback_secret=SECRET)
    async with client_for(app) as client:
        token = (await answer(client)).headers[TOKEN_HEADER]
    head, signature = token.rsplit(".", 1)
    if mutate == "pad":
        odd = token + "=="
    elif mutate == "bits":  # the last character's unused low bits changed: same bytes, another spelling
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        odd = f"{head}.{signature[:-1]}{alphabet[alphabet.index(signature[-1]) ^ 1]}"
    else:  # in the signed part, which is encoded before it is checked
        odd = f"{head[:-1]}\ud800.{signature}"
    body = json.dumps({"is_correct": True, "feedback_token": odd}, ensure_ascii=True).encode()
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = http_scope("POST", "/feedback", b"", [(b"content-type", b"application/json")])
    await app(scope, receive, send)
    assert sent[0]["status"] == 401, sent


async def test_reads_are_rate_limited_so_the_summary_token_cannot_be_guessed(experiment_name: str) -> None:
    app = build_app(
        experiment_name=experiment_name, summary_token="a-long-admin-token-0123", rate_limit=RateLimit(1, 5)
    )
    async with client_for(app) as client:
        guesses = [
            (await client.get("/feedback/summary", headers={"authorization": f"Bearer guess-{i}"})).status_code
            for i in range(20)
        ]
    assert guesses[:5] == [401] * 5
    assert 429 in guesses[5:]


# -- the outbox --------------------------------------------------------------------------------------


def test_the_outbox_is_private_bounded_and_purges_old_failures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "private" / "outbox.db"
    outbox = Outbox(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    monkeypatch.setattr(outbox_module, "MAX_PENDING", 3)
    items = [Item("dest", "tr-" + f"{i:032x}", None, "anonymous", [], False) for i in range(4)]
    for item in items[:3]:
        outbox.add(item, 60)
    with pytest.raises(outbox_module.OutboxFull):
        outbox.add(items[3], 60)
    items[0].state = outbox_module.FAILED
    outbox.save(items[0], next_at=0)
    assert outbox.purge_finished(7 * 86400, -1) == 1  # failed rows go too, after their own retention
    assert outbox.get(items[0].id) is None


async def test_a_full_outbox_answers_503_with_retry_after(
    experiment_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outbox_module, "MAX_PENDING", 0)
    async with client_for(build_app(experiment_name=experiment_name)) as client:
        trace_id = (await answer(client)).headers[TRACE_HEADER]
        full = await client.post(f"/feedback?trace_id={trace_id}", json={"is_correct": True})
    assert full.status_code == 503 and full.headers["retry-after"] == "60"
