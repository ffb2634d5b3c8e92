"""The report's arithmetic on traced requests built in memory: rates as MLflow's guide defines them, ratings,
categories, groups, time parsing. No server (tests/test_report.py runs the same over a real experiment)."""

from __future__ import annotations

import pytest

from mlflow_feedback_middleware.insight.report import (
    TracedRequest,
    Vote,
    build_report,
    group_key,
    parse_time,
    summarize,
)
from mlflow_feedback_middleware.intake.schema import FeedbackSchema

DAY = 86_400_000


def vote(
    name: str,
    value: object,
    rationale: str | None = None,
    time_ms: int = 0,
    user: str = "u",
    scale: float | None = None,
) -> Vote:
    return Vote("tr-1", name, value, user, rationale, time_ms, scale)


def request(*votes: Vote, time_ms: int = 0, route: str | None = "POST /chat", user: str | None = None) -> TracedRequest:
    return TracedRequest("tr-1", time_ms, route, user, None, list(votes))


def test_rates_follow_the_guides_definitions() -> None:
    """feedback_rate: requests with any feedback per request; positive_rate: positive thumbs per request with
    feedback (so a request with only a rating lowers it), both in percent."""
    rows = [
        request(vote("user_feedback", True)),
        request(vote("user_feedback", False, "wrong")),
        request(vote("user_accuracy", 0.8)),
        request(),
    ]
    report = summarize(rows)
    assert report["total_traces"] == 4 and report["traces_with_feedback"] == 3
    assert report["feedback_rate"] == 75.0
    assert report["positive_rate"] == pytest.approx(100 / 3)
    assert report["thumbs_positive_rate"] == 50.0  # of the thumbs votes, half are up
    assert (report["positive_count"], report["negative_count"]) == (1, 1)
    assert report["latest_negative_comments"][0]["comment"] == "wrong"


def test_no_requests_give_zero_rates_not_an_error() -> None:
    report = summarize([])
    assert report["feedback_rate"] == 0 and report["positive_rate"] == 0 and report["ratings"] == {}


def test_ratings_and_categories() -> None:
    rows = [request(vote("user_accuracy", 0.6), vote("user_accuracy", 1.0), vote("topic", "billing"))]
    rows.append(request(vote("user_accuracy", 1), vote("topic", "billing"), vote("topic", "login")))
    report = summarize(rows)
    accuracy = report["ratings"]["accuracy"]
    assert accuracy["count"] == 3 and accuracy["mean"] == pytest.approx(2.6 / 3) and accuracy["median"] == 1.0
    assert accuracy["distribution"] == {"0.6": 1, "1": 2}
    assert report["categories"] == {"topic": {"billing": 2, "login": 1}}


def test_a_schema_says_which_choices_are_positive() -> None:
    schema = FeedbackSchema.from_dict(
        {
            "feedback": [
                {
                    "type": "categorical",
                    "name": "verdict",
                    "choices": {"great": {"polarity": "positive"}, "bad": {"polarity": "negative"}},
                }
            ]
        }
    )
    rows = [request(vote("verdict", "great")), request(vote("verdict", "bad")), request(vote("verdict", "great"))]
    report = summarize(rows, schema)
    assert (report["positive_count"], report["negative_count"]) == (2, 1)
    assert report["positive_rate"] == pytest.approx(200 / 3)


def test_groups_by_day_route_and_user() -> None:
    rows = [
        request(vote("user_feedback", True), time_ms=0, user="ann"),
        request(vote("user_feedback", False), time_ms=DAY + 1, route="POST /other", user="ann"),
        request(time_ms=DAY + 2, route=None),
    ]
    by_day = build_report(rows, "day")
    assert list(by_day["groups"]) == ["1970-01-01", "1970-01-02"]
    assert by_day["groups"]["1970-01-02"]["feedback_rate"] == 50.0
    assert list(build_report(rows, "route")["groups"]) == ["(none)", "POST /chat", "POST /other"]
    assert group_key(rows[0], "hour") == "1970-01-01T00:00Z" and group_key(rows[2], "user") == "(none)"
    with pytest.raises(ValueError, match="cannot group by"):
        build_report(rows, "weekday")


def test_times_relative_and_absolute() -> None:
    now = 1_000_000.0
    assert parse_time("24h", now) == int((now - 86_400) * 1000)
    assert parse_time("30m", now) == int((now - 1_800) * 1000)
    assert parse_time("2026-11-30T12:00:00Z", now) == 1_796_040_000_000
    with pytest.raises(ValueError):
        parse_time("yesterday", now)


def test_ratings_are_shown_on_the_scale_users_gave_them() -> None:
    rows = [request(vote("user_accuracy", 0.8, scale=5), vote("user_accuracy", 1.0, scale=5))]
    stats = summarize(rows)["ratings"]["accuracy"]
    assert stats["scale_max"] == 5 and stats["mean_on_scale"] == pytest.approx(4.5)
    assert stats["distribution_on_scale"] == {"4": 1, "5": 1} and stats["distribution"] == {"0.8": 1, "1": 1}
    mixed = summarize([request(vote("user_accuracy", 0.8, scale=5), vote("user_accuracy", 0.5, scale=10))])
    assert "scale_max" not in mixed["ratings"]["accuracy"]  # no one scale: shown as stored (0-1)


def test_a_trace_is_read_as_current_votes_steps_sessions_signals_and_not_reviewers() -> None:
    """Each kind of stored HUMAN assessment goes where the report counts it; the rest is left out."""
    from mlflow.entities import AssessmentSource, Feedback, TraceInfo, TraceLocation, TraceState

    from mlflow_feedback_middleware.insight.report import traced_request
    from mlflow_feedback_middleware.intake.models import RETRACTED_KEY, SESSION_KEY, SIGNAL_KEY

    def human(name: str, value: object, **extra: object) -> Feedback:
        return Feedback(name, value, source=AssessmentSource(source_type="HUMAN", source_id="ann"), **extra)  # type: ignore[arg-type]

    overridden = human("user_feedback", True)
    overridden.valid = False
    info = TraceInfo(
        trace_id="tr-1",
        trace_location=TraceLocation.from_experiment_id("1"),
        request_time=0,
        state=TraceState.OK,
        assessments=[
            human("user_feedback", False),
            overridden,
            human("user_accuracy", None, metadata={RETRACTED_KEY: "true"}),
            human("relevant_documents", False, span_id="00f067aa0ba902b7"),
            human("user_feedback", True, metadata={SESSION_KEY: "chat-42"}),
            human("copied_answer", True, metadata={SIGNAL_KEY: "true"}),
            human("review.user_feedback", True),
            Feedback("user_feedback", True, source=AssessmentSource(source_type="LLM_JUDGE", source_id="gpt")),
        ],
    )

    class Searched:
        pass

    trace = Searched()
    trace.info = info  # type: ignore[attr-defined]
    request = traced_request(trace)  # type: ignore[arg-type]
    assert [(v.name, v.value) for v in request.votes] == [("user_feedback", False)]
    assert request.withdrawn == 1
    assert [v.span_id for v in request.step_votes] == ["00f067aa0ba902b7"]
    assert [v.session for v in request.session_votes] == ["chat-42"]
    assert [v.name for v in request.signals] == ["copied_answer"]
    assert [(j.name, j.source_type) for j in request.judgements] == [("user_feedback", "LLM_JUDGE")]
