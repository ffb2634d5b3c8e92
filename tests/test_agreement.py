"""Users versus judges against a real tracking server: votes sent through the feedback route (changed, withdrawn,
tied among users), an LLM judge's feedback logged the way MLflow's judges log it (one overridden by a reviewer, one
errored), and a code scorer run by `mlflow.genai.evaluate` itself; the figures computed independently here."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import mlflow
import pytest
from mlflow.entities import AssessmentSource

from mlflow_feedback_middleware.insight.cli import main

from .apps import build_app
from .support import ROOT, MlflowServer, client_for, full_mlflow_python, get_trace, outbox_drained

N = 36
JUDGE = AssessmentSource(source_type="LLM_JUDGE", source_id="openai:/gpt-4o-mini")
REVIEWER = AssessmentSource(source_type="HUMAN", source_id="reviewer")


def user_votes(i: int) -> list[tuple[str, bool]]:
    """The (user, vote) pairs each answer gets, in order; the users' verdict is their majority."""
    if i % 6 == 0:
        return []
    verdict = i % 4 in (1, 2)
    if i % 10 == 3:  # two users who disagree: no verdict
        return [("ann", True), ("bob", False)]
    if i % 7 == 2:  # three users, one dissenting
        return [("ann", verdict), ("bob", verdict), ("cid", not verdict)]
    return [("ann", verdict)]


def llm_judge(i: int) -> str | None:
    """The LLM judge's stored, valid verdict; None where it has none (errored, or overridden by a reviewer)."""
    if i % 9 == 4 or i % 8 == 1:
        return None
    return "no" if i % 5 == 0 else "yes"


def expected(judge_of: dict[int, bool | None], users_of: dict[int, bool | None]) -> dict[str, Any]:
    """The confusion matrix, agreement and kappa, counted here from the plan (kappa by the closed 2x2 form)."""
    a = b = c = d = 0
    disagreeing = []
    for i in range(N):
        users, judge = users_of[i], judge_of[i]
        if users is None or judge is None:
            continue
        a += users and judge
        b += users and not judge
        c += (not users) and judge
        d += (not users) and not judge
        if users != judge:
            disagreeing.append(i)
    n = a + b + c + d
    kappa = 2 * (a * d - b * c) / ((a + b) * (b + d) + (a + c) * (c + d))
    return {"cells": (a, b, c, d), "rate": (a + d) / n * 100, "kappa": kappa, "n": n, "disagreeing": disagreeing}


def majority(votes: list[tuple[str, bool]]) -> bool | None:
    up = sum(1 for _, v in votes if v)
    down = len(votes) - up
    return None if up == down else up > down


@pytest.mark.anyio
async def test_agreement_of_users_with_an_llm_judge_and_a_code_scorer(
    experiment_name: str, mlflow_server: MlflowServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The traces are exported before the votes: each vote's answer is its written outcome (200), never a 202.
    app = build_app(experiment_name=experiment_name, rate_limit=None, feedback_sync_seconds=30.0)
    async with client_for(app) as client:
        ids = []
        for i in range(N):
            response = await client.post("/chat", json={"message": f"question {i}"})
            ids.append(response.headers["x-mlflow-trace-id"])
        for trace_id in ids:
            get_trace(trace_id)
        for i, trace_id in enumerate(ids):
            for user, vote in user_votes(i):
                url = f"/feedback?trace_id={trace_id}&user_id={user}"
                if i % 11 == 5:  # changed their mind first: only the last vote counts
                    assert (await client.post(url, json={"is_correct": not vote})).status_code == 200
                assert (await client.post(url, json={"is_correct": vote})).status_code == 200
            if i % 13 == 7:  # a user who voted, then withdrew: not counted
                url = f"/feedback?trace_id={trace_id}&user_id=dan"
                assert (await client.post(url, json={"is_correct": i % 2 == 0})).status_code == 200
                assert (await client.post(url, json={"retract": True})).status_code == 200
        outbox_drained(app)

    for i, trace_id in enumerate(ids):
        if i % 9 == 4:
            mlflow.log_feedback(trace_id=trace_id, name="correctness", error="judge timed out", source=JUDGE)
            continue
        judged = mlflow.log_feedback(
            trace_id=trace_id, name="correctness", value="no" if i % 5 == 0 else "yes", rationale=f"j{i}", source=JUDGE
        )
        if i % 8 == 1:  # a reviewer corrected the judge: the judge's verdict is no longer valid
            mlflow.override_feedback(trace_id=trace_id, assessment_id=judged.assessment_id, value="no", source=REVIEWER)
    experiment_id = get_trace(ids[0]).info.experiment_id
    scored = subprocess.run(
        [str(full_mlflow_python()), "-m", "tests.scripts.score_traces", mlflow_server.url, experiment_id],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert scored.returncode == 0, scored.stderr[-3000:]
    outcome = json.loads(scored.stdout.strip().splitlines()[-1])
    assert outcome["rows"] == N and outcome["unscored"] == 0, outcome

    users_of = {i: majority(user_votes(i)) for i in range(N)}
    judges = {
        "correctness (openai:/gpt-4o-mini)": {i: None if (v := llm_judge(i)) is None else v == "yes" for i in range(N)},
        "on_topic (on_topic)": {i: i % 3 != 0 for i in range(N)},
    }
    html = tmp_path / "report.html"
    args = ["report", "--experiment", experiment_name, "--tracking-uri", mlflow_server.url, "--agreement"]
    capsys.readouterr()
    assert main([*args, "--format", "json", "--html", str(html)]) == 0
    figures = json.loads(capsys.readouterr().out)["agreement"]
    assert figures["traces_with_both"] == sum(1 for i in range(N) if users_of[i] is not None)
    assert figures["traces_with_tied_users"] == sum(1 for i in range(N) if user_votes(i) and users_of[i] is None)
    assert set(figures["judges"]) == set(judges)
    for judge, verdicts in judges.items():
        want, got = expected(verdicts, users_of), figures["judges"][judge]
        a, b, c, d = want["cells"]
        assert got["confusion"] == {
            "users_positive": {"judge_pass": a, "judge_fail": b},
            "users_negative": {"judge_pass": c, "judge_fail": d},
        }, judge
        assert got["traces_compared"] == want["n"] and got["unreadable_values"] == 0
        assert got["agreement_rate"] == pytest.approx(want["rate"])
        assert got["cohens_kappa"] == pytest.approx(want["kappa"])
        assert got["disagreement_count"] == len(want["disagreeing"])
        assert {d["trace_id"] for d in got["disagreements"]} <= {ids[i] for i in want["disagreeing"]}

    page = html.read_text()
    assert "Users versus judges" in page and "correctness (openai:/gpt-4o-mini)" in page
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "Users versus judges" in table and "on_topic (on_topic)" in table and "kappa" in table
