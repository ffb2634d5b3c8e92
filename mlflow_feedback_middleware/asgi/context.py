"""Per-request IDs for handler code, held in ContextVars so concurrent requests never see each other's."""

from __future__ import annotations

import logging
from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RequestIds:
    """The IDs the middleware gave one request."""

    trace_id: str
    client_request_id: str
    feedback_token: str | None = None


current_ids: ContextVar[RequestIds | None] = ContextVar("mlflow_feedback_request_ids", default=None)


def get_trace_id() -> str | None:
    """The MLflow trace ID of the request being handled, or None outside a traced request."""
    ids = current_ids.get()
    return ids.trace_id if ids else None


def get_client_request_id() -> str | None:
    """The client request ID of the request being handled, or None outside a traced request."""
    ids = current_ids.get()
    return ids.client_request_id if ids else None


def get_feedback_token() -> str | None:
    """The feedback token of the request being handled (None without a secret or outside a traced request)."""
    ids = current_ids.get()
    return ids.feedback_token if ids else None


class TraceIdLogFilter(logging.Filter):
    """Puts ``mlflow_trace_id`` and ``client_request_id`` on every log record ("-" outside a traced request).

    Add it to a handler, then use the fields in its format::

        handler.addFilter(TraceIdLogFilter())
        handler.setFormatter(logging.Formatter("%(levelname)s [%(mlflow_trace_id)s %(client_request_id)s] %(message)s"))
    """

    def filter(self, record: logging.LogRecord) -> bool:
        ids = current_ids.get()
        record.mlflow_trace_id = ids.trace_id if ids else "-"
        record.client_request_id = ids.client_request_id if ids else "-"
        return True
