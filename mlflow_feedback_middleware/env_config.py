"""Configuration from the environment: ``MLFLOW_FEEDBACK_<ARGUMENT>`` for every keyword argument.

An argument given in code (any value but its default) wins; one left at its default takes the
environment variable when it is set. Values are parsed by the argument's kind; a bad one stops start-up
with an error naming the variable.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

from .intake.limits import FeedbackLimits, RateLimit

PREFIX = "MLFLOW_FEEDBACK_"
_NONE = ("", "none", "null", "off")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError("expected true or false")


def _optional(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    return lambda text: None if text.strip().lower() in _NONE else parse(text)


def _pair(text: str) -> tuple[float, float]:
    low, high = (float(part) for part in text.split(","))
    return low, high


def _json_list(text: str) -> list[str]:
    value = json.loads(text)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError('expected a JSON list of strings, e.g. ["^/internal/"]')
    return value


def _words(text: str) -> list[str]:
    return [word.strip() for word in text.split(",") if word.strip()]


def _rate_limit(text: str) -> RateLimit:
    per_second, burst = text.split(",")
    return RateLimit(per_second=float(per_second), burst=int(burst))


def _limits(text: str) -> FeedbackLimits:
    return FeedbackLimits(**json.loads(text))


def _imported(text: str) -> Any:
    module, _, attribute = text.strip().partition(":")
    if not attribute:
        raise ValueError("expected module:attribute, e.g. myapp.auth:current_user")
    return getattr(importlib.import_module(module), attribute)


# How each argument is read from its variable; the names are the middleware's keyword arguments.
PARSERS: Mapping[str, Callable[[str], Any]] = {
    "experiment_name": str,
    "tracking_uri": str,
    "feedback_path": _optional(str),
    "trace_id_header": str,
    "request_id_header": str,
    "user_id_header": str,
    "session_id_header": str,
    "exclude_paths": _json_list,
    "sse_final_event": lambda text: None if text.strip().lower() == "auto" else _bool(text),
    "sse_event_name": str,
    "capture_request_body": _bool,
    "capture_response_body": _bool,
    "max_capture_bytes": int,
    "max_feedback_body_bytes": int,
    "feedback_wait_seconds": float,
    "feedback_sync_seconds": float,
    "trace_wait_seconds": float,
    "outbox_path": _optional(str),
    "rating_scale": _pair,
    "startup_timeout_seconds": float,
    "shutdown_timeout_seconds": float,
    "mlflow_threads": int,
    "export": str,
    "feedback_token_ttl_seconds": float,
    "feedback_token_header": str,
    "identity": _optional(_imported),
    "feedback_limits": _limits,
    "rate_limit": _optional(_rate_limit),
    "redact_fields": _words,
    "feedback_schema": _optional(str),
    "summary_token": str,
    "trust_traceparent": _bool,
}
# The secret is read by the middleware itself (MLFLOW_FEEDBACK_SECRET and MLFLOW_FEEDBACK_PREVIOUS_SECRET).
# Names documented before every argument had a variable; still read.
ALIASES = {"outbox_path": "MLFLOW_FEEDBACK_OUTBOX"}


def variable(name: str) -> str:
    """The environment variable for keyword argument `name`."""
    return PREFIX + name.upper()


def apply_environment(given: dict[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """`given` with every argument still at its default replaced by its environment variable, if set."""
    out = dict(given)
    for name, parse in PARSERS.items():
        if name not in given or (given[name] is not defaults[name] and given[name] != defaults[name]):
            continue  # set in code
        for key in (variable(name), ALIASES.get(name)):
            text = os.environ.get(key) if key else None
            if text is None:
                continue
            try:
                out[name] = parse(text)
            except Exception as exc:
                raise ValueError(f"{key}={text!r} is not a valid {name}: {exc}") from None
            break
    return out
