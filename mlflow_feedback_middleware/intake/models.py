"""What the feedback route accepts, and how each request becomes MLflow assessments.

Three shapes, combinable in one request:

- the seed guide's ``{"is_correct": true, "comment": "..."}``, stored as ``user_feedback``;
- a general ``{"name": "tone", "value": "too formal", "rationale": "...", "metadata": {...}}``;
- ``{"ratings": {"accuracy": 4, "helpfulness": 5}}`` on the configured scale, each stored as
  ``user_<dimension>`` normalised to 0-1 (rating / scale maximum, as the seed does), the raw rating kept
  in metadata.

Feedback is on the whole answer (its trace) by default; ``"span_id"`` puts it on one step of it (a retrieved
document, a tool call), ``"scope": "session"`` on the whole conversation the answer belongs to (stored on the
session's first trace, where MLflow's multi-turn evaluation keeps session-level assessments).

Or, alone, ``{"retract": true}`` / ``{"retract": ["user_feedback", "user_accuracy"]}``: withdraw the voter's
votes of those stored names (``user_feedback`` when ``true``); or ``{"signal": "copied_answer"}``: an implicit
signal the schema declares.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ..ids import is_valid_client_request_id, is_valid_trace_id
from .limits import FeedbackLimits, json_size
from .scrubbing import SCRUBBED_KEY, scrub_and_name, scrub_personal_data

MAX_TEXT = 10_000
MAX_ITEMS = 50
SEED_FEEDBACK_NAME = "user_feedback"
RATING_PREFIX = "user_"
RETRACTED_KEY = "mlflow_feedback.retracted"
SCOPE_KEY = "mlflow_feedback.scope"  # "session": to be stored on the session's first trace
SIGNAL_KEY = "mlflow_feedback.signal"  # an implicit signal (something the user did), not a vote
SESSION_KEY = "mlflow.trace.session"  # MLflow's: a trace's session, and a session-level assessment's
REVIEW_PREFIX = "review."  # reviewers' labels (review-queue label schemas): never an end user's vote

_VOTE_FIELDS = ("is_correct", "comment", "name", "value", "rationale", "metadata", "ratings")
_TRUE = {True, "1", "true", "up", "yes", "👍"}
_FALSE = {False, "0", "false", "down", "no", "👎"}


def binary_value(value: Any) -> bool:
    """A thumbs vote as a boolean, from true/false, 1/0, "up"/"down" or "👍"/"👎"; ValueError otherwise."""
    key = value.strip().lower() if isinstance(value, str) else value
    if isinstance(key, float) and key in (0.0, 1.0):
        key = int(key)
    try:
        if key in _TRUE:
            return True
        if key in _FALSE:
            return False
    except TypeError:  # unhashable (a list or an object)
        pass
    raise ValueError("must be true/false, 1/0, up/down or 👍/👎")


Text = Annotated[StrictStr, Field(max_length=MAX_TEXT)]
Scalar = StrictBool | StrictInt | StrictFloat | Text
FeedbackValue = Scalar | Annotated[list[Scalar], Field(max_length=MAX_ITEMS)] | dict[str, Scalar]
Name = Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_.:/-]{1,100}$")]


class FeedbackRequest(BaseModel):
    """The JSON body of ``POST {feedback_path}``; IDs may come in the query string instead."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    trace_id: StrictStr | None = None
    client_request_id: StrictStr | None = None
    span_id: Annotated[StrictStr, Field(pattern=r"^[0-9a-f]{16}$")] | None = Field(
        None, description="Feedback on one step of the answer: the span's ID (16 hex digits), a span of the trace."
    )
    scope: Literal["trace", "session"] = Field(
        "trace", description="`session`: feedback on the whole conversation the answer belongs to."
    )
    is_correct: bool | None = Field(
        None, description='Thumbs up or down: true/false, 1/0, "up"/"down" or "👍"/"👎"; the seed\'s shape.'
    )
    comment: Text | None = Field(None, description="Free text from the user; stored as the rationale.")
    name: Name | None = Field(None, description="Assessment name for a custom `value`.")
    value: FeedbackValue | None = None
    rationale: Text | None = None
    metadata: Annotated[dict[Name, Scalar], Field(max_length=MAX_ITEMS)] | None = None
    ratings: Annotated[dict[Name, StrictInt | StrictFloat], Field(min_length=1, max_length=MAX_ITEMS)] | None = None
    signal: Name | None = Field(
        None, description="An implicit signal the schema declares (`copied_answer`, `regenerated`, ...). Sent alone."
    )
    retract: StrictBool | Annotated[list[Name], Field(min_length=1, max_length=MAX_ITEMS)] | None = Field(
        None,
        description="Withdraw the voter's earlier votes instead of voting: `true` for the thumbs"
        f" (`{SEED_FEEDBACK_NAME}`), or the stored names to withdraw. Sent alone.",
    )

    @field_validator("is_correct", mode="before")
    @classmethod
    def _thumbs(cls, value: Any) -> bool | None:
        return None if value is None else binary_value(value)

    @field_validator("trace_id")
    @classmethod
    def _trace_id_shape(cls, value: str | None) -> str | None:
        if value is not None and not is_valid_trace_id(value):
            raise ValueError("is not a trace ID")
        return value

    @field_validator("client_request_id")
    @classmethod
    def _request_id_shape(cls, value: str | None) -> str | None:
        if value is not None and not is_valid_client_request_id(value):
            raise ValueError("is not a client request ID (1-50 of A-Z a-z 0-9 . _ : + = @ / ~ -)")
        return value

    @field_validator("ratings")
    @classmethod
    def _ratings_in_scale(cls, value: dict[str, float] | None, info: ValidationInfo) -> dict[str, float] | None:
        scale = (info.context or {}).get("rating_scale")
        if scale is None:  # a declared feedback schema checks each scale
            return value
        low, high = scale
        for dimension, rating in (value or {}).items():
            if not low <= rating <= high:
                raise ValueError(f"rating {dimension!r} is {rating}, outside the scale {low:g} to {high:g}")
        return value

    @field_validator("retract")
    @classmethod
    def _retract_something(cls, value: bool | list[str] | None) -> bool | list[str] | None:
        if value is False:
            raise ValueError("must be true or a list of the feedback names to withdraw")
        return value

    @model_validator(mode="after")
    def _complete(self) -> FeedbackRequest:
        if self.span_id is not None and self.scope == "session":
            raise ValueError("'span_id' names a step of one answer; a session-wide vote takes none")
        for alone in ("retract", "signal"):
            if getattr(self, alone) is not None:
                others = (*_VOTE_FIELDS, "retract", "signal")
                given = [name for name in others if name != alone and getattr(self, name) is not None]
                if given:
                    raise ValueError(f"'{alone}' goes alone: drop {', '.join(repr(name) for name in given)}")
                return self
        if (self.name is None) != (self.value is None):
            raise ValueError("'name' and 'value' go together: give both or neither")
        if self.comment is not None and self.rationale is not None:
            raise ValueError("give 'comment' or 'rationale', not both")
        if self.is_correct is None and self.value is None and self.ratings is None:
            raise ValueError(
                "no feedback given: send 'is_correct', 'name' with 'value', 'ratings', 'signal' or 'retract'"
            )
        return self


