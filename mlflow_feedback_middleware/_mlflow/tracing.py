"""The MLflow side of the middleware: where traces go, starting and naming root spans, running calls.

Everything that talks to MLflow's tracking store runs on a small thread pool of our own, never on the
event loop and never on the app's threadpool (a slow tracking server must not starve sync handlers).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import AbstractContextManager, suppress
from typing import Any, TypeVar
from urllib.parse import urlparse

import mlflow
from mlflow.entities import LiveSpan, MlflowExperimentLocation, SpanType
from mlflow.exceptions import MlflowException

from ..logs import without_credentials
from . import internals
from .distributed import continued_root
from .export import flush_exports, speed_up_mlflow_exporter, spool_unexported, use_otlp_export
from .export_losses import export_losses
from .server_watch import backoff_seconds, probe
from .trace_info_client import close_fast_connections
from .trace_spool import current_spool

logger = logging.getLogger("mlflow_feedback_middleware")

T = TypeVar("T")

# Schemes that reach a tracking server over the network: a failure there may pass, so we retry. Any other
# scheme (sqlite, file paths) is local; a failure there is a configuration problem that will not pass.
_REMOTE_SCHEMES = {"http", "https", "databricks", "databricks-uc", "uc"}
_TRACE_NAME_TAG = "mlflow.traceName"


class DaemonExecutor:
    """Runs blocking MLflow calls on up to `threads` daemon threads, started as needed.

    Not a ThreadPoolExecutor: the interpreter joins those threads at exit, and MLflow's client retries a
    refused connection for about four minutes (measured: a process whose work was done took 247 s to exit
    with the tracking server down). Daemon threads end with the process; what must be finished at exit
    (held traces, queued feedback) is flushed by the exit hooks, within their deadlines.
    """

    _names = itertools.count()

    def __init__(self, threads: int, name: str) -> None:
        self._max = threads
        self._name = name
        self._work: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]] | None] = (
            queue.SimpleQueue()
        )
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Run `fn(*args)` on a daemon thread; its future."""
        future: Future[T] = Future()
        self._work.put((future, fn, args))
        with self._lock:
            if self._idle == 0 and len(self._threads) < self._max:
                thread = threading.Thread(target=self._run, name=f"{self._name}_{next(self._names)}", daemon=True)
                self._threads.append(thread)
                thread.start()
        return future

    def _run(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            task = self._work.get()
            with self._lock:
                self._idle -= 1
            if task is None:
                return
            future, fn, args = task
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args)
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)

    def shutdown(self) -> None:
        """Cancel what has not started and let every thread end once its current call returns."""
        with self._lock:
            threads, self._threads = self._threads, []
        while True:
            try:
                task = self._work.get_nowait()
            except queue.Empty:
                break
            if task is not None:
                task[0].cancel()
        for _ in threads:
            self._work.put(None)


def _sampling_configured() -> bool:
    """Whether MLFLOW_TRACE_SAMPLING_RATIO makes no-op spans expected (a malformed value counts as no)."""
    try:
        return float(os.environ.get("MLFLOW_TRACE_SAMPLING_RATIO", "1")) < 1
    except ValueError:
        return False


_URI_REMEDY = (
    "Set MLFLOW_TRACKING_URI (or tracking_uri=) to your tracking server, e.g. http://127.0.0.1:5000 (start one with"
    " `mlflow server`), or 'databricks'; a local sqlite:/// store needs the full package (pip install mlflow)."
)


