"""Feedback reports: feedback rate against every traced request, positive rate, ratings, comments.

The middleware traces every request it serves, so the experiment's traces in a window are the real
denominator of the feedback rate. Traces are read with paginated ``search_traces`` calls without spans:
the trace infos already carry their assessments, so the report costs one call per page of traces,
where MLflow's guide fetches every trace one by one.

Only HUMAN feedback counts (LLM judges and code scorers are not end users, nor are reviewers' `review.*`
labels), and only a voter's current vote: an assessment overridden by a newer vote is not valid any more,
and a retraction (a withdrawn vote) is no vote; withdrawn votes are counted apart (`withdrawn_count`).
"""

from __future__ import annotations

import re
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from mlflow.entities import Assessment, Trace

from ..intake.models import RATING_PREFIX, REVIEW_PREFIX, SEED_FEEDBACK_NAME, SESSION_KEY, SIGNAL_KEY, is_retraction
from ..intake.schema import FeedbackSchema

PAGE_SIZE = 500  # the tracking server's largest page for trace searches
LATEST_COMMENTS = 10
GROUPINGS = ("day", "hour", "route", "user", "session")

_ROUTE_TAG = "mlflow.traceName"
_USER_KEY = "mlflow.trace.user"
_SESSION_KEY = "mlflow.trace.session"


@dataclass(frozen=True)
class Vote:
    """One end user's feedback assessment on one trace."""

    trace_id: str
    name: str
    value: Any
    user: str
    rationale: str | None
    time_ms: int
    scale_max: float | None = None  # a rating's scale (stored value x scale_max = what the user gave)
    span_id: str | None = None  # a vote on one step of the answer
    session: str | None = None  # a vote on the whole session (stored on its first trace)
    signal: bool = False  # an implicit signal (something the user did), not a vote


@dataclass(frozen=True)
class Judgement:
    """One LLM judge's or code scorer's valid feedback on one trace (for human/judge agreement)."""

    name: str
    source_type: str  # LLM_JUDGE or CODE
    source_id: str
    value: Any
    rationale: str | None
    time_ms: int


@dataclass
class TracedRequest:
    """A traced request as the report sees it: when, which route, whose, and the feedback on it."""

    trace_id: str
    time_ms: int
    route: str | None
    user: str | None
    session: str | None
    votes: list[Vote] = field(default_factory=list)  # on the answer itself
    withdrawn: int = 0  # votes on it withdrawn by their voter (and not cast again)
    step_votes: list[Vote] = field(default_factory=list)  # on one of its spans
    session_votes: list[Vote] = field(default_factory=list)  # on its session (this is the session's first trace)
    signals: list[Vote] = field(default_factory=list)  # implicit: what its user did (copied it, asked again)
    judgements: list[Judgement] = field(default_factory=list)


def is_positive(vote: Vote) -> bool | None:
    """Whether a vote is positive, negative (False) or neither (None). The seed's thumbs: `user_feedback`."""
    if vote.name == SEED_FEEDBACK_NAME and isinstance(vote.value, bool):
        return vote.value
    return None


def _human_votes(trace_id: str, assessments: Iterable[Assessment]) -> tuple[list[Vote], int]:
    """The current HUMAN votes on a trace, and how many were withdrawn."""
    votes = []
    withdrawn = 0
    for a in assessments:
        if a.feedback is None or a.valid is False or a.source is None or a.source.source_type != "HUMAN":
            continue
        if a.name.startswith(REVIEW_PREFIX):  # a reviewer's label from a review queue, not an end user's vote
            continue
        if is_retraction(a.metadata):
            withdrawn += 1
            continue
        user = a.source.source_id or ""
        metadata = a.metadata or {}
        scale = _number(metadata.get("rating_scale_max"))
        value, when, session = a.feedback.value, a.create_time_ms or 0, metadata.get(SESSION_KEY)
        signal = SIGNAL_KEY in metadata
        votes.append(Vote(trace_id, a.name, value, user, a.rationale, when, scale, a.span_id, session, signal))
    return votes, withdrawn


JUDGE_SOURCES = ("LLM_JUDGE", "CODE")


def _judgements(assessments: Iterable[Assessment]) -> list[Judgement]:
    """Valid, error-free feedback from LLM judges and code scorers (an overridden judgement is not valid)."""
    return [
        Judgement(
            a.name, a.source.source_type, a.source.source_id or "", a.feedback.value, a.rationale, a.create_time_ms or 0
        )
        for a in assessments
        if a.feedback is not None
        and a.feedback.error is None
        and a.valid is not False
        and a.source is not None
        and a.source.source_type in JUDGE_SOURCES
    ]


