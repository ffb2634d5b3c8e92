"""Validation and generation of the IDs that cross the wire: client request IDs, user and session IDs,
and MLflow trace IDs.

Every ID that reaches a response header, a log line or an MLflow search filter passes through here, so
none can carry CR/LF, quotes or unbounded length.
"""

from __future__ import annotations

import random
import re

# MLflow stores `client_request_id` in a String(50) column and we embed it in a quoted search filter, so
# the charset excludes quotes, backslashes, spaces and control characters.
CLIENT_REQUEST_ID_MAX_LENGTH = 50
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+=@/~-]{0,49}")

# Assessment source IDs are String(250); user and session IDs end up in trace metadata and log lines.
PRINCIPAL_ID_MAX_LENGTH = 250
_PRINCIPAL_ID = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]{0,248}[\x21-\x7e])?")

# Only the forms MLflow issues, since trace IDs go into the tracking server's URL paths: "tr-" + 32 hex
# digits (MLflow 3 experiments), 32 hex digits (MLflow 2 request IDs), and "trace:/<catalog>.<schema>/"
# + 32 hex digits (Unity Catalog locations). No other shape reaches the server: no "/..", no odd IDs that
# make it answer errors.
_TRACE_ID = re.compile(r"(?:tr-)?[0-9a-f]{32}|trace:/[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*/[0-9a-f]{32}")


def is_valid_client_request_id(value: str) -> bool:
    """Whether `value` can be stored as an MLflow `client_request_id` and echoed in a header."""
    return _CLIENT_REQUEST_ID.fullmatch(value) is not None


def new_client_request_id() -> str:
    """A fresh client request ID: 128 random bits in hex, 32 characters, like a UUID4's hex.

    Drawn as OpenTelemetry draws trace IDs (`random.getrandbits`), not from `os.urandom`: that system call
    releases the GIL, and the event loop then waits to get it back from the export threads, on every
    request. The ID identifies a request; it is no secret (signed feedback tokens are what authorize).
    """
    return f"{random.getrandbits(128):032x}"


def clean_principal_id(value: str | None) -> str | None:
    """A user or session ID fit for trace metadata and assessment sources, or None when it is not."""
    if value and _PRINCIPAL_ID.fullmatch(value):
        return value
    return None


def is_valid_trace_id(value: str) -> bool:
    """Whether `value` is shaped like an MLflow trace ID (existence is the backend's to say)."""
    return _TRACE_ID.fullmatch(value) is not None