class MlflowBackend:
    """Resolves the experiment traces go to, once and off the event loop, and runs MLflow calls.

    Until the experiment is known (tracking server unreachable at start-up, say), requests pass through
    untraced: a client is never handed a trace ID that will never exist.
    """

    def __init__(
        self, tracking_uri: str | None, experiment_name: str | None, threads: int, export: str = "mlflow"
    ) -> None:
        internals.mark_absent_modules()
        if tracking_uri:
            # MLflow's tracing provider has one process-wide tracking URI; setting it is the only way.
            mlflow.set_tracking_uri(tracking_uri)
        self._experiment_name = experiment_name
        self._export = export
        self.otlp = False  # traces go through MLflow's batched OTLP exporter (export="otlp")
        self._threads = threads
        self._executor = self._new_executor()
        self._lock = threading.Lock()
        self._attempt: Future[str | None] | None = None
        self._failures = 0
        self._next_attempt_at = 0.0
        self._location: MlflowExperimentLocation | None = None
        self.experiment_id: str | None = None
        self.disabled_reason: str | None = None
        self._noop_warned = False
        self.losses = export_losses
        self._hooked_exporter: Any = None  # MLflow builds its exporter with the first span, and anew on a reset
        self._startup_deadline: float | None = None
        self.startup_waits = 0  # calls that waited for the experiment (the first ones, within the start-up wait)
        self._slow = False  # the last attempt failed because the server answered too slowly
        self.announcement = ""  # what the start-up line adds (the middleware's feedback routes)

    def _new_executor(self) -> DaemonExecutor:
        return DaemonExecutor(self._threads, "mlflow-feedback")

    @property
    def unreachable(self) -> bool:
        """Whether resolving the experiment is failing (and has been warned about)."""
        return self._failures > 0

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking MLflow call on the backend's threads and await its result."""
        return await asyncio.wrap_future(self._executor.submit(fn, *args))

    def _resolve(self) -> str | None:
        try:
            uri = mlflow.get_tracking_uri()
        except Exception as exc:  # mlflow-tracing raises here when no URI is configured at all
            if not os.environ.get("MLFLOW_TRACKING_URI"):
                # MLflow's default is a local sqlite store, which needs the full package (its error names a
                # missing module, such as sqlparse, which sends people the wrong way).
                self._disable(
                    "no tracking URI is set, and MLflow's default (a local sqlite:///mlflow.db store) needs the"
                    f" full mlflow package ({type(exc).__name__}: {exc})"
                )
            else:
                self._disable(f"no usable tracking URI ({type(exc).__name__}: {exc})")
            return None
        remote = urlparse(uri).scheme in _REMOTE_SCHEMES
        try:
            # A brief look first: MLflow's client would retry a refused connection for minutes.
            unreachable = probe(uri, 2.0)
            if unreachable is not None:
                raise ConnectionError(unreachable)
            experiment_id = self._find_experiment(uri)
        except (ImportError, AttributeError) as exc:
            # Not an outage: retrying would never help, and "unreachable" would send the operator the wrong way.
            self._disable(
                f"MLflow API changed (mlflow-tracing {mlflow.__version__}: {type(exc).__name__}: {exc})",
                "Install an mlflow-tracing version this middleware supports (see its metadata), or a newer one.",
            )
            return None
        except Exception as exc:
            if not remote:
                self._disable(
                    f"tracking URI {without_credentials(uri)!r} is not usable here ({type(exc).__name__}: {exc})"
                )
                return None
            delay = backoff_seconds(self._failures + 1)
            self._slow = isinstance(exc, TimeoutError) or "timed out" in str(exc)
            if self._failures == 0:
                logger.warning(
                    "MLflow tracking server %s is unreachable (%s); requests pass through untraced, "
                    "retrying in the background",
                    without_credentials(uri),
                    exc,
                )
            self._failures += 1
            self._next_attempt_at = time.monotonic() + delay
            return None
        if self._failures:
            logger.warning("MLflow tracking server %s is reachable again; tracing resumes", without_credentials(uri))
        self._failures = 0
        if self._export == "otlp":
            self.otlp = use_otlp_export(uri, experiment_id)
        self._warm_up()
        self._location = MlflowExperimentLocation(experiment_id=experiment_id)
        self.experiment_id = experiment_id
        logger.info(
            "tracing requests to experiment %s at %s (export=%s%s)",
            self._experiment_label(experiment_id),
            without_credentials(uri),
            "otlp" if self.otlp else "mlflow",
            self.announcement,
        )
        return experiment_id

    def _experiment_label(self, experiment_id: str) -> str:
        name = self._experiment_name or os.environ.get("MLFLOW_EXPERIMENT_NAME")
        return f"{name!r} (ID {experiment_id})" if name else experiment_id

    def _find_experiment(self, uri: str) -> str:
        name = self._experiment_name or os.environ.get("MLFLOW_EXPERIMENT_NAME")
        return find_experiment(uri, name, os.environ.get("MLFLOW_EXPERIMENT_ID") or "0", create=True)

    def _disable(self, reason: str, remedy: str = _URI_REMEDY) -> None:
        self.disabled_reason = reason
        logger.error(
            "MlflowFeedbackMiddleware is DISABLED: %s. Requests are served untraced and no trace IDs are issued. %s",
            reason,
            remedy,
        )

    def start_resolving(self) -> Future[str | None] | None:
        """Start resolving the experiment if it is not known and an attempt is due; return the attempt."""
        if self.experiment_id is not None or self.disabled_reason is not None:
            return None
        with self._lock:
            if self._attempt is not None and not self._attempt.done():
                return self._attempt
            if time.monotonic() < self._next_attempt_at:
                return None
            self._attempt = self._executor.submit(self._resolve)
            return self._attempt

    async def ready(self, startup_timeout: float) -> str | None:
        """The experiment ID, or None while it is unknown.

        During the first `startup_timeout` seconds (counted from the first call) callers wait for it,
        as a lifespan start-up would; after that they never wait, while retries go on in the background.
        """
        if self.experiment_id is not None:
            return self.experiment_id
        now = time.monotonic()
        if self._startup_deadline is None:
            self._startup_deadline = now + startup_timeout
        waited = False
        while self.experiment_id is None and (remaining := self._startup_deadline - time.monotonic()) > 0:
            attempt = self.start_resolving()
            if attempt is None:
                if not self._slow:
                    break  # refused or not usable: the request passes untraced now, retries go on behind it
                # A server that answered too slowly (starting, or a loaded machine) gets the rest of the start-up
                # wait: its next attempt is due after the back-off.
                await asyncio.sleep(min(max(self._next_attempt_at - time.monotonic(), 0.05), remaining))
                continue
            if not waited:
                self.startup_waits += 1
                waited = True
            with suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(attempt)), remaining)
            if not self._slow:
                break
        return self.experiment_id

    def start_root(self, name: str, traceparent: str | None = None) -> AbstractContextManager[LiveSpan]:
        """A context manager for a request's root span, active in the current context; with a valid
        `traceparent`, a child of the caller's span in the caller's trace."""
        if traceparent is not None and self.experiment_id is not None:
            return continued_root(name, traceparent, self.experiment_id)
        return mlflow.start_span(name, span_type=SpanType.CHAIN, trace_destination=self._location)

    def _warm_up(self) -> None:
        """Build MLflow's tracer provider and exporter now, on this thread, so the first request costs what
        the second does: MLflow builds them inside the first span, on the event loop (0.4-2 s measured)."""
        if internals.build_tracer(__name__):
            self._hook_exporter()

    def _hook_exporter(self) -> None:
        """Count the losses of, and speed up, the exporter MLflow uses now: again whenever MLflow has built a
        new one (`mlflow.set_experiment` and `mlflow.set_tracking_uri` reset its tracer provider). About 3 µs."""
        exporter = internals.trace_exporter()
        if exporter is None or exporter is self._hooked_exporter:
            return
        self._hooked_exporter = exporter
        self.losses.watch()
        if not self.otlp:
            speed_up_mlflow_exporter()

    def close(self) -> None:
        """Release the threads and connections of this backend (at lifespan shutdown, after `flush`).

        A lifespan may start again (a test client entered twice): a fresh executor starts no thread until used.
        """
        executor, self._executor = self._executor, self._new_executor()
        executor.shutdown()
        close_fast_connections()

    def is_real(self, span: Any) -> bool:
        """Whether MLflow gave a recording span (not a no-op one from sampling or a broken set-up)."""
        if isinstance(span, LiveSpan):
            self._hook_exporter()  # where start-up could not (a span before the experiment was resolved)
            return True
        if not self._noop_warned and not _sampling_configured():
            self._noop_warned = True
            logger.warning("MLflow returned a no-op span (tracing disabled or misconfigured); requests get no trace ID")
        return False

    async def flush(self, timeout: float) -> None:
        """Export the traces MLflow still holds, waiting at most `timeout` seconds."""
        if self.experiment_id is None:
            return
        try:
            await asyncio.wait_for(self.run(flush_exports, timeout), timeout)
        except TimeoutError:
            spool = current_spool()
            if spool is None or not spool_unexported(spool):
                logger.warning("MLflow had not exported every trace within the %.0f s shutdown deadline", timeout)
        except Exception:
            logger.warning("could not flush MLflow's trace export", exc_info=True)


