"""Feedback schemas: the feedback an app collects, declared once, checked by the routes, read by reports.

    schema = FeedbackSchema(
        Binary("user_feedback"),
        Scale("accuracy", min=1, max=5),
        Categorical("issue", {"wrong": Choice(score=0, polarity="negative"), "slow": Choice(polarity="negative")}),
        Text("correction", max_length=2000),
    )
    app.add_middleware(MlflowFeedbackMiddleware, feedback_schema=schema)   # or a .toml / .json file

Stored values are normalised the same way whatever the client sent: a binary vote is a boolean (from
``true/false``, ``1/0``, ``"up"/"down"``, ``"👍"/"👎"``); a scale rating is stored as ``user_<name>`` =
rating / max (the guide's convention, 4 of 5 → 0.8), the raw rating in metadata; a category is its
choice, its score and polarity in metadata. Without a declared schema the routes accept the guide's
shapes and any named value, as before.
"""

from __future__ import annotations

import json
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .models import (
    RATING_PREFIX,
    SEED_FEEDBACK_NAME,
    SIGNAL_KEY,
    Assessment,
    FeedbackRequest,
    binary_value,
    build_assessments,
)

Polarity = Literal["positive", "negative"]


class SchemaError(ValueError):
    """Feedback that does not fit the schema: `field` names where, the message what is allowed."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Binary:
    """A thumbs up / down vote, stored as a boolean; ``true`` is the positive side."""

    name: str = SEED_FEEDBACK_NAME
    kind: Literal["binary"] = field(default="binary", init=False)

    def normalise(self, value: Any, where: str) -> tuple[str, Any, dict[str, str]]:
        try:
            return self.name, binary_value(value), {}
        except ValueError as exc:
            raise SchemaError(where, str(exc)) from None


@dataclass(frozen=True)
class Scale:
    """A numeric rating from `min` to `max` in steps of `step`; stored as ``user_<name>`` = rating / max."""

    name: str
    min: float = 1
    max: float = 5
    step: float = 1
    higher_is_better: bool = True
    kind: Literal["scale"] = field(default="scale", init=False)

    def __post_init__(self) -> None:
        if not (0 <= self.min < self.max and self.step > 0):
            raise ValueError(f"scale {self.name!r} needs 0 <= min < max and step > 0")

    def normalise(self, value: Any, where: str) -> tuple[str, Any, dict[str, str]]:
        allowed = f"a number from {self.min:g} to {self.max:g} in steps of {self.step:g}"
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise SchemaError(where, f"must be {allowed}")
        steps = (value - self.min) / self.step
        if not self.min <= value <= self.max or abs(steps - round(steps)) > 1e-9:
            raise SchemaError(where, f"is {value:g}; must be {allowed}")
        metadata = {"raw_rating": f"{value:g}", "rating_scale_max": f"{self.max:g}"}
        return RATING_PREFIX + self.name, value / self.max, metadata


@dataclass(frozen=True)
class Choice:
    """What one categorical answer means: a score (0-1) and whether it is good or bad news."""

    score: float | None = None
    polarity: Polarity | None = None


@dataclass(frozen=True)
class Categorical:
    """One of fixed `choices`, each optionally mapped to a score and a polarity."""

    name: str
    choices: Mapping[str, Choice | None]
    kind: Literal["categorical"] = field(default="categorical", init=False)

    def normalise(self, value: Any, where: str) -> tuple[str, Any, dict[str, str]]:
        if not isinstance(value, str) or value not in self.choices:
            raise SchemaError(where, f"must be one of: {', '.join(self.choices)}")
        choice = self.choices[value] or Choice()
        metadata = {}
        if choice.score is not None:
            metadata["score"] = f"{choice.score:g}"
        if choice.polarity is not None:
            metadata["polarity"] = choice.polarity
        return self.name, value, metadata


@dataclass(frozen=True)
class Text:
    """Free text, up to `max_length` characters (a correction, a note)."""

    name: str
    max_length: int = 2000
    kind: Literal["text"] = field(default="text", init=False)

    def normalise(self, value: Any, where: str) -> tuple[str, Any, dict[str, str]]:
        if not isinstance(value, str) or not value.strip():
            raise SchemaError(where, "must be non-empty text")
        if len(value) > self.max_length:
            raise SchemaError(where, f"is {len(value)} characters; at most {self.max_length}")
        return self.name, value, {}


@dataclass(frozen=True)
class Signal:
    """Something a user did rather than said (copied the answer, asked again): an implicit, opt-in signal.

    Sent as ``{"signal": "<name>"}`` (the browser client sends the declared ones by itself); stored as a HUMAN
    assessment `name` = ``true`` with its polarity in metadata, one per user and answer, and counted by reports
    as a rate apart from the votes."""

    name: str
    polarity: Polarity | None = None
    kind: Literal["signal"] = field(default="signal", init=False)

    def normalise(self, value: Any, where: str) -> tuple[str, Any, dict[str, str]]:
        metadata = {SIGNAL_KEY: "true"}
        if self.polarity is not None:
            metadata["polarity"] = self.polarity
        return self.name, True, metadata


# What the browser client reports when a schema declares them (`FeedbackSchema(Binary(), *IMPLICIT_SIGNALS)`).
IMPLICIT_SIGNALS = (
    Signal("copied_answer", "positive"),  # the user copied (part of) the answer
    Signal("regenerated", "negative"),  # asked for another answer to the same question
    Signal("edited_question", "negative"),  # edited the question and sent it again
    Signal("stopped_stream", "negative"),  # stopped the answer while it streamed
    Signal("left_without_reacting"),  # left the page without voting or doing any of the above
)

Field = Binary | Scale | Categorical | Text | Signal
_KINDS: dict[str, type[Field]] = {
    "binary": Binary,
    "scale": Scale,
    "categorical": Categorical,
    "text": Text,
    "signal": Signal,
}


class FeedbackSchema:
    """The feedback fields an app collects, by name."""

    def __init__(self, *fields: Field) -> None:
        self.fields: dict[str, Field] = {}
        for f in fields:
            if f.name in self.fields:
                raise ValueError(f"feedback field {f.name!r} is declared twice")
            self.fields[f.name] = f

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeedbackSchema:
        """From ``{"feedback": [{"type": "binary", "name": ...}, ...]}`` (the file format)."""
        fields: list[Field] = []
        for spec in data.get("feedback", ()):
            spec = dict(spec)
            kind = spec.pop("type", None)
            if kind not in _KINDS:
                raise ValueError(f"feedback field type must be one of {', '.join(_KINDS)}, not {kind!r}")
            if kind == "categorical":
                spec["choices"] = {
                    k: Choice(**v) if isinstance(v, Mapping) else None for k, v in dict(spec.get("choices", {})).items()
                }
            fields.append(_KINDS[kind](**spec))
        return cls(*fields)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FeedbackSchema:
        """From a TOML or JSON file."""
        text = Path(path).read_text(encoding="utf-8")
        data = json.loads(text) if str(path).endswith(".json") else tomllib.loads(text)
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """The schema as JSON-able data (what ``GET {feedback_path}/schema`` serves)."""
        out = []
        for f in self.fields.values():
            spec: dict[str, Any] = {"type": f.kind, "name": f.name}
            if isinstance(f, Scale):
                spec |= {"min": f.min, "max": f.max, "step": f.step, "higher_is_better": f.higher_is_better}
                spec["stored_as"] = RATING_PREFIX + f.name
            elif isinstance(f, Categorical):
                spec["choices"] = {
                    k: {"score": (c or Choice()).score, "polarity": (c or Choice()).polarity}
                    for k, c in f.choices.items()
                }
            elif isinstance(f, Text):
                spec["max_length"] = f.max_length
            elif isinstance(f, Signal):
                spec["polarity"] = f.polarity
            out.append(spec)
        return {"feedback": out}

    def stored_names(self) -> list[str]:
        """The names the fields' assessments are stored under (a scale's is ``user_<name>``)."""
        return [RATING_PREFIX + f.name if isinstance(f, Scale) else f.name for f in self.fields.values()]

    def is_free_text(self, name: str) -> bool:
        """Whether the stored assessment `name` holds text a user typed (a `Text` field)."""
        return isinstance(self.fields.get(name), Text)

    def polarity(self, name: str, value: Any) -> bool | None:
        """Whether a stored assessment is positive, negative (False) or neither (None)."""
        declared = self.fields.get(name)
        if isinstance(declared, Signal) and declared.polarity is not None:
            return declared.polarity == "positive"
        if isinstance(declared, Binary) and isinstance(value, bool):
            return value
        if isinstance(declared, Categorical) and isinstance(value, str) and value in declared.choices:
            choice = declared.choices[value]
            if choice is not None and choice.polarity is not None:
                return choice.polarity == "positive"
        return None

    def to_assessments(self, request: FeedbackRequest) -> list[Assessment]:
        """The assessments a request asks for, checked and normalised; SchemaError names the field."""
        wanted: list[tuple[Field, Any, str]] = []
        if request.signal is not None:
            declared = self.fields.get(request.signal)
            if not isinstance(declared, Signal):
                signals = [n for n, f in self.fields.items() if isinstance(f, Signal)]
                raise SchemaError("signal", f"is not a signal here; signals: {', '.join(signals) or 'none'}")
            wanted.append((declared, True, "signal"))
        if request.is_correct is not None:
            binary = self.fields.get(SEED_FEEDBACK_NAME)
            if not isinstance(binary, Binary):
                raise SchemaError("is_correct", f"this service takes no '{SEED_FEEDBACK_NAME}' vote")
            wanted.append((binary, request.is_correct, "is_correct"))
        if request.name is not None:
            declared = self.fields.get(request.name)
            if declared is None or isinstance(declared, Signal):
                votes = [n for n, f in self.fields.items() if not isinstance(f, Signal)]
                raise SchemaError("name", f"must be one of: {', '.join(votes)}")
            wanted.append((declared, request.value, "value"))
        for dimension, rating in (request.ratings or {}).items():
            scale = self.fields.get(dimension)
            if not isinstance(scale, Scale):
                scales = [n for n, f in self.fields.items() if isinstance(f, Scale)]
                raise SchemaError(
                    f"ratings.{dimension}", f"is not a rating here; ratings: {', '.join(scales) or 'none'}"
                )
            wanted.append((scale, rating, f"ratings.{dimension}"))
        return build_assessments(request, [declared.normalise(value, where) for declared, value, where in wanted])


def default_schema(rating_scale: tuple[float, float]) -> dict[str, Any]:
    """What ``GET {feedback_path}/schema`` serves when no schema is declared: the guide's shapes."""
    low, high = rating_scale
    return {
        "feedback": [
            {"type": "binary", "name": SEED_FEEDBACK_NAME},
            {
                "type": "scale",
                "name": "*",
                "min": low,
                "max": high,
                "step": None,
                "higher_is_better": True,
                "stored_as": RATING_PREFIX + "<name>",
            },
        ],
        "declared": False,
    }
