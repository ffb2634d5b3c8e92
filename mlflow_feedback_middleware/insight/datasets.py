"""Evaluation datasets from feedback: the answers users flagged, as records `mlflow.genai.evaluate` takes.

Each record is ``{"inputs": ..., "outputs": ..., "expectations": ..., "feedback": [...], "trace_id": ...}``:
the request the middleware captured (its JSON body, else the whole captured input), the answer (its JSON
body or streamed text), the end users' feedback, and their corrections as expectations: HUMAN
expectation assessments on the trace by name, and feedback named `correction` (free text) as
``expected_response``. Traces are selected from the paginated search (no spans); only the selected ones
are then read in full.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO

from .report import TracedRequest, Vote, is_positive, search_requests

CORRECTION_NAME = "correction"
_RATING_BELOW = re.compile(r"rating-below:(\d+(?:\.\d+)?)")

Selector = Callable[[TracedRequest], bool]


def selector(only: str) -> Selector:
    """Which traces to export: ``negative``, ``positive``, ``commented``, ``corrected``,
    ``rating-below:<0-1>``, or ``any`` (any end-user feedback)."""

    def votes_where(test: Callable[[Vote], bool]) -> Selector:
        return lambda request: any(test(v) for v in request.votes)

    fixed: dict[str, Selector] = {
        "any": lambda request: bool(request.votes),
        "negative": votes_where(lambda v: is_positive(v) is False),
        "positive": votes_where(lambda v: is_positive(v) is True),
        "commented": votes_where(lambda v: bool(v.rationale)),
        "corrected": votes_where(lambda v: v.name == CORRECTION_NAME),
    }
    if only in fixed:
        return fixed[only]
    below = _RATING_BELOW.fullmatch(only)
    if below:
        threshold = float(below.group(1))
        return votes_where(
            lambda v: (
                v.name.startswith("user_")
                and isinstance(v.value, int | float)
                and not isinstance(v.value, bool)
                and v.value < threshold
            )
        )
    raise ValueError(
        f"unknown filter {only!r}: use any, negative, positive, commented, corrected or rating-below:<0-1>"
    )


def _body(value: Any) -> Any:
    """The payload of a middleware capture ({"method", "path", "body"} / {"status_code", "body"})."""
    if isinstance(value, dict) and "body" in value:
        return value["body"]
    return value


def to_record(trace: Any, request: TracedRequest) -> dict[str, Any]:
    """One evaluation record from a full trace (spans included) and its feedback."""
    root = next((s for s in trace.data.spans if s.parent_id is None), None)
    expectations: dict[str, Any] = {}
    for assessment in trace.info.assessments or ():
        if (
            assessment.expectation is not None
            and assessment.valid is not False
            and assessment.source is not None
            and assessment.source.source_type == "HUMAN"
        ):
            expectations[assessment.name] = assessment.expectation.value
    for vote in request.votes:
        if vote.name == CORRECTION_NAME and isinstance(vote.value, str):
            expectations.setdefault("expected_response", vote.value)
    return {
        "inputs": _as_mapping(_body(root.inputs) if root else None, "request"),
        "outputs": _body(root.outputs) if root else None,
        "expectations": expectations or None,
        "feedback": [
            {"name": v.name, "value": v.value, "rationale": v.rationale, "user": v.user} for v in request.votes
        ],
        "trace_id": request.trace_id,
    }


def _as_mapping(value: Any, key: str) -> dict[str, Any]:
    # mlflow.genai.evaluate wants `inputs` to be a dict of arguments.
    return value if isinstance(value, dict) else {key: value}


def feedback_records(
    experiment_id: str,
    only: str = "negative",
    since_ms: int | None = None,
    until_ms: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """The records of every trace in the window whose feedback matches `only` (see `selector`)."""
    import mlflow

    wanted = selector(only)
    for request in [r for r in search_requests(experiment_id, since_ms, until_ms, progress) if wanted(r)]:
        yield to_record(mlflow.get_trace(request.trace_id), request)


def write_jsonl(records: Iterable[dict[str, Any]], out: TextIO) -> int:
    """Write one JSON object per line; how many were written."""
    count = 0
    for record in records:
        out.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        count += 1
    return count


def to_mlflow_dataset(records: list[dict[str, Any]], name: str, experiment_id: str) -> str:
    """Store the records as an MLflow GenAI evaluation dataset (needs the full `mlflow` package); its ID."""
    try:
        from mlflow.genai.datasets import create_dataset
    except ImportError as exc:  # mlflow-tracing alone has no dataset API
        raise RuntimeError("MLflow evaluation datasets need the full `mlflow` package: pip install mlflow") from exc
    dataset = create_dataset(name=name, experiment_id=experiment_id)
    dataset.merge_records(
        [{k: r[k] for k in ("inputs", "outputs", "expectations") if r.get(k) is not None} for r in records]
    )
    return str(dataset.dataset_id)