# Root-span attributes from which the tracking server's OTLP ingestion builds trace info: OTel's
# semantic-convention user and session IDs, and "mlflow.traceTag.<key>" for tags.
OTLP_TAG_PREFIX = "mlflow.traceTag."
CLIENT_REQUEST_ID_TAG = "mlflow_feedback.client_request_id"


def set_trace_tags(span: LiveSpan, tags: dict[str, str], otlp: bool) -> None:
    """Tag the request's trace.

    With OTLP export, tags go on the root span as attributes the server turns back into tags: MLflow's
    OTLP processor (3.17) tries to copy trace tags onto the span after it has ended, which fails on the
    now-immutable attributes and loses the whole trace.
    """
    if otlp:
        for key, value in tags.items():
            span.set_attribute(OTLP_TAG_PREFIX + key, value)
    else:
        mlflow.update_current_trace(tags=tags)


def hoist_trace_tags(span: LiveSpan) -> None:
    """Move tags that handler code set with `mlflow.update_current_trace(tags=...)` onto the root span.

    With OTLP export, MLflow's processor would copy them there itself, after the span ended, and fail
    (see `set_trace_tags`), losing the trace; moved here first, they survive as tags on the server.
    """
    try:
        with internals.in_memory_trace(span.trace_id) as trace:
            if trace is None:
                return
            tags = trace.info.tags
            for key in [k for k in tags if not k.startswith("mlflow.")]:
                span.set_attribute(OTLP_TAG_PREFIX + key, tags.pop(key))
    except Exception:
        logger.debug("could not move trace tags onto the root span", exc_info=True)


