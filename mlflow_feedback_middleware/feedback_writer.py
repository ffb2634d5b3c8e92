"""The MLflow calls behind feedback delivery: blocking, made by the delivery thread, never the event loop.

Each assessment carries its outbox item's ID and its index in the item in metadata (`FEEDBACK_ID_KEY`,
``fb-<hex>/<index>``), which is what makes a replay idempotent: before writing again after an attempt of
unknown outcome, the trace's assessments are read and those already written under that ID are kept
instead of written twice.
"""

from __future__ import annotations

import mlflow
from mlflow.entities import AssessmentSource
from mlflow.exceptions import MlflowException
from mlflow.tracing.client import TracingClient

from .feedback_models import Assessment
from .tracing import CLIENT_REQUEST_ID_TAG

FEEDBACK_ID_KEY = "mlflow_feedback.feedback_id"
NOT_FOUND, REJECTED, UNAVAILABLE = "not_found", "rejected", "unavailable"


def classify(exc: BaseException) -> str:
    """What a failed MLflow call means for the feedback: wait for the trace, give up, or retry later."""
    if isinstance(exc, MlflowException):
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return NOT_FOUND
        if exc.error_code == "INVALID_PARAMETER_VALUE":
            return REJECTED
    return UNAVAILABLE


def log_feedback(trace_id: str, assessment: Assessment, source_id: str, feedback_id: str, index: int) -> str | None:
    """Write assessment number `index` of outbox item `feedback_id`; the ID MLflow gave it."""
    feedback = mlflow.log_feedback(
        trace_id=trace_id,
        name=assessment.name,
        value=assessment.value,
        rationale=assessment.rationale,
        metadata={**(assessment.metadata or {}), FEEDBACK_ID_KEY: f"{feedback_id}/{index}"},
        source=AssessmentSource(source_type="HUMAN", source_id=source_id),
    )
    return feedback.assessment_id


def written_under(trace_id: str, feedback_id: str) -> dict[int, str | None]:
    """The assessments already on `trace_id` from outbox item `feedback_id`, by their index in it."""
    info = TracingClient().get_trace_info(trace_id)
    done: dict[int, str | None] = {}
    for assessment in info.assessments or ():
        item, _, index = (assessment.metadata or {}).get(FEEDBACK_ID_KEY, "").partition("/")
        if item == feedback_id and index.isdigit():
            done[int(index)] = assessment.assessment_id
    return done


def search_trace_id(experiment_id: str, client_request_id: str, by_tag: bool) -> str | None:
    """The trace with that client request ID in the experiment, if the store has it."""
    # The ID's charset (checked before we get here) has no quotes, so it is safe inside the filter.
    # OTLP ingestion leaves MLflow's client_request_id column empty; the middleware tags it instead.
    column = f"tags.`{CLIENT_REQUEST_ID_TAG}`" if by_tag else "trace.client_request_id"
    traces = mlflow.search_traces(
        locations=[experiment_id],
        filter_string=f"{column} = '{client_request_id}'",
        max_results=1,
        return_type="list",
        include_spans=False,
    )
    return traces[0].info.trace_id if traces else None
