"""Writes feedback to MLflow as HUMAN-sourced assessments, waiting for traces still on their way.

MLflow exports a trace after its root span ends, in batches (about 5 s by default), and answers "not
found" until then. Feedback for a trace this process issued is therefore retried with backoff, off the
event loop, for up to `wait_seconds`; feedback for an ID this process never issued gets one try.
"""

from __future__ import annotations

import asyncio
import time

import mlflow
from mlflow.entities import AssessmentSource
from mlflow.exceptions import MlflowException

from .feedback_models import Assessment
from .registry import RecentTraces
from .tracing import CLIENT_REQUEST_ID_TAG, MlflowBackend

_NOT_FOUND = "RESOURCE_DOES_NOT_EXIST"
_INVALID = "INVALID_PARAMETER_VALUE"
_FIRST_DELAY, _MAX_DELAY = 0.05, 1.0


class TraceNotFound(Exception):
    """No trace with that ID (or client request ID) exists in the tracking store."""


class FeedbackRejected(Exception):
    """The tracking store refused the feedback as invalid."""


class StoreUnavailable(Exception):
    """The tracking store could not be reached or failed."""


def _is(exc: BaseException, code: str) -> bool:
    return isinstance(exc, MlflowException) and exc.error_code == code


class FeedbackWriter:
    """Resolves the trace a feedback request names and writes its assessments."""

    def __init__(
        self, backend: MlflowBackend, recent: RecentTraces, wait_seconds: float, startup_timeout: float
    ) -> None:
        self._backend = backend
        self._recent = recent
        self._wait_seconds = wait_seconds
        self._startup_timeout = startup_timeout

    async def trace_id_for(self, client_request_id: str) -> str:
        """The trace of a client request ID: from this process's memory, else by a search."""
        trace_id = self._recent.trace_for(client_request_id)
        if trace_id is not None:
            return trace_id
        experiment_id = await self._backend.ready(self._startup_timeout)
        if experiment_id is None:
            raise StoreUnavailable("the MLflow experiment is not resolved yet")
        try:
            traces = await self._backend.run(
                _search_by_request_id, experiment_id, client_request_id, self._backend.otlp
            )
        except Exception as exc:
            raise StoreUnavailable(str(exc)) from exc
        if not traces:
            raise TraceNotFound(f"no trace has client_request_id {client_request_id!r}")
        return traces[0]

    async def write(self, trace_id: str, assessments: list[Assessment], source_id: str) -> list[str | None]:
        """Write `assessments` to `trace_id`; the assessment IDs MLflow gave them, in order."""
        deadline = time.monotonic() + (self._wait_seconds if trace_id in self._recent else 0.0)
        ids: list[str | None] = []
        for assessment in assessments:
            ids.append(await self._write_one(trace_id, assessment, source_id, deadline))
        return ids

    async def _write_one(self, trace_id: str, assessment: Assessment, source_id: str, deadline: float) -> str | None:
        delay = _FIRST_DELAY
        while True:
            try:
                return await self._backend.run(_log_feedback, trace_id, assessment, source_id)
            except Exception as exc:
                if _is(exc, _NOT_FOUND):
                    if time.monotonic() + delay > deadline:
                        raise TraceNotFound(f"trace {trace_id!r} not found") from exc
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, _MAX_DELAY)
                    continue
                if _is(exc, _INVALID):
                    raise FeedbackRejected(str(exc)) from exc
                raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc


def _log_feedback(trace_id: str, assessment: Assessment, source_id: str) -> str | None:
    feedback = mlflow.log_feedback(
        trace_id=trace_id,
        name=assessment.name,
        value=assessment.value,
        rationale=assessment.rationale,
        metadata=assessment.metadata,
        source=AssessmentSource(source_type="HUMAN", source_id=source_id),
    )
    return feedback.assessment_id


def _search_by_request_id(experiment_id: str, client_request_id: str, by_tag: bool) -> list[str]:
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
    return [trace.info.trace_id for trace in traces]
