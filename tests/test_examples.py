"""The numbered examples (examples/0*.py) run as their docstrings say: each serves its route traced, and takes a
vote on the answer, against the real tracking server."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest

from .support import ROOT, client_for, get_trace, outbox_drained

pytestmark = pytest.mark.anyio
EXAMPLES = sorted((ROOT / "examples").glob("0*.py"))


def load(path: Path, experiment_name: str) -> Any:
    source = path.read_text().replace('experiment_name="', f'experiment_name="{experiment_name}-')
    module = type(sys)(path.stem)
    exec(compile(source, str(path), "exec"), module.__dict__)
    return module.app


def test_there_are_numbered_examples() -> None:
    assert [p.name for p in EXAMPLES][:4] == [
        "01_quickstart.py",
        "02_streaming.py",
        "03_signed_feedback.py",
        "04_feedback_schema.py",
    ]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
async def test_each_example_traces_its_answer_and_takes_a_vote(path: Path, experiment_name: str) -> None:
    app = load(path, experiment_name)
    async with client_for(app) as client:
        if "stream" in path.stem:
            answer = await client.post("/chat/stream", json={"message": "hello there"})
            assert "event: mlflow_trace" in answer.text
        else:
            answer = await client.post("/chat", json={"message": "hi"}, headers={"X-User-ID": "ann"})
        trace_id = answer.headers["x-mlflow-trace-id"]
        headers = {"X-MLflow-Feedback-Token": answer.headers.get("x-mlflow-feedback-token", "")}
        body: dict[str, Any] = {"is_correct": True, "comment": "ok"}
        if "schema" in path.stem:
            body = {"ratings": {"accuracy": 4}, "name": "reason", "value": "outdated"}
            bad = await client.post(
                f"/feedback?trace_id={trace_id}", json={"ratings": {"accuracy": 9}}, headers=headers
            )
            assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "ratings.accuracy"
        vote = await client.post(f"/feedback?trace_id={trace_id}", json=body, headers=headers)
        assert vote.status_code in (200, 202), vote.text
        # 202 under load: the vote is still on its way from the outbox.
        await asyncio.to_thread(outbox_drained, app)
    votes = [a for a in get_trace(trace_id).info.assessments if a.source.source_type == "HUMAN"]
    assert votes, "the vote was not stored"
