"""Continuing a caller's distributed trace from its W3C ``traceparent`` header.

MLflow's own helper (`set_tracing_context_from_http_request_headers`) registers the remote trace without
a destination, and a span started with ``trace_destination`` under a remote parent comes back a no-op;
without one, the spans would go to whatever experiment is current in the process. So the remote trace
is registered here with the middleware's experiment, and the request's root span starts as a child of
the caller's span: it shares the caller's trace ID, as MLflow defines distributed traces.

MLflow exports such spans on their own (the caller exports the trace itself), from a background batch
that looks the trace up when it runs; the remote entry is therefore dropped some seconds after the
request, not at its end.
"""

from __future__ import annotations

import collections
import logging
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import mlflow
from mlflow.entities import LiveSpan, MlflowExperimentLocation, SpanType, TraceInfo, TraceState
from mlflow.entities.trace_location import TraceLocation
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from . import internals

_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16
_KEEP_SECONDS = 60.0  # longer than MLflow's export batches take to collect a trace's spans

logger = logging.getLogger("mlflow_feedback_middleware")
_expiring: collections.deque[tuple[float, int]] = collections.deque()
_lock = threading.Lock()


def valid_traceparent(value: str | None) -> str | None:
    """The header value when it is a well-formed version-00 ``traceparent`` with non-zero IDs, else None."""
    if value is None:
        return None
    value = value.strip().lower()
    match = _TRACEPARENT.fullmatch(value)
    if match is None or match.group(1) == _ZERO_TRACE or match.group(2) == _ZERO_SPAN:
        return None
    return value


def _drop_expired(manager: Any, now: float) -> None:
    with _lock:
        while _expiring and _expiring[0][0] <= now:
            _, otel_trace_id = _expiring.popleft()
            manager.pop_trace(otel_trace_id)


@contextmanager
def continued_root(name: str, traceparent: str, experiment_id: str) -> Iterator[LiveSpan]:
    """A root span for this request, child of the caller's span named by `traceparent` (validated)."""
    continuation = internals.trace_continuation()
    try:
        if continuation is None:
            raise LookupError("MLflow's trace-continuation internals are missing")
        manager = continuation.manager
        _drop_expired(manager, time.monotonic())
        otel_trace_id = int(traceparent[3:35], 16)
        trace_id = continuation.mlflow_trace_id(otel_trace_id)
        with manager.get_trace(trace_id) as local:
            registered = local is None  # else the caller runs in this very process: its trace is already here
        if registered:
            location = TraceLocation.from_experiment_id(experiment_id)
            info = TraceInfo(trace_id, location, int(time.time() * 1000), TraceState.IN_PROGRESS)
            manager.register_trace(otel_trace_id, info, is_remote_trace=True)
        context_api = continuation.context_api
        token = context_api.attach(TraceContextTextMapPropagator().extract({"traceparent": traceparent}))
    except Exception:  # MLflow internals moved: a trace of its own beats a failed request
        logger.warning("could not continue the caller's trace; starting a new one", exc_info=True)
        destination = MlflowExperimentLocation(experiment_id=experiment_id)
        with mlflow.start_span(name, span_type=SpanType.CHAIN, trace_destination=destination) as span:
            yield span
        return
    try:
        with mlflow.start_span(name, span_type=SpanType.CHAIN) as span:
            yield span
    finally:
        context_api.detach(token)
        if registered:
            with _lock:
                _expiring.append((time.monotonic() + _KEEP_SECONDS, otel_trace_id))
