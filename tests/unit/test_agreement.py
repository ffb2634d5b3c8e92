"""Users versus judges: the arithmetic, on hand-made traces (the real-server check is in tests/test_agreement.py)."""

from __future__ import annotations

from typing import Any

import pytest

from mlflow_feedback_middleware.insight.agreement import agreement, cohens_kappa, judge_verdict, users_verdict
from mlflow_feedback_middleware.insight.report import Judgement, TracedRequest, Vote, is_positive


@pytest.mark.parametrize(
    ("cells", "kappa"),
    [
        # Wikipedia's worked examples of Cohen's kappa (two readers, 50 and 100 proposals).
        ((20, 5, 10, 15), 0.4),
        ((45, 15, 25, 15), 0.1304),
        ((25, 35, 5, 35), 0.2593),
        ((10, 0, 0, 10), 1.0),
    ],
)
def test_cohens_kappa_matches_worked_examples(cells: tuple[int, int, int, int], kappa: float) -> None:
    assert cohens_kappa(*cells) == pytest.approx(kappa, abs=1e-4)


def test_kappa_is_undefined_when_both_always_say_the_same_thing() -> None:
    assert cohens_kappa(7, 0, 0, 0) is None and cohens_kappa(0, 0, 0, 0) is None


@pytest.mark.parametrize(
    ("value", "verdict"),
    [
        *[(True, True), ("yes", True), (" Pass ", True), (0.5, True), (0.49, False), ("no", False), ("fail", False)],
        *[(False, False), ("maybe", None), (None, None), (["yes"], None)],
    ],
)
def test_judge_values_read_as_verdicts(value: Any, verdict: bool | None) -> None:
    assert judge_verdict(value) is verdict


def test_the_users_verdict_is_their_majority() -> None:
    def votes(*values: bool) -> list[Vote]:
        return [Vote("t", "user_feedback", v, f"u{i}", None, 0) for i, v in enumerate(values)]

    assert users_verdict(votes(True, True, False), is_positive) is True
    assert users_verdict(votes(True, False), is_positive) is None
    assert users_verdict([Vote("t", "user_accuracy", 0.8, "u", None, 0)], is_positive) is None


def request(index: int, votes: list[bool], judged: list[tuple[str, Any, int]]) -> TracedRequest:
    return TracedRequest(
        f"tr-{index}",
        index * 1000,
        None,
        None,
        None,
        [Vote(f"tr-{index}", "user_feedback", v, f"u{i}", None, 0) for i, v in enumerate(votes)],
        judgements=[Judgement(name, "LLM_JUDGE", "openai:/gpt-4o", value, "because", at) for name, value, at in judged],
    )


def test_figures_per_judge_with_ties_unreadable_values_and_re_evaluations() -> None:
    requests = [
        request(0, [True], [("correctness", "yes", 1)]),
        request(1, [False], [("correctness", "yes", 1)]),  # disagreement
        request(2, [False, False, True], [("correctness", "no", 1)]),
        request(3, [True, False], [("correctness", "no", 1)]),  # tied users: left out
        request(4, [True], [("correctness", "no", 1), ("correctness", "yes", 2)]),  # re-evaluated: the latest
        request(5, [True], [("correctness", "unsure", 1)]),  # unreadable
        request(6, [], [("correctness", "yes", 1)]),  # no users: left out
    ]
    figures = agreement(requests)
    assert (figures["traces_with_both"], figures["traces_with_tied_users"]) == (5, 1)
    judge = figures["judges"]["correctness (openai:/gpt-4o)"]
    assert judge["confusion"] == {
        "users_positive": {"judge_pass": 2, "judge_fail": 0},
        "users_negative": {"judge_pass": 1, "judge_fail": 1},
    }
    assert judge["traces_compared"] == 4 and judge["unreadable_values"] == 1
    assert judge["agreement_rate"] == pytest.approx(75.0)
    assert judge["cohens_kappa"] == pytest.approx(cohens_kappa(2, 0, 1, 1))
    assert [d["trace_id"] for d in judge["disagreements"]] == ["tr-1"]
