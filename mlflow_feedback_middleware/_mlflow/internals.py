"""Every private MLflow (and OpenTelemetry) name the middleware touches, and nothing else.

MLflow has no public API for what these do: hooking its trace exporter, building its tracer ahead of
the first request, sending a trace info the way its REST client does, continuing a caller's trace. Each
touch-point is one function here, listed in `TOUCH_POINTS` with why it is needed. All of them:

- run only on the mlflow-tracing versions they were verified with (`VERIFIED`, the oldest and newest
  that CI tests) and their later minor releases, never on another major version;
- are guarded where they run: a missing or changed internal makes the function return its fallback,
  which is MLflow's own behaviour (its exporter unhooked, its client, no rename), and logs one warning per
  touch-point that says "MLflow API changed" and names the version. It never raises, and never passes
  for an unreachable tracking server.

`tests/unit/test_mlflow_internals.py` deletes each internal in turn and checks the fallback.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import mlflow

logger = logging.getLogger("mlflow_feedback_middleware")

# The oldest and newest mlflow-tracing CI runs the suite with (`make test-oldest`, `make test`).
VERIFIED = ("3.12.0", "3.17.2")


def _release(version: str) -> tuple[int, ...]:
    parts = []
    for part in version.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


MLFLOW_VERSION: str = getattr(mlflow, "__version__", "0")
# Internals change between majors without notice: on another major, none is touched (MLflow's own behaviour).
VERSION_SUPPORTED = _release(VERIFIED[0]) <= _release(MLFLOW_VERSION) < (_release(VERIFIED[1])[0] + 1,)

# touch-point -> (the private names it uses, why)
TOUCH_POINTS: dict[str, tuple[str, str]] = {
    "trace_exporter": (
        "mlflow.tracing.provider._get_trace_exporter",
        "find the exporter MLflow uses now, to count its losses and speed it up",
    ),
    "span_processor": (
        "mlflow.tracing.provider._get_span_processor",
        "find the OTLP batch processor, to count its drops",
    ),
    "build_tracer": (
        "mlflow.tracing.provider._get_tracer",
        "build the tracer at start-up, not inside the first request (0.4-2 s on the event loop)",
    ),
    "export_queue": (
        "MlflowV3SpanExporter._async_queue._queue, its tasks' handler and args",
        "count and spool what MLflow's full export queue drops; spool the queue at the shutdown deadline",
    ),
    "exporter_client": (
        "MlflowV3SpanExporter._client, _store_supports_log_spans, TracingClient.store.get_host_creds",
        "the fast trace-info client and the info-before-spans order",
    ),
    "start_trace_body": (
        "mlflow.entities.trace_info_v2._truncate_request_metadata/_truncate_tags,"
        " mlflow.tracking.request_header.registry.resolve_request_headers,"
        " mlflow.protos.service_pb2.StartTraceV3, mlflow.utils.proto_json_utils.message_to_json,"
        " mlflow.utils.workspace_context.get_request_workspace",
        "build the StartTraceV3 request exactly as MLflow's REST client does",
    ),
    "otlp_drop_metrics": (
        "opentelemetry BatchSpanProcessor._batch_processor._metrics.drop_items",
        "count the spans OTLP export drops",
    ),
    "otlp_export": (
        "mlflow.tracing.provider.reset, mlflow.tracing.utils.otlp.build_otlp_headers",
        "switch MLflow to its batched OTLP exporter (export='otlp')",
    ),
    "flush_provider": ("mlflow.tracing.provider.provider", "flush the OTLP batch processor at shutdown"),
    "server_version_cache": (
        "mlflow.store.tracking.rest_store.RestStore._get_server_version (an lru_cache)",
        "forget a failed lookup of the server's version: MLflow caches it for the process, and one /version"
        " answer slower than its 3 s timeout would send every later trace's spans as an artifact",
    ),
    "tracking_service_client": (
        "mlflow.tracking._tracking_service.client.TrackingServiceClient",
        "find or create the experiment with mlflow-tracing only (it has no MlflowClient)",
    ),
    "trace_manager": (
        "mlflow.tracing.trace_manager.InMemoryTraceManager",
        "move handler tags onto OTLP root spans; register a continued caller's trace",
    ),
    "rename_span": ("LiveSpan._span.update_name", "name the root span after the route template"),
    "continue_trace": (
        "mlflow.tracing.provider.get_context_api, mlflow.tracing.utils.generate_mlflow_trace_id_from_otel_trace_id",
        "continue a trusted caller's W3C trace",
    ),
    "absent_module_markers": (
        "sys.modules entries for packages MLflow probes and that are not installed",
        "skip MLflow's failed imports on every span and tracking-server call (a fifth of the request CPU)",
    ),
}

_warned: set[str] = set()
_warn_lock = threading.Lock()


def api_changed(touch_point: str, error: BaseException | str, fallback: str) -> None:
    """Log, once per touch-point, that an MLflow internal is missing or changed and what happens instead."""
    with _warn_lock:
        if touch_point in _warned:
            return
        _warned.add(touch_point)
    names = TOUCH_POINTS[touch_point][0]
    detail = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    logger.warning(
        "MLflow API changed (mlflow-tracing %s; verified with %s to %s): %s (%s); %s",
        MLFLOW_VERSION,
        *VERIFIED,
        names,
        detail,
        fallback,
    )


def _internal(touch_point: str, module: str, name: str, fallback: str) -> Any:
    """MLflow's `module`.`name`, or None (warned once, with `fallback` said) when the version is not one the
    touch-point was verified with or the name is gone. Only the lookup counts as an API change: what the
    internal raises when called is the caller's to handle, as MLflow's own errors."""
    if not VERSION_SUPPORTED:
        api_changed(touch_point, "major version not verified", fallback)
        return None
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        api_changed(touch_point, exc, fallback)
        return None


# --- MLflow's tracer provider and exporter -------------------------------------------------------------

_PROVIDER = "mlflow.tracing.provider"
_UNHOOKED = "export losses are not counted and MLflow's exporter is not sped up"


def trace_exporter() -> Any:
    """The exporter of MLflow's current tracer provider, or None (not built yet, or MLflow moved it)."""
    get = _internal("trace_exporter", _PROVIDER, "_get_trace_exporter", _UNHOOKED)
    try:
        return None if get is None else get()
    except Exception:
        logger.debug("cannot read MLflow's trace exporter", exc_info=True)
        return None


