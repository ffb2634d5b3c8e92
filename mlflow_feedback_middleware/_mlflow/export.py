"""How traces leave the process: MLflow's exporter (sped up) or its batched OTLP one, flushing, and what
MLflow's export queue still holds at the shutdown deadline."""

from __future__ import annotations

import importlib.util
import logging
import os
import queue
from typing import Any
from urllib.parse import quote, urlparse

import mlflow

from . import internals
from .export_losses import release_held
from .trace_info_client import FastTraceInfoClient, install_fast_trace_info_client

logger = logging.getLogger("mlflow_feedback_middleware")


def flush_exports(timeout: float) -> None:
    """Drain MLflow's export queue and the tracer provider's batch processors (blocking)."""
    mlflow.flush_trace_async_logging()
    internals.flush_provider(int(timeout * 1000))


def use_otlp_export(uri: str, experiment_id: str) -> bool:
    """Switch MLflow to its batched OTLP exporter, sending to the tracking server's ``/v1/traces``.

    MLflow's own exporter makes two HTTP calls per trace (spans, then trace info); OTLP batches the
    spans of many traces in one protobuf request and the server builds the trace info from them. MLflow
    configures OTLP export only through OpenTelemetry's standard environment variables, so they are set
    for the whole process. Returns whether the switch happened.
    """
    if urlparse(uri).scheme not in ("http", "https"):
        logger.error("export='otlp' needs an http(s):// tracking server, not %r; using MLflow's exporter", uri)
        return False
    if importlib.util.find_spec("opentelemetry.exporter.otlp.proto.http") is None:
        logger.error(
            "export='otlp' needs opentelemetry-exporter-otlp-proto-http "
            "(pip install 'mlflow-feedback-middleware[otlp]'); using MLflow's exporter"
        )
        return False
    otlp_headers = internals.otlp_headers(experiment_id)
    if otlp_headers is None:
        return False
    headers = ",".join(f"{quote(k)}={quote(v)}" for k, v in otlp_headers.items())
    os.environ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = uri.rstrip("/") + "/v1/traces"
    os.environ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] = "http/protobuf"
    os.environ["OTEL_EXPORTER_OTLP_TRACES_HEADERS"] = headers
    # MLflow picks its span processors when the tracer provider is (re)built.
    return internals.reset_provider()


def spool_unexported(spool: Any) -> int:
    """Move what MLflow's export queue still holds into `spool` (at shutdown, after the flush deadline):
    trace infos of trace tasks, span batches of span tasks. Returns the traces spooled. Never raises."""
    spooled = 0
    spool.flush_deferred(5.0)  # what the full queue handed over before the deadline
    try:
        exporter = internals.trace_exporter()
        export_queue = internals.export_queue(exporter)
        while export_queue is not None:
            try:
                task = internals.decode_task(export_queue.get_nowait())
            except queue.Empty:
                break
            if task is not None and task.trace is not None:
                release_held(task.trace.info.trace_id)
                spooled += int(spool.add_info(task.trace.info, list(getattr(task.trace.data, "spans", None) or [])))
            elif task is not None and task.spans is not None:
                spool.add_spans(str(task.location), task.spans)
        client = internals.exporter_client(exporter)
        for location, spans in client.release_held() if isinstance(client, FastTraceInfoClient) else ():
            spool.add_spans(location, spans)  # spans the fast client held for a trace info not sent yet
    except Exception:
        logger.warning("could not spool the traces MLflow had not exported", exc_info=True)
    if spooled:
        logger.warning("%d trace(s) not exported by the shutdown deadline were spooled for replay", spooled)
    return spooled


def speed_up_mlflow_exporter() -> bool:
    """Make MLflow's own exporter cheaper per trace without changing what it stores. Never raises.

    Installs the fast trace-info client (`trace_info_client`); returns whether it is in place. Span
    batches stay at MLflow's size (5): with larger ones (64, 256) a sqlite-backed server dropped the spans
    of dozens of traces per batch ("Could not create trace_info ... after 10 retries"), because each
    trace-info write landing mid-batch makes the whole batch start over.
    """
    exporter = internals.trace_exporter()
    if not internals.is_mlflow_exporter(exporter):
        return False
    try:
        return install_fast_trace_info_client(exporter) is not None
    except Exception:  # a bug of ours must not cost the request path: MLflow's client stays
        logger.warning("cannot install the fast trace-info client", exc_info=True)
        return False
