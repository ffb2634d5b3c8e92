"""How traces leave the process: MLflow's exporter or its batched OTLP one, flushing, and the import
probes that made MLflow's span and export code slow where optional packages are absent."""

from __future__ import annotations

import importlib.util
import logging
import os
import queue
import sys
from typing import Any
from urllib.parse import urlparse

import mlflow

from .export_losses import _export_queue, _release_held

logger = logging.getLogger("mlflow_feedback_middleware")


# Modules MLflow imports, and expects to be missing, on every span (model-serving context, agent hints)
# and on every tracking-server call (notebook and Databricks detection): package -> submodules imported.
_PROBED_MODULES = {
    "mlflow.pyfunc": ("mlflow.pyfunc.context",),
    "mlflow.agent": ("mlflow.agent.hint",),
    "IPython": (),
    "dbruntime": ("dbruntime.databricks_repl_context",),
    "pyspark": ("pyspark.sql",),
}


def skip_absent_module_probes() -> None:
    """Make MLflow's repeated imports of modules that are not installed fail fast.

    MLflow catches the ImportError of each such probe, but Python does not cache failed imports, so
    every probe searches sys.path again, under the import lock: about a fifth of the request-path CPU,
    and more on the export threads (six probes per tracking-server call). A None entry in sys.modules is
    Python's own marker for "known absent" and makes the import fail at once. Only packages that are not
    installed are marked; nothing changes for those that are.
    """
    for package, submodules in _PROBED_MODULES.items():
        if package not in sys.modules and importlib.util.find_spec(package) is None:
            for name in (package, *submodules):
                sys.modules[name] = None  # type: ignore[assignment]


def flush_exports(timeout: float) -> None:
    """Drain MLflow's export queue and the tracer provider's batch processors (blocking)."""
    from mlflow.tracing.provider import provider

    mlflow.flush_trace_async_logging()
    provider.get().force_flush(int(timeout * 1000))


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
    from urllib.parse import quote

    from mlflow.tracing.provider import reset
    from mlflow.tracing.utils.otlp import build_otlp_headers

    headers = ",".join(f"{quote(k)}={quote(v)}" for k, v in build_otlp_headers(experiment_id).items())
    os.environ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = uri.rstrip("/") + "/v1/traces"
    os.environ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] = "http/protobuf"
    os.environ["OTEL_EXPORTER_OTLP_TRACES_HEADERS"] = headers
    reset()  # MLflow picks its span processors when the tracer provider is (re)built
    return True


def spool_unexported(spool: Any) -> int:
    """Move what MLflow's export queue still holds into `spool` (at shutdown, after the flush deadline):
    trace infos of trace tasks, span batches of span tasks. Returns the traces spooled. Never raises."""
    spooled = 0
    spool.flush_deferred(5.0)  # what the full queue handed over before the deadline
    try:
        from mlflow.tracing.provider import _get_trace_exporter

        export_queue = _export_queue(_get_trace_exporter())
        while export_queue is not None:
            try:
                task = export_queue.get_nowait()
            except queue.Empty:
                break
            name = getattr(getattr(task, "handler", None), "__name__", "")
            args: Any = getattr(task, "args", ())
            if name == "_log_trace" and args and getattr(args[0], "info", None) is not None:
                _release_held(args[0].info.trace_id)
                spooled += int(spool.add_info(args[0].info, list(getattr(args[0].data, "spans", None) or [])))
            elif name == "_log_spans" and len(args) > 1:
                spool.add_spans(str(args[0]), list(args[1]))
        release_held = getattr(getattr(_get_trace_exporter(), "_client", None), "release_held", None)
        for location, spans in release_held() if release_held is not None else ():
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
    try:
        from mlflow.tracing.export.mlflow_v3 import MlflowV3SpanExporter
        from mlflow.tracing.provider import _get_trace_exporter

        from .trace_info_client import install_fast_trace_info_client

        exporter = _get_trace_exporter()
        if type(exporter) is not MlflowV3SpanExporter:
            return False
        return install_fast_trace_info_client(exporter) is not None
    except Exception:
        logger.debug("cannot tune MLflow's exporter", exc_info=True)
        return False