def span_processor() -> Any:
    """MLflow's current span processor, or None."""
    get = _internal("span_processor", _PROVIDER, "_get_span_processor", "OTLP drops are not counted")
    try:
        return None if get is None else get()
    except Exception:
        logger.debug("cannot read MLflow's span processor", exc_info=True)
        return None


def build_tracer(name: str) -> bool:
    """Build MLflow's tracer provider and exporter now, on this thread; False where that is not possible
    (MLflow then builds them inside the first span, as it intends)."""
    get_tracer = _internal(
        "build_tracer", _PROVIDER, "_get_tracer", "MLflow builds its tracer inside the first request"
    )
    if get_tracer is None:
        return False
    try:
        get_tracer(name)
    except Exception:  # the first span will meet (and report) the same problem, as without the middleware
        logger.debug("could not set up MLflow's tracer ahead of the first request", exc_info=True)
        return False
    return True


def is_mlflow_exporter(exporter: Any) -> bool:
    """Whether `exporter` is MLflow's own (``MlflowV3SpanExporter``), the one the hooks below know."""
    cls = _internal(
        "exporter_client",
        "mlflow.tracing.export.mlflow_v3",
        "MlflowV3SpanExporter",
        "trace infos go through MLflow's own client",
    )
    return cls is not None and type(exporter) is cls


def export_queue(exporter: Any) -> Any:
    """The task queue of MLflow's async exporter, or None (synchronous export, or another exporter)."""
    if not VERSION_SUPPORTED:
        return None
    return getattr(getattr(exporter, "_async_queue", None), "_queue", None)


@dataclass(frozen=True)
class ExportTask:
    """What one task of MLflow's export queue carries: a whole trace (its info and spans) or a span batch."""

    trace: Any = None  # an mlflow Trace, for a trace-info task
    location: str | None = None  # the experiment ID, for a span-batch task
    spans: list[Any] | None = None


def decode_task(task: Any) -> ExportTask | None:
    """The trace or span batch an export-queue task sends (``_log_trace(trace)`` or ``_log_spans(location,
    spans, ...)``), or None for a task of another kind."""
    name = getattr(getattr(task, "handler", None), "__name__", "")
    args: Any = getattr(task, "args", ())
    if name == "_log_trace" and args and getattr(args[0], "info", None) is not None:
        return ExportTask(trace=args[0])
    if name == "_log_spans" and len(args) > 1:
        return ExportTask(location=str(args[0]), spans=list(args[1]))
    return None


def wrap_task_handler(task: Any, wrap: Callable[[Any], Any]) -> None:
    """Replace an export task's handler by `wrap(handler)` (once; the wrapper is marked as such)."""
    handler = getattr(task, "handler", None)
    if handler is not None and not getattr(handler, "_counted", False):
        wrapped = wrap(handler)
        wrapped._counted = True
        wrapped.__name__ = getattr(handler, "__name__", "handler")  # decode_task reads it
        task.handler = wrapped


