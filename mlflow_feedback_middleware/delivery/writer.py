"""The MLflow calls behind feedback delivery: blocking, made by the delivery thread, never the event loop.

Each assessment carries its outbox item's ID and its index in the item in metadata (`FEEDBACK_ID_KEY`,
``fb-<hex>/<index>``), which is what makes a replay idempotent: before writing again after an attempt of
unknown outcome, the trace's assessments are read and those already written under that ID are kept
instead of written twice. The same read finds a user's earlier vote of the same name, which a new vote
overrides the way MLflow models a changed assessment (`overrides`: the earlier one is kept, marked invalid)
rather than joins, and tells which experiment the trace belongs to.

A retraction ("un-vote") is stored the same way: an assessment of the same name with no value and
`RETRACTED_KEY` in its metadata overrides the vote it withdraws, so the history stays and no valid vote is
left (`intake.models.retraction`). Figures skip it (`is_retraction`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import mlflow
from mlflow.entities import AssessmentSource, Feedback
from mlflow.exceptions import MlflowException
from mlflow.tracing.client import TracingClient

from .._mlflow.tracing import CLIENT_REQUEST_ID_TAG, REQUEST_ID_SOURCE_TAG
from ..intake.models import SESSION_KEY, Assessment, is_retraction, vote_key

FEEDBACK_ID_KEY = "mlflow_feedback.feedback_id"
CAST_AT_KEY = "mlflow_feedback.cast_at_ms"  # when the voter cast it: a later-delivered older vote never wins
NOT_FOUND, REJECTED, UNAVAILABLE, REFUSED = "not_found", "rejected", "unavailable", "refused"


CHOSEN_BY_CLIENT = (
    "this client_request_id was chosen by the client, so it cannot say whose answer the feedback is for;"
    " send the trace_id (or the feedback token) instead"
)
AMBIGUOUS = "client_request_id names more than one request; send the trace_id instead"


class Refused(Exception):
    """The feedback names its request in a way that cannot be trusted, or a step or session it does not have:
    answered `status` (403, 409, 422), naming `field`."""

    def __init__(self, status: int, message: str, field: str = "client_request_id") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field


def classify(exc: BaseException) -> str:
    """What a failed MLflow call means for the feedback: wait for the trace, give up, or retry later.

    The server's own answer decides: "does not exist" is NOT_FOUND, any other 4xx a refusal of this item
    (REJECTED); a 5xx or no answer at all is UNAVAILABLE (delivery then asks the server's health whether
    the problem is the server's or the item's).
    """
    if isinstance(exc, MlflowException):
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return NOT_FOUND
        try:
            status = int(exc.get_http_status_code())  # type: ignore[no-untyped-call]
        except (TypeError, ValueError):
            status = 500
        if 400 <= status < 500:
            return REJECTED
    return UNAVAILABLE


def _metadata(assessment: Assessment, feedback_id: str, index: int) -> dict[str, Any]:
    return {**(assessment.metadata or {}), FEEDBACK_ID_KEY: f"{feedback_id}/{index}"}


def _human_feedback(
    trace_id: str, assessment: Assessment, source_id: str, feedback_id: str, index: int, overrides: str | None
) -> str | None:
    """Write assessment number `index` of outbox item `feedback_id` as `source_id`'s; the ID MLflow gave it."""
    feedback = Feedback(
        name=assessment.name,
        value=assessment.value,
        rationale=assessment.rationale,
        metadata=_metadata(assessment, feedback_id, index),
        source=AssessmentSource(source_type="HUMAN", source_id=source_id),
        span_id=assessment.span_id,
        overrides=overrides,
    )
    return mlflow.log_assessment(trace_id, feedback).assessment_id


def log_feedback(trace_id: str, assessment: Assessment, source_id: str, feedback_id: str, index: int) -> str | None:
    """Write assessment number `index` of outbox item `feedback_id`; the ID MLflow gave it."""
    return _human_feedback(trace_id, assessment, source_id, feedback_id, index, None)


def override_feedback(
    trace_id: str, earlier_id: str, assessment: Assessment, source_id: str, feedback_id: str, index: int
) -> str | None:
    """Write a voter's new vote (or retraction) as an override of their `earlier_id` vote, which MLflow keeps
    and marks invalid (``mlflow.override_feedback`` without its extra read of the earlier assessment)."""
    return _human_feedback(trace_id, assessment, source_id, feedback_id, index, earlier_id)


class EarlierVote(NamedTuple):
    """A voter's current assessment of one `vote_key` on a trace."""

    assessment_id: str
    cast_at: int | None  # when the voter cast it (ms); None when not recorded
    retraction: bool = False  # a withdrawn vote


@dataclass
class TraceFacts:
    """What delivery needs to know of a trace before writing an item's assessments on it."""

    experiment_id: str | None
    written: dict[int, str | None] = field(default_factory=dict)  # index in the item -> assessment ID
    # `vote_key` -> the user's current (valid) assessment
    earlier_votes: dict[tuple[str, str, str], EarlierVote] = field(default_factory=dict)
    session: str | None = None  # the session the trace belongs to (its metadata)


