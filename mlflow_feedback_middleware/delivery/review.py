"""Routing flagged feedback into an MLflow review queue, so a reviewer sees those answers in MLflow's UI.

Opt-in (`review_queue`): after a vote is delivered, a trace with negative or commented end-user feedback is
attached to the named review queue of the service's experiment (created on first use, with label schemas made
from the declared feedback schema, named ``review.<field>`` so reviewers' labels never count as end users'
votes). Review queues are MLflow 3.14+ and live in the full `mlflow` package (`mlflow.genai.review_queues`);
without it, or against a tracking server that lacks them, routing turns off with one warning. Attaching is
idempotent in MLflow, so a replayed vote attaches nothing twice. A failure never touches delivery: it is
logged (at most once a minute) and the next flagged vote tries again.
"""

from __future__ import annotations

import importlib.metadata
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from mlflow.exceptions import MlflowException

from ..intake.models import REVIEW_PREFIX, SEED_FEEDBACK_NAME, SIGNAL_KEY, Assessment, is_retraction
from ..intake.schema import Binary, Categorical, FeedbackSchema, Scale, Signal, Text

logger = logging.getLogger("mlflow_feedback_middleware")

_WARN_EVERY_SECONDS = 60.0


def label_inputs(schema: FeedbackSchema | None) -> dict[str, tuple[Any, str]]:
    """The label schemas a review queue asks reviewers to fill: name -> (MLflow input, instruction), one per
    declared field (signals are not a reviewer's to give), or the thumbs and a comment without a schema."""
    from mlflow.genai.label_schemas import InputCategorical, InputNumeric, InputPassFail, InputText

    fields: list[Any] = list(schema.fields.values()) if schema is not None else [Binary(SEED_FEEDBACK_NAME)]
    out: dict[str, tuple[Any, str]] = {}
    for field in fields:
        name = REVIEW_PREFIX + field.name
        if isinstance(field, Binary):
            out[name] = (
                InputPassFail(positive_label="Helpful", negative_label="Not helpful"),
                "Is the answer helpful? (the end users' thumbs, judged again)",
            )
        elif isinstance(field, Scale):
            out[name] = (InputNumeric(min_value=field.min, max_value=field.max), f"Rate {field.name}")
        elif isinstance(field, Categorical):
            out[name] = (InputCategorical(options=list(field.choices)), f"Choose the {field.name}")
        elif isinstance(field, Text):
            out[name] = (InputText(max_length=field.max_length), f"Write the {field.name}")
        elif not isinstance(field, Signal):  # pragma: no cover - every field kind is handled above
            raise TypeError(field)
    return out


def flagged_by(schema: FeedbackSchema | None) -> Callable[[list[Assessment]], bool]:
    """Whether delivered feedback calls for a review: a negative vote, or a comment (signals and withdrawals
    never do)."""

    def negative(a: Assessment) -> bool:
        if schema is not None:
            return schema.polarity(a.name, a.value) is False
        return a.name == SEED_FEEDBACK_NAME and a.value is False

    def flagged(assessments: list[Assessment]) -> bool:
        return any(
            bool(a.rationale) or negative(a)
            for a in assessments
            if not is_retraction(a.metadata) and SIGNAL_KEY not in (a.metadata or {})
        )

    return flagged


class ReviewRouter:
    """Attaches flagged traces to one review queue; used by the delivery thread only (blocking calls)."""

    def __init__(self, queue_name: str, schema: FeedbackSchema | None) -> None:
        self.queue_name = queue_name
        self._schema = schema
        self._flagged = flagged_by(schema)
        self._queue_id: str | None = None
        self._disabled: str | None = None
        self._lock = threading.Lock()
        self._warned_at = 0.0
        self.routed = 0
        self.failed = 0
        self._disabled = self._unsupported()
        if self._disabled:
            logger.warning("review_queue=%r is off: %s", queue_name, self._disabled)

    @property
    def disabled(self) -> str | None:
        """Why routing is off, or None."""
        return self._disabled

    def route(self, trace_id: str, assessments: list[Assessment], experiment_id: str | None) -> bool:
        """Attach `trace_id` to the queue if its new feedback is flagged; whether it was attached. Never raises."""
        if self._disabled or experiment_id is None or not self._flagged(assessments):
            return False
        try:
            with self._lock:
                queue_id = self._queue_id or self._open_queue(experiment_id)
            from mlflow.genai.review_queues import add_items_to_review_queue

            add_items_to_review_queue(queue_id, item_ids=[trace_id])
        except MlflowException as exc:
            status = exc.get_http_status_code()  # type: ignore[no-untyped-call]
            if exc.error_code == "ENDPOINT_NOT_FOUND" or status == 404:
                self._disabled = "the tracking server has no review queues (MLflow 3.14+ serves them)"
                logger.warning("review_queue=%r is off: %s", self.queue_name, self._disabled)
            else:
                self._failed(trace_id, exc)
            return False
        except Exception as exc:
            self._failed(trace_id, exc)
            return False
        self.routed += 1
        return True

    def _open_queue(self, experiment_id: str) -> str:
        """The queue's ID, the queue and its label schemas created if missing."""
        from mlflow.genai import label_schemas, review_queues

        try:
            queue = review_queues.get_review_queue(name=self.queue_name, experiment_id=experiment_id)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            schema_ids = []
            for name, (widget, instruction) in label_inputs(self._schema).items():
                try:
                    label = label_schemas.get_label_schema(name, experiment_id=experiment_id)
                except MlflowException as missing:
                    if missing.error_code != "RESOURCE_DOES_NOT_EXIST":
                        raise
                    label = label_schemas.create_label_schema(
                        name,
                        type="feedback",
                        input=widget,
                        instruction=instruction,
                        enable_comment=True,
                        experiment_id=experiment_id,
                    )
                schema_ids.append(label.schema_id)
            queue = review_queues.create_review_queue(
                self.queue_name, queue_type="custom", schema_ids=schema_ids, experiment_id=experiment_id
            )
        self._queue_id = str(queue.queue_id)
        return self._queue_id

    def _failed(self, trace_id: str, exc: Exception) -> None:
        self.failed += 1
        if time.monotonic() - self._warned_at >= _WARN_EVERY_SECONDS:
            self._warned_at = time.monotonic()
            logger.warning("could not add trace %s to review queue %r: %s", trace_id, self.queue_name, exc)

    @staticmethod
    def _unsupported() -> str | None:
        """Why this process cannot use review queues (the full mlflow package 3.14+ is needed), or None."""
        try:
            import mlflow.genai.review_queues  # noqa: F401
        except ImportError:
            try:
                version = importlib.metadata.version("mlflow-tracing")
                what = f"mlflow-tracing {version} has no review queues"
            except importlib.metadata.PackageNotFoundError:
                what = "this mlflow has no review queues"
            return f"{what}; install the full mlflow package, 3.14 or later"
        return None

    def status(self) -> dict[str, Any]:
        """For the health route."""
        return {"queue": self.queue_name, "disabled": self._disabled, "routed": self.routed, "failed": self.failed}