def exporter_client(exporter: Any) -> Any:
    """The tracking client inside MLflow's exporter, or None."""
    return getattr(exporter, "_client", None) if VERSION_SUPPORTED else None


def replace_exporter_client(exporter: Any, client: Any) -> None:
    """Make MLflow's exporter send through `client`."""
    exporter._client = client


def exporter_logs_spans(exporter: Any) -> bool:
    """Whether MLflow's exporter sends spans to the tracking store (else they go in an artifact)."""
    return bool(getattr(exporter, "_store_supports_log_spans", False))


def stop_span_logging(exporter: Any) -> None:
    """Make MLflow's exporter upload spans as an artifact from now on, as it does for a server without
    span support."""
    exporter._store_supports_log_spans = False


def host_creds(client: Any) -> Any:
    """The credentials of the REST store behind MLflow's tracking client, or None."""
    get = getattr(getattr(client, "store", None), "get_host_creds", None)
    return None if get is None else get()


# --- The StartTraceV3 request as MLflow's REST client builds it -------------------------------------------

_START_TRACE_MISSING: str | None = None
try:
    from mlflow.entities.trace_info_v2 import _truncate_request_metadata, _truncate_tags
    from mlflow.protos.service_pb2 import StartTraceV3
    from mlflow.tracking.request_header.registry import resolve_request_headers
    from mlflow.utils.proto_json_utils import message_to_json
except ImportError as exc:
    _START_TRACE_MISSING = f"{type(exc).__name__}: {exc}"
try:
    from mlflow.utils.workspace_context import get_request_workspace as _get_request_workspace
except ImportError:  # MLflow before workspaces: no request has one
    _get_request_workspace = None  # type: ignore[assignment]


def start_trace_helpers_available() -> bool:
    """Whether the request-building internals are there; warns once when not."""
    if _START_TRACE_MISSING is not None or not VERSION_SUPPORTED:
        api_changed(
            "start_trace_body",
            _START_TRACE_MISSING or "major version not verified",
            "trace infos go through MLflow's own client, as without this middleware (about 3 ms more CPU per"
            " trace; nothing is lost)",
        )
        return False
    return True


def truncate_request_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """Trace metadata cut to the tracking store's limits, as MLflow's client cuts it."""
    return dict(_truncate_request_metadata(metadata))


def truncate_tags(tags: dict[str, str]) -> dict[str, str]:
    """Trace tags cut to the tracking store's limits, as MLflow's client cuts them."""
    return dict(_truncate_tags(tags))


def request_headers() -> dict[str, str]:
    """The headers MLflow's registered header providers add to every request."""
    return {str(k): str(v) for k, v in resolve_request_headers().items()}


def request_workspace() -> str | None:
    """The MLflow workspace of the current request context, if any."""
    return None if _get_request_workspace is None else _get_request_workspace()


def start_trace_proto_json(trace: Any) -> str:
    """The StartTraceV3 body for `trace` through MLflow's own protobuf conversion."""
    return str(message_to_json(StartTraceV3(trace=trace.to_proto())))


# --- OpenTelemetry and MLflow's OTLP set-up ---------------------------------------------------------------


def otlp_drop_metrics(processor: Any) -> Any:
    """The metrics object whose ``drop_items`` OpenTelemetry's batch processor calls for dropped spans, or None."""
    if not VERSION_SUPPORTED:
        return None
    return getattr(getattr(processor, "_batch_processor", None), "_metrics", None)


def otlp_headers(experiment_id: str) -> dict[str, str] | None:
    """The headers MLflow's OTLP exporter needs for `experiment_id`, or None."""
    build = _internal(
        "otlp_export", "mlflow.tracing.utils.otlp", "build_otlp_headers", "traces go through MLflow's own exporter"
    )
    return None if build is None else dict(build(experiment_id))


def reset_provider() -> bool:
    """Make MLflow rebuild its tracer provider (and pick its span processors anew) with the next span."""
    reset = _internal("otlp_export", _PROVIDER, "reset", "traces go through MLflow's own exporter")
    if reset is None:
        return False
    reset()
    return True


def flush_provider(timeout_millis: int) -> None:
    """Flush the span processors of MLflow's tracer provider (the OTLP batch processor)."""
    provider = _internal("flush_provider", _PROVIDER, "provider", "OTLP batches are flushed by OpenTelemetry at exit")
    current = provider.get() if provider is not None else None
    if current is not None:  # None before the process's first span: nothing to flush
        current.force_flush(timeout_millis)


