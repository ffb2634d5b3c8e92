"""Declared feedback schemas: validation and normalisation on the route, the schema route, files, reports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mlflow_feedback_middleware import Binary, Categorical, Choice, FeedbackSchema, Scale, Text
from mlflow_feedback_middleware.insight.report import TracedRequest, Vote, summarize

from .apps import build_app
from .support import client_for, get_trace
from .test_feedback import feedback_on

pytestmark = pytest.mark.anyio

SCHEMA = FeedbackSchema(
    Binary("user_feedback"),
    Scale("accuracy", min=1, max=5),
    Scale("clarity", min=0, max=10, step=0.5),
    Categorical("issue", {"wrong": Choice(score=0, polarity="negative"), "slow": None, "great": Choice(1, "positive")}),
    Text("correction", max_length=40),
)

TOML = """
[[feedback]]
type = "binary"
name = "user_feedback"

[[feedback]]
type = "scale"
name = "accuracy"
min = 1
max = 5

[[feedback]]
type = "scale"
name = "clarity"
min = 0
max = 10
step = 0.5

[[feedback]]
type = "categorical"
name = "issue"
choices = { wrong = { score = 0, polarity = "negative" }, slow = "", great = { score = 1, polarity = "positive" } }

[[feedback]]
type = "text"
name = "correction"
max_length = 40
"""


def test_a_schema_file_is_the_same_schema(tmp_path: Path) -> None:
    (tmp_path / "feedback.toml").write_text(TOML)
    (tmp_path / "feedback.json").write_text(json.dumps(SCHEMA.to_dict()))
    assert FeedbackSchema.load(tmp_path / "feedback.toml").to_dict() == SCHEMA.to_dict()
    with pytest.raises(ValueError, match="type must be one of"):
        FeedbackSchema.from_dict({"feedback": [{"type": "stars", "name": "x"}]})
    with pytest.raises(ValueError, match="declared twice"):
        FeedbackSchema(Binary(), Binary())


async def test_the_route_validates_and_normalises_against_the_schema(experiment_name: str, tmp_path: Path) -> None:
    (tmp_path / "feedback.toml").write_text(TOML)
    app = build_app(experiment_name=experiment_name, feedback_schema=str(tmp_path / "feedback.toml"), rate_limit=None)
    async with client_for(app) as client:
        schema = (await client.get("/feedback/schema")).json()
        assert schema["declared"] is True  # what the browser client reads before it draws the scales
        assert [f["name"] for f in schema["feedback"]] == [
            "user_feedback",
            "accuracy",
            "clarity",
            "issue",
            "correction",
        ]
        answers = [
            (await client.post("/chat", json={"message": f"q{i}"})).headers["x-mlflow-trace-id"] for i in range(4)
        ]
        for trace_id in answers:
            get_trace(trace_id)

        async def send(trace_id: str, body: dict[str, Any], user: str = "u1") -> Any:
            return await client.post(f"/feedback?trace_id={trace_id}", json=body, headers={"X-User-ID": user})

        refused = {
            "is_correct": {"is_correct": "maybe"},
            "ratings.accuracy": {"ratings": {"accuracy": 4.5}},
            "ratings.clarity": {"ratings": {"clarity": 10.25}},
            "ratings.speed": {"ratings": {"speed": 3}},
            "name": {"name": "mood", "value": "ok"},
            "value": {"name": "issue", "value": "meh"},
        }
        for field, body in refused.items():
            response = await send(answers[0], body)
            assert response.status_code == 422, (field, response.text)
            assert response.json()["errors"][0]["field"] == field, response.json()
        assert "wrong, slow, great" in (await send(answers[0], refused["value"])).json()["message"]
        too_long = await send(answers[0], {"name": "correction", "value": "x" * 41})
        assert too_long.status_code == 422 and "at most 40" in too_long.json()["message"]

        for i, thumbs in enumerate(("👍", "down", 1, "true")):
            assert (await send(answers[i], {"is_correct": thumbs}, user=f"t{i}")).status_code == 200
        assert (await send(answers[0], {"ratings": {"accuracy": 4, "clarity": 7.5}})).status_code == 200
        assert (await send(answers[1], {"name": "issue", "value": "wrong", "comment": "outdated"})).status_code == 200
        assert (await send(answers[2], {"name": "correction", "value": "the right answer"})).status_code == 200
    first = feedback_on(answers[0], "user_feedback", "user_accuracy", "user_clarity")
    assert first["user_feedback"].value is True
    assert first["user_accuracy"].value == pytest.approx(0.8) and first["user_accuracy"].metadata["raw_rating"] == "4"
    assert first["user_clarity"].value == pytest.approx(0.75)
    assert [feedback_on(answers[i], "user_feedback")["user_feedback"].value for i in (1, 2, 3)] == [False, True, True]
    issue = feedback_on(answers[1], "issue")["issue"]
    assert (issue.value, issue.rationale) == ("wrong", "outdated")
    assert {k: issue.metadata[k] for k in ("score", "polarity")} == {"score": "0", "polarity": "negative"}
    assert feedback_on(answers[2], "correction")["correction"].value == "the right answer"


async def test_without_a_schema_the_route_describes_the_guides_shapes(experiment_name: str) -> None:
    async with client_for(build_app(experiment_name=experiment_name)) as client:
        schema = (await client.get("/feedback/schema")).json()
    assert schema["declared"] is False and schema["feedback"][0] == {"type": "binary", "name": "user_feedback"}


def test_reports_take_polarity_from_the_schema() -> None:
    def request(*votes: tuple[str, Any]) -> TracedRequest:
        return TracedRequest("tr-1", 0, None, None, None, [Vote("tr-1", n, v, "u", None, 0) for n, v in votes])

    requests = [request(("issue", "wrong")), request(("issue", "great")), request(("issue", "slow")), request()]
    with_schema = summarize(requests, SCHEMA)
    assert (with_schema["positive_count"], with_schema["negative_count"]) == (1, 1)
    assert with_schema["traces_with_feedback"] == 3 and with_schema["feedback_rate"] == 75
    assert with_schema["categories"] == {"issue": {"wrong": 1, "great": 1, "slow": 1}}
    without = summarize(requests)
    assert (without["positive_count"], without["negative_count"]) == (0, 0)
    assert without["categories"] == {"issue": {"wrong": 1, "great": 1, "slow": 1}}