REQUEST_ID_SOURCE_TAG = "mlflow_feedback.request_id_source"


def annotate_trace(
    span: LiveSpan,
    client_request_id: str,
    user_id: str | None,
    session_id: str | None,
    otlp: bool,
    chosen_by_client: bool = False,
) -> None:
    """Record the request's IDs on its trace.

    With OTLP export the server never sees MLflow's in-memory trace info, so they go on the root span,
    where its ingestion reads them; the client request ID becomes a tag (its column stays empty).
    """
    # A client request ID the client chose is known to whoever the client told: it names the request but
    # never authorizes feedback on it (see the feedback routes); other workers read this tag to know.
    tags = {REQUEST_ID_SOURCE_TAG: "client"} if chosen_by_client else None
    try:
        mlflow.update_current_trace(
            client_request_id=client_request_id, user=user_id, session_id=session_id, tags=None if otlp else tags
        )
        if otlp:
            set_trace_tags(span, {CLIENT_REQUEST_ID_TAG: client_request_id, **(tags or {})}, otlp)
            if user_id:
                span.set_attribute("user.id", user_id)
            if session_id:
                span.set_attribute("session.id", session_id)
    except Exception:  # the IDs still go to the client; a failure here must not fail the request
        logger.warning("could not record the request IDs on trace %s", span.trace_id, exc_info=True)


CALLER_TRACE_TAG = "mlflow_feedback.caller_trace_id"


def link_caller(span: LiveSpan, traceparent: str, otlp: bool) -> None:
    """Record the caller's W3C context on a trace that does not continue it: the ``traceparent`` header as
    OpenTelemetry records captured headers, and the caller's trace ID as a searchable tag."""
    try:
        span.set_attribute("http.request.header.traceparent", [traceparent])
        set_trace_tags(span, {CALLER_TRACE_TAG: "tr-" + traceparent[3:35]}, otlp)
    except Exception:  # a link is a courtesy: never fail a request for it
        logger.debug("could not record the caller's trace context", exc_info=True)


def rename_root(span: LiveSpan, name: str, otlp: bool) -> None:
    """Rename the root span and the trace once the route template is known.

    MLflow has no public rename (see `internals.rename_span`); the trace-name tag is public.
    """
    try:
        internals.rename_span(span, name)
        set_trace_tags(span, {_TRACE_NAME_TAG: name}, otlp)
    except Exception:  # naming is cosmetic: never let it fail a request
        logger.debug("could not rename root span to %r", name, exc_info=True)


def find_experiment(uri: str, name: str | None, experiment_id: str | None, create: bool) -> str:
    """The ID of experiment `name` (created if missing and `create`), else of `experiment_id`.

    Raises LookupError for a missing experiment that is not to be created.
    """
    client = internals.tracking_service_client(uri)
    if name:
        experiment = client.get_experiment_by_name(name)
        if experiment is None and create:
            try:
                return str(client.create_experiment(name))
            except MlflowException:  # another worker created it first
                experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise LookupError(f"no experiment named {name!r} at {uri}")
        return str(experiment.experiment_id)
    return str(client.get_experiment(experiment_id or "0").experiment_id)