def traced_request(trace: Trace) -> TracedRequest:
    """The report's view of one searched trace (no spans needed)."""
    info = trace.info
    metadata = info.trace_metadata or {}
    votes, withdrawn = _human_votes(info.trace_id, info.assessments or ())
    return TracedRequest(
        trace_id=info.trace_id,
        time_ms=info.request_time,
        route=(info.tags or {}).get(_ROUTE_TAG),
        user=metadata.get(_USER_KEY),
        session=metadata.get(_SESSION_KEY),
        votes=[v for v in votes if v.span_id is None and v.session is None and not v.signal],
        withdrawn=withdrawn,
        step_votes=[v for v in votes if v.span_id is not None and not v.signal],
        session_votes=[v for v in votes if v.session is not None and v.span_id is None and not v.signal],
        signals=[v for v in votes if v.signal and v.span_id is None and v.session is None],
        judgements=_judgements(info.assessments or ()),
    )


_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_time(text: str, now: float | None = None) -> int:
    """Milliseconds since the epoch for ``24h`` / ``7d`` / ``30m`` ago, or an ISO date or time (UTC if no zone)."""
    now = time.time() if now is None else now
    relative = _RELATIVE.fullmatch(text.strip())
    try:
        if relative:
            return int((now - float(relative.group(1)) * _UNIT_SECONDS[relative.group(2)]) * 1000)
        moment = datetime.fromisoformat(text.strip())
    except (ValueError, OverflowError):
        raise ValueError(f"{text!r} is neither a duration (24h, 7d, 30m) nor an ISO date") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def window_filter(since_ms: int | None, until_ms: int | None) -> str | None:
    """A search filter for traces started in [since, until)."""
    parts = []
    if since_ms is not None:
        parts.append(f"trace.timestamp_ms >= {int(since_ms)}")
    if until_ms is not None:
        parts.append(f"trace.timestamp_ms < {int(until_ms)}")
    return " AND ".join(parts) or None