def limit_violations(request: FeedbackRequest, limits: FeedbackLimits) -> list[tuple[str, str]]:
    """(field, message) for every configured cap the request exceeds (the model holds the hard caps)."""
    out: list[tuple[str, str]] = []
    for name in ("comment", "rationale", "value"):
        text = getattr(request, name)
        if isinstance(text, str) and len(text) > limits.max_text_chars:
            out.append((name, f"is {len(text)} characters; at most {limits.max_text_chars} are accepted"))
    if isinstance(request.value, list | dict) and json_size(request.value) > limits.max_value_bytes:
        out.append(("value", f"is larger than {limits.max_value_bytes} bytes as JSON"))
    if request.metadata is not None:
        if len(request.metadata) > limits.max_metadata_entries:
            out.append(("metadata", f"has {len(request.metadata)} entries; at most {limits.max_metadata_entries}"))
        elif json_size(request.metadata) > limits.max_metadata_bytes:
            out.append(("metadata", f"is larger than {limits.max_metadata_bytes} bytes as JSON"))
    if request.ratings is not None and len(request.ratings) > limits.max_ratings:
        out.append(("ratings", f"has {len(request.ratings)} dimensions; at most {limits.max_ratings}"))
    return out


class SignalsNotDeclared(ValueError):
    """A signal sent to a service whose feedback schema declares none."""

    def __init__(self) -> None:
        super().__init__("this service takes no signals: its feedback schema declares none (see Signal)")