def forget_server_version() -> bool:
    """Clear MLflow's cached tracking-server versions, so its next span upload asks the server again; False
    where MLflow no longer caches them this way (its own behaviour stays: spans go as an artifact)."""
    fallback = "a failed server-version lookup keeps spans out of the tracking store for this process"
    store = _internal("server_version_cache", "mlflow.store.tracking.rest_store", "RestStore", fallback)
    if store is None:
        return False
    clear = getattr(getattr(store, "_get_server_version", None), "cache_clear", None)
    if clear is None:
        api_changed("server_version_cache", "RestStore._get_server_version has no cache_clear", fallback)
        return False
    clear()
    return True


# --- Experiments, in-memory traces, spans ---------------------------------------------------------------


def tracking_service_client(uri: str) -> Any:
    """MLflow's tracking-service client for `uri` (mlflow-tracing has no ``MlflowClient``).

    Raises ImportError when MLflow moved it: no experiment can be found without it, so the caller turns
    tracing off with a message naming the API change (never "server unreachable")."""
    if not VERSION_SUPPORTED:
        raise ImportError(f"mlflow-tracing {MLFLOW_VERSION} is outside the verified major version")
    from mlflow.tracking._tracking_service.client import TrackingServiceClient

    return TrackingServiceClient(uri)


def _trace_manager() -> Any:
    manager = _internal(
        "trace_manager",
        "mlflow.tracing.trace_manager",
        "InMemoryTraceManager",
        "tags set by handlers stay where MLflow puts them; callers' traces are not continued",
    )
    return None if manager is None else manager.get_instance()


@contextmanager
def in_memory_trace(trace_id: str) -> Iterator[Any]:
    """MLflow's in-memory trace of a running request (None when unknown, or when MLflow moved it)."""
    manager = _trace_manager()
    if manager is None:
        yield None
        return
    with manager.get_trace(trace_id) as trace:
        yield trace


def rename_span(span: Any, name: str) -> bool:
    """Rename a live span (MLflow has no public rename; the OpenTelemetry span it wraps has one)."""
    otel_span = getattr(span, "_span", None) if VERSION_SUPPORTED else None
    update_name = getattr(otel_span, "update_name", None)
    if update_name is None:
        api_changed("rename_span", "a live span without _span.update_name", "root spans keep the request path as name")
        return False
    update_name(name)
    return True


@dataclass(frozen=True)
class TraceContinuation:
    """What continuing a caller's trace needs of MLflow: its trace manager, context API and ID mapping."""

    manager: Any
    context_api: Any
    mlflow_trace_id: Callable[[int], str]


def trace_continuation() -> TraceContinuation | None:
    """The internals that continue a caller's W3C trace, or None (requests then start traces of their own)."""
    fallback = "each request starts a trace of its own"
    get_context_api = _internal("continue_trace", _PROVIDER, "get_context_api", fallback)
    to_mlflow_id = _internal(
        "continue_trace", "mlflow.tracing.utils", "generate_mlflow_trace_id_from_otel_trace_id", fallback
    )
    manager = _trace_manager()
    if get_context_api is None or to_mlflow_id is None or manager is None:
        return None
    return TraceContinuation(manager, get_context_api(), to_mlflow_id)


# --- Imports MLflow probes on every span --------------------------------------------------------------

# Modules MLflow imports, and expects to be missing, on every span (model-serving context, agent hints)
# and on every tracking-server call (notebook and Databricks detection): package -> submodules imported.
_PROBED_MODULES = {
    "mlflow.pyfunc": ("mlflow.pyfunc.context",),
    "mlflow.agent": ("mlflow.agent.hint",),
    "IPython": (),
    "dbruntime": ("dbruntime.databricks_repl_context",),
    "pyspark": ("pyspark.sql",),
}


def mark_absent_modules() -> None:
    """Make MLflow's repeated imports of modules that are not installed fail fast.

    MLflow catches the ImportError of each such probe, but Python does not cache failed imports, so
    every probe searches sys.path again, under the import lock: about a fifth of the request-path CPU,
    and more on the export threads (six probes per tracking-server call). A None entry in sys.modules is
    Python's own marker for "known absent" and makes the import fail at once. Only packages that are not
    installed are marked; nothing changes for those that are.
    """
    if not VERSION_SUPPORTED:
        return
    for package, submodules in _PROBED_MODULES.items():
        try:
            absent = package not in sys.modules and importlib.util.find_spec(package) is None
        except (ImportError, ValueError):  # a parent package that is itself absent or half-imported
            absent = False
        if absent:
            for name in (package, *submodules):
                sys.modules[name] = None  # type: ignore[assignment]