def search_requests(
    experiment_id: str,
    since_ms: int | None = None,
    until_ms: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> Iterator[TracedRequest]:
    """Every trace of the experiment in the window, page by page, without spans."""
    from mlflow.tracing.client import TracingClient

    client = TracingClient()
    token: str | None = None
    seen = 0
    while True:
        page = client.search_traces(
            locations=[experiment_id],
            filter_string=window_filter(since_ms, until_ms),
            max_results=PAGE_SIZE,
            order_by=["timestamp_ms DESC"],
            page_token=token,
            include_spans=False,
        )
        for trace in page:
            yield traced_request(trace)
        seen += len(page)
        if progress is not None:
            progress(seen)
        token = page.token
        if not token:
            return


def summarize(requests: Iterable[TracedRequest], schema: FeedbackSchema | None = None) -> dict[str, Any]:
    """The report's figures over some traced requests.

    The overall figures keep the names and meanings of MLflow's guide (`analyze_user_feedback`):
    `feedback_rate` is the percentage of traced requests with any feedback, `positive_rate` the positive
    thumbs per request with feedback, in percent (a request rated but not thumbed counts in the denominator).
    `thumbs_positive_rate` is the share of thumbs votes that are positive, which is what most readers expect.
    `ratings` are the `user_<dimension>` values as stored (0-1), and on the scale users gave them
    (`scale_max`, `mean_on_scale`, `distribution_on_scale`) when every vote of a dimension says its scale.
    With a `schema`, its binary fields and the polarity of its categorical choices say what is positive.
    Votes on one step of an answer (`step_feedback`, per name) and on a whole session (`session_feedback`) are
    counted apart from the votes on answers, and so are implicit signals: `signals` gives, per signal, the
    requests where a user gave it and their share of all traced requests (copy rate, regenerate rate).
    """
    polarity_of = (lambda v: schema.polarity(v.name, v.value)) if schema is not None else is_positive
    total = with_feedback = positive = negative = withdrawn = 0
    ratings: dict[str, list[float]] = {}
    scales: dict[str, set[float | None]] = {}
    categories: dict[str, Counter[str]] = {}
    negative_comments: list[Vote] = []
    steps: dict[str, Counter[str]] = {}
    sessions: dict[str, Counter[str]] = {}
    signals: Counter[str] = Counter()
    for request in requests:
        total += 1
        withdrawn += request.withdrawn
        signals.update({vote.name for vote in request.signals})
        for vote in request.step_votes:
            _tally(steps.setdefault(vote.name, Counter()), polarity_of(vote))
        for vote in request.session_votes:
            _tally(sessions.setdefault(vote.session or "", Counter()), polarity_of(vote))
        if not request.votes:
            continue
        with_feedback += 1
        for vote in request.votes:
            polarity = polarity_of(vote)
            if polarity is True:
                positive += 1
            elif polarity is False:
                negative += 1
                if vote.rationale:
                    negative_comments.append(vote)
            if vote.name.startswith(RATING_PREFIX) and _is_number(vote.value):
                dimension = vote.name[len(RATING_PREFIX) :]
                ratings.setdefault(dimension, []).append(float(vote.value))
                scales.setdefault(dimension, set()).add(vote.scale_max)
            elif isinstance(vote.value, str):
                categories.setdefault(vote.name, Counter())[vote.value] += 1
    negative_comments.sort(key=lambda v: v.time_ms, reverse=True)
    return {
        "total_traces": total,
        "traces_with_feedback": with_feedback,
        "feedback_rate": with_feedback / total * 100 if total else 0,
        "positive_rate": positive / with_feedback * 100 if with_feedback else 0,
        "positive_count": positive,
        "negative_count": negative,
        "thumbs_positive_rate": positive / (positive + negative) * 100 if positive + negative else 0,
        "withdrawn_count": withdrawn,
        "step_feedback": {
            name: {key: counts[key] for key in ("count", "positive_count", "negative_count")}
            for name, counts in sorted(steps.items())
        },
        "signals": {name: {"count": count, "rate": count / total * 100} for name, count in sorted(signals.items())},
        "session_feedback": {
            "sessions_with_feedback": len(sessions),
            "positive_count": sum(c["positive_count"] for c in sessions.values()),
            "negative_count": sum(c["negative_count"] for c in sessions.values()),
        },
        "ratings": {
            dimension: _rating_stats(values, _one(scales[dimension])) for dimension, values in sorted(ratings.items())
        },
        "categories": {name: dict(counts.most_common()) for name, counts in sorted(categories.items())},
        "latest_negative_comments": [
            {"trace_id": v.trace_id, "time": iso_time(v.time_ms), "user": v.user, "comment": v.rationale}
            for v in negative_comments[:LATEST_COMMENTS]
        ],
    }


def _tally(counts: Counter[str], polarity: bool | None) -> None:
    counts["count"] += 1
    if polarity is not None:
        counts["positive_count" if polarity else "negative_count"] += 1


def group_key(request: TracedRequest, by: str) -> str:
    """The group a request falls in: a UTC day or hour, its route, user or session."""
    if by in ("day", "hour"):
        moment = datetime.fromtimestamp(request.time_ms / 1000, UTC)
        return moment.strftime("%Y-%m-%d" if by == "day" else "%Y-%m-%dT%H:00Z")
    value = {"route": request.route, "user": request.user, "session": request.session}[by]
    return value or "(none)"


def build_report(
    requests: Iterable[TracedRequest], by: str | None = None, schema: FeedbackSchema | None = None, **context: Any
) -> dict[str, Any]:
    """The overall figures, plus the same figures per group when `by` is one of `GROUPINGS`."""
    if by is not None and by not in GROUPINGS:
        raise ValueError(f"cannot group by {by!r}; choose one of {', '.join(GROUPINGS)}")
    rows = list(requests)
    report: dict[str, Any] = {**context, **summarize(rows, schema)}
    if by is not None:
        groups: dict[str, list[TracedRequest]] = {}
        for row in rows:
            groups.setdefault(group_key(row, by), []).append(row)
        report["grouped_by"] = by
        report["groups"] = {key: summarize(groups[key], schema) for key in sorted(groups)}
    return report


def _rating_stats(values: list[float], scale_max: float | None) -> dict[str, Any]:
    distribution = Counter(round(v, 4) for v in values)
    stats: dict[str, Any] = {
        "mean": statistics.fmean(values),
        "median": statistics.median(values),
        "count": len(values),
        "distribution": {f"{k:g}": distribution[k] for k in sorted(distribution)},
    }
    if scale_max is not None:
        on_scale = Counter(round(v * scale_max, 2) for v in values)
        stats["scale_max"] = scale_max
        stats["mean_on_scale"] = stats["mean"] * scale_max
        stats["distribution_on_scale"] = {f"{k:g}": on_scale[k] for k in sorted(on_scale)}
    return stats


def _one(scales: set[float | None]) -> float | None:
    """The scale every vote of a dimension was given on, or None (unknown, or mixed)."""
    return next(iter(scales)) if len(scales) == 1 else None


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def iso_time(time_ms: int) -> str:
    """A millisecond timestamp as ISO 8601 UTC, to the second (``2026-11-30T12:00:00Z``)."""
    return datetime.fromtimestamp(time_ms / 1000, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
