"""Routing flagged feedback into an MLflow review queue: the demo app under the full mlflow package against the
real tracking server (queue and label schemas created, only negative or commented answers queued, a replayed vote
queued once), and under mlflow-tracing alone (off, with one clear warning, delivery untouched)."""

from __future__ import annotations

import json
import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .apps import build_app
from .support import (
    ROOT,
    MlflowServer,
    client_for,
    full_mlflow_python,
    get_trace,
    outbox_drained,
    serve_demo,
    wait_until,
)

QUEUE = "flagged-by-users"
TOKEN_HEADER = "x-mlflow-feedback-token"
TRACE_HEADER = "x-mlflow-trace-id"


@pytest.fixture
def full_mlflow_demo(mlflow_server: MlflowServer, experiment_name: str, tmp_path: Path) -> Iterator[str]:
    """examples/chat_app.py served by the full mlflow environment, with `MLFLOW_FEEDBACK_REVIEW_QUEUE` set."""
    review = {"MLFLOW_FEEDBACK_REVIEW_QUEUE": QUEUE}
    with serve_demo(full_mlflow_python(), mlflow_server.url, experiment_name, tmp_path, review, timeout=90) as url:
        yield url


def test_negative_and_commented_answers_reach_the_review_queue(
    full_mlflow_demo: str, mlflow_server: MlflowServer
) -> None:
    with httpx.Client(base_url=full_mlflow_demo, timeout=60) as client:
        turns = [client.post("/chat", json={"message": f"question {i}"}) for i in range(5)]
        ids = [turn.headers[TRACE_HEADER] for turn in turns]
        for trace_id in ids:
            get_trace(trace_id)
        votes = [
            {"is_correct": True},  # liked: not for review
            {"is_correct": False},  # disliked: for review
            {"is_correct": True, "comment": "right, but far too long"},  # a comment: for review
            {"signal": "regenerated"},  # a signal is not feedback a reviewer checks
            {"is_correct": False, "comment": "wrong product"},
        ]
        for turn, body in zip(turns, votes, strict=True):
            token = {TOKEN_HEADER: turn.headers[TOKEN_HEADER], "Idempotency-Key": f"k-{turn.headers[TRACE_HEADER]}"}
            sent = client.post("/feedback", json=body, headers=token)
            assert sent.status_code in (200, 202), sent.text
        again = client.post("/feedback", json=votes[1], headers={TOKEN_HEADER: turns[1].headers[TOKEN_HEADER]})
        assert again.status_code in (200, 202)  # a second 👎 by the same voter: queued once all the same

        def routed() -> bool:
            health = client.get("/feedback/health").json()
            return health["outbox"]["pending"] == 0 and health["review"]["routed"] + health["review"]["failed"] >= 4

        wait_until(routed, 60, "the flagged answers routed")
        review = client.get("/feedback/health").json()["review"]
    assert review == {"queue": QUEUE, "disabled": None, "routed": 4, "failed": 0}

    experiment_id = get_trace(ids[0]).info.experiment_id
    listed = subprocess.run(
        [str(full_mlflow_python()), "-m", "tests.scripts.review_queue_items", mlflow_server.url, experiment_id, QUEUE],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert listed.returncode == 0, listed.stderr[-3000:]
    queue = json.loads(listed.stdout.strip().splitlines()[-1])
    assert queue["items"] == sorted([ids[1], ids[2], ids[4]])
    # The demo declares the thumbs and the implicit signals: reviewers get the thumbs, never the signals.
    assert queue["labels"] == {"review.user_feedback": "InputPassFail"}


@pytest.mark.anyio
async def test_without_the_full_mlflow_package_routing_is_off_with_one_warning(
    experiment_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="mlflow_feedback_middleware")
    app = build_app(experiment_name=experiment_name, review_queue=QUEUE)
    async with client_for(app) as client:
        trace_id = (await client.post("/chat", json={"message": "hi"})).headers[TRACE_HEADER]
        sent = await client.post(f"/feedback?trace_id={trace_id}", json={"is_correct": False, "comment": "bad"})
        health = (await client.get("/feedback/health")).json()
    assert sent.status_code in (200, 202)
    outbox_drained(app)
    warnings = [r.getMessage() for r in caplog.records if "review_queue" in r.getMessage()]
    assert len(warnings) == 1 and "install the full mlflow package, 3.14 or later" in warnings[0], warnings
    assert health["review"]["disabled"] and health["review"]["routed"] == 0