@dataclass(frozen=True, slots=True)
class Assessment:
    """One MLflow feedback assessment to write."""

    name: str
    value: Any
    rationale: str | None = None
    metadata: dict[str, str] | None = None
    span_id: str | None = None  # feedback on one span of the trace


def targeted(assessments: list[Assessment], request: FeedbackRequest) -> list[Assessment]:
    """`assessments` aimed where the request says: at its span, or at its session (marked for delivery)."""
    if request.span_id is not None:
        return [dataclasses.replace(a, span_id=request.span_id) for a in assessments]
    if request.scope == "session":
        return [dataclasses.replace(a, metadata={**(a.metadata or {}), SCOPE_KEY: "session"}) for a in assessments]
    return assessments


def vote_key(name: str, span_id: str | None, metadata: dict[str, str] | None) -> tuple[str, str, str]:
    """What one voter has one vote on: a name, on the answer, one of its spans, or its session."""
    return name, span_id or "", (metadata or {}).get(SESSION_KEY, "")


def retraction(name: str) -> Assessment:
    """The assessment that withdraws a voter's vote named `name` (it overrides that vote, with no value)."""
    return Assessment(name, None, None, {RETRACTED_KEY: "true"})


def is_retraction(metadata: dict[str, str] | None) -> bool:
    """Whether an assessment with this metadata withdraws a vote rather than casts one."""
    return (metadata or {}).get(RETRACTED_KEY) == "true"


def retracted_names(request: FeedbackRequest) -> list[str]:
    """The stored names a retraction request withdraws (the thumbs for ``true``), each once."""
    names = [SEED_FEEDBACK_NAME] if request.retract is True else list(request.retract or ())
    return list(dict.fromkeys(names))


def build_assessments(request: FeedbackRequest, values: list[tuple[str, Any, dict[str, str]]]) -> list[Assessment]:
    """Assessments for (name, stored value, extra metadata) triples: the request's metadata goes with each, its
    comment (or rationale) with the first only."""
    rationale = request.comment if request.comment is not None else request.rationale
    metadata = {k: str(v) for k, v in request.metadata.items()} if request.metadata else {}
    return [
        Assessment(name, stored, rationale if index == 0 else None, {**metadata, **extra} or None)
        for index, (name, stored, extra) in enumerate(values)
    ]


def to_assessments(request: FeedbackRequest, rating_max: float) -> list[Assessment]:
    """The assessments a request asks for, without a declared schema (the guide's shapes, any name, any rating)."""
    values: list[tuple[str, Any, dict[str, str]]] = []
    if request.signal is not None:
        raise SignalsNotDeclared()
    if request.is_correct is not None:
        values.append((SEED_FEEDBACK_NAME, request.is_correct, {}))
    if request.name is not None:
        values.append((request.name, request.value, {}))
    for dimension, rating in (request.ratings or {}).items():
        scale = {"raw_rating": f"{rating:g}", "rating_scale_max": f"{rating_max:g}"}
        values.append((RATING_PREFIX + dimension, rating / rating_max, scale))
    return build_assessments(request, values)


def scrub_assessments(
    assessments: list[Assessment], scrubber: Callable[[str], str], is_free_text: Callable[[str], bool]
) -> list[Assessment]:
    """`assessments` with their rationale, and the string values of free-text fields (`is_free_text(name)`),
    passed through `scrubber`; the kinds the default scrubber found (or "custom") noted in the metadata."""
    out = []
    for assessment in assessments:
        kinds: set[str] = set()
        changes: dict[str, Any] = {}
        texts = [("rationale", assessment.rationale)]
        if isinstance(assessment.value, str) and is_free_text(assessment.name):
            texts.append(("value", assessment.value))
        for field, text in texts:
            if not text:
                continue
            if scrubber is scrub_personal_data:  # one pass names what it replaced
                cleaned, found = scrub_and_name(text)
            else:
                cleaned = scrubber(text)
                found = ["custom"] if cleaned != text else []
            if cleaned != text:
                changes[field] = cleaned
                kinds.update(found)
        if kinds:
            changes["metadata"] = {**(assessment.metadata or {}), SCRUBBED_KEY: ",".join(sorted(kinds))}
        out.append(dataclasses.replace(assessment, **changes) if changes else assessment)
    return out