def trace_facts(trace_id: str, feedback_id: str, source_id: str) -> TraceFacts:
    """The trace's experiment, the assessments item `feedback_id` already wrote on it, and the earlier
    valid HUMAN feedback of `source_id` by name (``anonymous`` included: one anonymous voter per answer)."""
    # From the tracking store itself: TracingClient.get_trace_info answers from MLflow's in-memory buffer while the
    # trace is held there, and that copy never has the votes already stored on the server.
    info = TracingClient().store.get_trace_info(trace_id)
    facts = TraceFacts(info.experiment_id, session=(info.trace_metadata or {}).get(SESSION_KEY))
    for assessment in info.assessments or ():
        item, _, index = (assessment.metadata or {}).get(FEEDBACK_ID_KEY, "").partition("/")
        if item == feedback_id and index.isascii() and index.isdigit():
            facts.written[int(index)] = assessment.assessment_id
        elif (
            assessment.assessment_id is not None
            and assessment.feedback is not None
            and assessment.valid is not False
            and assessment.source.source_type == "HUMAN"
            and assessment.source.source_id == source_id
        ):
            cast = (assessment.metadata or {}).get(CAST_AT_KEY, "")
            key = vote_key(assessment.name, assessment.span_id, assessment.metadata)
            facts.earlier_votes[key] = EarlierVote(
                assessment.assessment_id, int(cast) if cast.isdigit() else None, is_retraction(assessment.metadata)
            )
    return facts


def first_trace_of_session(experiment_id: str, session_id: str) -> str | None:
    """The session's first trace in the experiment (where MLflow's multi-turn evaluation stores session-level
    assessments), or None. The caller has checked that the ID has no quote or backslash."""
    traces = mlflow.search_traces(
        locations=[experiment_id],
        filter_string=f"metadata.`{SESSION_KEY}` = '{session_id}'",
        order_by=["timestamp_ms ASC"],
        max_results=1,
        return_type="list",
        include_spans=False,
    )
    return traces[0].info.trace_id if traces else None


def span_ids(trace_id: str) -> tuple[set[str], bool]:
    """The IDs of the trace's stored spans, and whether that is all of them (as far as its size stats say)."""
    trace = TracingClient().get_trace(trace_id)
    found = {span.span_id for span in trace.data.spans}
    stats = (trace.info.trace_metadata or {}).get("mlflow.trace.sizeStats")
    try:
        expected = int(json.loads(stats)["num_spans"]) if stats else None
    except (ValueError, KeyError, TypeError):
        expected = None
    return found, expected is not None and len(found) >= expected


def trace_exists(trace_id: str) -> bool:
    """Whether the tracking server has the trace (its info, at least)."""
    try:
        TracingClient().get_trace_info(trace_id)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return True


def search_trace_id(experiment_id: str, client_request_id: str, by_tag: bool) -> str | None:
    """The trace with that client request ID in the experiment, if the store has it.

    Raises `Refused` when the ID names two requests (409), or when the client chose it (403): a request
    ID the client picked may be known to anyone it told, so it never says whose answer a vote is for."""
    # The ID's charset (checked before we get here) has no quotes, so it is safe inside the filter.
    # OTLP ingestion leaves MLflow's client_request_id column empty; the middleware tags it instead.
    column = f"tags.`{CLIENT_REQUEST_ID_TAG}`" if by_tag else "trace.client_request_id"
    traces = mlflow.search_traces(
        locations=[experiment_id],
        filter_string=f"{column} = '{client_request_id}'",
        max_results=2,
        return_type="list",
        include_spans=False,
    )
    if len(traces) > 1:
        raise Refused(409, AMBIGUOUS)
    if traces and traces[0].info.tags.get(REQUEST_ID_SOURCE_TAG) == "client":
        raise Refused(403, CHOSEN_BY_CLIENT)
    return traces[0].info.trace_id if traces else None


class FeedbackWriter(Protocol):
    """What delivery needs of the tracking store; `MlflowFeedbackWriter` in production, a fake in unit tests."""

    def trace_facts(self, trace_id: str, feedback_id: str, source_id: str) -> TraceFacts: ...

    def trace_exists(self, trace_id: str) -> bool: ...

    def first_trace_of_session(self, experiment_id: str, session_id: str) -> str | None: ...

    def span_ids(self, trace_id: str) -> tuple[set[str], bool]: ...

    def search_trace_id(self, experiment_id: str, client_request_id: str, by_tag: bool) -> str | None: ...

    def log_feedback(
        self, trace_id: str, assessment: Assessment, source_id: str, feedback_id: str, index: int
    ) -> str | None: ...

    def override_feedback(
        self, trace_id: str, earlier_id: str, assessment: Assessment, source_id: str, feedback_id: str, index: int
    ) -> str | None: ...


class MlflowFeedbackWriter:
    """Writes through MLflow's public tracing API (the functions of this module)."""

    trace_facts = staticmethod(trace_facts)
    trace_exists = staticmethod(trace_exists)
    first_trace_of_session = staticmethod(first_trace_of_session)
    span_ids = staticmethod(span_ids)
    search_trace_id = staticmethod(search_trace_id)
    log_feedback = staticmethod(log_feedback)
    override_feedback = staticmethod(override_feedback)
