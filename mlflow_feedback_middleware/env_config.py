"""Reading options from the environment: ``MLFLOW_FEEDBACK_<ARGUMENT>`` for every keyword argument.

`config.Settings` says which parser reads each variable; this module holds the parsers. A bad value stops
start-up with an error naming the variable.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .intake.limits import FeedbackLimits, RateLimit

PREFIX = "MLFLOW_FEEDBACK_"
_NONE = ("", "none", "null", "off")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def boolean(text: str) -> bool:
    """true/false, 1/0, yes/no, on/off."""
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError("expected true or false")


def optional(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """`parse`, with an empty value, none, null or off read as None."""
    return lambda text: None if text.strip().lower() in _NONE else parse(text)


def pair(text: str) -> tuple[float, float]:
    """Two numbers: ``1,5``."""
    low, high = (float(part) for part in text.split(","))
    return low, high


def json_list(text: str) -> list[str]:
    """A JSON list of strings."""
    value = json.loads(text)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError('expected a JSON list of strings, e.g. ["^/internal/"]')
    return value


def words(text: str) -> list[str]:
    """Comma-separated words."""
    return [word.strip() for word in text.split(",") if word.strip()]


def rate_limit(text: str) -> RateLimit:
    """``per_second,burst``."""
    per_second, burst = text.split(",")
    return RateLimit(per_second=float(per_second), burst=int(burst))


def limits(text: str) -> FeedbackLimits:
    """A JSON object of `FeedbackLimits` fields."""
    return FeedbackLimits(**json.loads(text))


def imported(text: str) -> Any:
    """``module:attribute``, imported."""
    module, _, attribute = text.strip().partition(":")
    if not attribute:
        raise ValueError("expected module:attribute, e.g. myapp.auth:current_user")
    return getattr(importlib.import_module(module), attribute)


def auto_boolean(text: str) -> bool | None:
    """A boolean, or ``auto`` for None."""
    return None if text.strip().lower() == "auto" else boolean(text)


def secrets(text: str) -> list[str] | None:
    """The signing secret (empty: none); ``MLFLOW_FEEDBACK_PREVIOUS_SECRET``, when set, still verifies."""
    if not text:
        return None
    previous = os.environ.get("MLFLOW_FEEDBACK_PREVIOUS_SECRET")
    return [text, previous] if previous else [text]


def variable(name: str) -> str:
    """The environment variable for keyword argument `name`."""
    return PREFIX + name.upper()


def read(
    name: str, parse: Callable[[str], Any], environ: Mapping[str, str], keys: Sequence[str] = ()
) -> tuple[bool, Any]:
    """Whether option `name` is set in the environment (in `keys`, by default its own variable), and its value."""
    for key in keys or (variable(name),):
        text = environ.get(key)
        if text is None:
            continue
        try:
            return True, parse(text)
        except Exception as exc:
            raise ValueError(f"{key}={text!r} is not a valid {name}: {exc}") from None
    return False, None
