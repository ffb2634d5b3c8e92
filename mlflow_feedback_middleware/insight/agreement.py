"""Humans versus judges: how often an LLM judge or a code scorer agrees with the end users.

On every trace that has both end-user votes and a judge's feedback, the users' verdict (the majority of
their positive and negative votes; a tie is no verdict) is set against the judge's (``yes``/``pass``/
``true`` or a score at or above the threshold approve, ``no``/``fail``/``false`` or a lower score
disapprove). Per judge (assessment name and source: an LLM judge's model, a code scorer's name): the
agreement rate, Cohen's kappa (agreement beyond what two raters with these base rates reach by chance),
the confusion matrix and the traces where they disagree, newest first. A kappa near 0 means the judge's
agreement is what chance would give; below about 0.4 a judge is rarely trusted alone.

Only valid assessments count: a judgement a reviewer overrode, and a vote its user changed or withdrew,
are not the current verdict.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..intake.schema import FeedbackSchema
from .report import Judgement, TracedRequest, Vote, is_positive, iso_time

DEFAULT_THRESHOLD = 0.5
MAX_LISTED = 20
_APPROVE = {"yes", "y", "pass", "passed", "true", "correct", "good", "positive"}
_DISAPPROVE = {"no", "n", "fail", "failed", "false", "incorrect", "bad", "negative"}
# The 2x2 table's cells, as (users positive, judge approves), in `cohens_kappa`'s argument order.
_CELLS: tuple[tuple[bool, bool], ...] = ((True, True), (True, False), (False, True), (False, False))


def judge_verdict(value: Any, threshold: float = DEFAULT_THRESHOLD) -> bool | None:
    """Whether a judge's value approves (True), disapproves (False), or cannot be read as either (None)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value >= threshold
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _APPROVE:
            return True
        if word in _DISAPPROVE:
            return False
    return None


def users_verdict(votes: Iterable[Vote], polarity_of: Callable[[Vote], bool | None]) -> bool | None:
    """The end users' verdict on one answer: the majority of their positive and negative votes; None on a tie."""
    balance = 0
    for vote in votes:
        polarity = polarity_of(vote)
        if polarity is not None:
            balance += 1 if polarity else -1
    return None if balance == 0 else balance > 0


def cohens_kappa(both_pass: int, judge_fail: int, judge_pass: int, both_fail: int) -> float | None:
    """Cohen's kappa of a 2x2 table: users positive & judge pass, users positive & judge fail, users negative &
    judge pass, users negative & judge fail. None when undefined (both raters always gave one and the same answer)."""
    n = both_pass + judge_fail + judge_pass + both_fail
    if n == 0:
        return None
    observed = (both_pass + both_fail) / n
    users_positive, judge_approves = (both_pass + judge_fail) / n, (both_pass + judge_pass) / n
    chance = users_positive * judge_approves + (1 - users_positive) * (1 - judge_approves)
    return None if chance == 1 else (observed - chance) / (1 - chance)


@dataclass
class _Tally:
    name: str
    source_type: str
    source_id: str
    cells: dict[tuple[bool, bool], int] = field(default_factory=lambda: dict.fromkeys(_CELLS, 0))
    unreadable: int = 0
    disagreements: list[tuple[int, dict[str, Any]]] = field(default_factory=list)


def agreement(
    requests: Iterable[TracedRequest],
    schema: FeedbackSchema | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    max_listed: int = MAX_LISTED,
) -> dict[str, Any]:
    """Agreement figures per judge over `requests` (see the module's description)."""
    polarity_of = (lambda v: schema.polarity(v.name, v.value)) if schema is not None else is_positive
    tallies: dict[tuple[str, str], _Tally] = {}
    with_both = tied = 0
    for request in requests:
        if not request.judgements or not request.votes:
            continue
        users = users_verdict(request.votes, polarity_of)
        if users is None:
            tied += any(polarity_of(v) is not None for v in request.votes)
            continue
        with_both += 1
        for judgement in _latest_per_judge(request.judgements):
            key = (judgement.name, judgement.source_id)
            tally = tallies.setdefault(key, _Tally(judgement.name, judgement.source_type, judgement.source_id))
            judge = judge_verdict(judgement.value, threshold)
            if judge is None:
                tally.unreadable += 1
                continue
            tally.cells[(users, judge)] += 1
            if judge != users:
                tally.disagreements.append((request.time_ms, _disagreement(request, users, judgement)))
    return {
        "traces_with_both": with_both,
        "traces_with_tied_users": tied,
        "judge_threshold": threshold,
        "judges": {
            f"{t.name} ({t.source_id or t.source_type})": _figures(t, max_listed)
            for t in sorted(tallies.values(), key=lambda t: (t.name, t.source_id))
        },
    }


def _latest_per_judge(judgements: list[Judgement]) -> list[Judgement]:
    """A trace evaluated more than once by a judge: its latest judgement."""
    latest: dict[tuple[str, str], Judgement] = {}
    for judgement in sorted(judgements, key=lambda j: j.time_ms):
        latest[(judgement.name, judgement.source_id)] = judgement
    return list(latest.values())


def _disagreement(request: TracedRequest, users: bool, judgement: Judgement) -> dict[str, Any]:
    return {
        "trace_id": request.trace_id,
        "time": iso_time(request.time_ms),
        "users": "positive" if users else "negative",
        "judge": judgement.value,
        "judge_rationale": judgement.rationale,
    }


def _figures(tally: _Tally, max_listed: int) -> dict[str, Any]:
    cells = tally.cells
    compared = sum(cells.values())
    agreed = cells[(True, True)] + cells[(False, False)]
    tally.disagreements.sort(key=lambda pair: pair[0], reverse=True)
    return {
        "name": tally.name,
        "source_type": tally.source_type,
        "source_id": tally.source_id,
        "traces_compared": compared,
        "agreement_rate": agreed / compared * 100 if compared else None,
        "cohens_kappa": cohens_kappa(*(cells[cell] for cell in _CELLS)),
        "confusion": {
            "users_positive": {"judge_pass": cells[(True, True)], "judge_fail": cells[(True, False)]},
            "users_negative": {"judge_pass": cells[(False, True)], "judge_fail": cells[(False, False)]},
        },
        "unreadable_values": tally.unreadable,
        "disagreements": [entry for _, entry in tally.disagreements[:max_listed]],
        "disagreement_count": len(tally.disagreements),
    }
