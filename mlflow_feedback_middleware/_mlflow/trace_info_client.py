"""A cheaper path for the one per-trace call of MLflow's exporter, the trace-info upsert (StartTraceV3),
and the order that makes the tracking server's work per trace cheap: a trace's info before its spans.

MLflow's exporter sends each trace as a batch of spans (OTLP, shared by many traces) and one
StartTraceV3 request carrying the trace info: the client request ID, metadata (user, session, sizes),
tags, previews. That request went through MLflow's generic REST client, which rebuilds its headers
from every registered provider, merges proxy settings from the environment and wraps urllib3 retries
on each call, and prints the body with protobuf's pure-Python JSON printer: about 3.4 ms of CPU per
trace on our 2-core machine against a local server. This client builds the same JSON directly and
sends it over a kept-alive ``http.client`` connection per export thread (about 0.6 ms), and hands every
case it does not cover to MLflow's client unchanged: a failed or refused call (MLflow's retries then
apply), a workspace, proxies, custom TLS, and authentication other than none, basic or a bearer token.

MLflow's exporter sends a trace's last span batch and its info as two tasks that its export threads run at
once. Whichever reaches the server second finds the other's row: a span upload creates the trace's row
when it is missing, and the info upsert that follows fails its insert (`trace_info_pk`, logged by
PostgreSQL as an ERROR), rolls back and merges. `make bench-ingest` measured that path at twice the
server's CPU per trace (35-41 ms against 17-18 ms on PostgreSQL, 1 to 4 server workers). So span batches of a trace
whose info is not stored yet are held here (at most 10 s, 5,000 spans) and sent by the thread that stored
the info, right after it.
"""

from __future__ import annotations

import atexit
import base64
import http.client
import json
import logging
import re
import threading
import time
import urllib.request
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlparse

from mlflow.entities import Trace, TraceData
from mlflow.exceptions import RestException

from . import internals
from .export_losses import export_losses
from .trace_spool import current_spool

logger = logging.getLogger("mlflow_feedback_middleware")

_START_TRACE_PATH = "/api/3.0/mlflow/traces"
# After the server refused a connection, span batches go to the spool without trying for this long: MLflow's
# client would retry each for minutes, holding an export thread while the queue behind it overflows.
_DOWN_SECONDS = 30.0
_UNREACHABLE = object()  # what _post returns when no connection could be made
_TIMEOUT_SECONDS = 30.0
_VERSION_TIMEOUT_SECONDS = 10.0  # MLflow's client waits 3 s: too short for a busy server
_SPANS_LOCATION_TAG = "mlflow.trace.spansLocation"  # mlflow.tracing.constant.TraceTagKey.SPANS_LOCATION
_TRACKING_STORE = "TRACKING_STORE"
# Span batches held for their trace's info: spans of a trace still running (a long stream) go anyway after
# this long; past this many held spans, batches go at once.
_HOLD_SECONDS = 10.0
_HOLD_MAX_SPANS = 5_000
_REMEMBERED_INFOS = 10_000  # traces whose info this client stored: their later spans are not held


def _rfc3339(ms: int) -> str:
    stamp = datetime.fromtimestamp(ms // 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{ms % 1000:03d}Z"


def start_trace_body(trace_info: Any) -> str:
    """The StartTraceV3 request body for `trace_info`, as MLflow's client would send it.

    Built directly rather than through protobuf's pure-Python JSON printer (0.035 ms per body against
    0.23 ms, `timeit` on our machine). Anything beyond the experiment traces the middleware writes
    (assessments logged inside the trace, other trace locations) goes through MLflow's own conversion.
    """
    location = trace_info.trace_location
    experiment = getattr(location, "mlflow_experiment", None)
    if trace_info.assessments or experiment is None or getattr(location, "type", None) != "MLFLOW_EXPERIMENT":
        return _proto_body(trace_info)
    info: dict[str, Any] = {
        "trace_id": trace_info.trace_id,
        "trace_location": {
            "type": "MLFLOW_EXPERIMENT",
            "mlflow_experiment": {"experiment_id": experiment.experiment_id},
        },
        "request_time": _rfc3339(trace_info.request_time),
        "state": str(trace_info.state),
        "trace_metadata": internals.truncate_request_metadata(trace_info.trace_metadata),
        "tags": internals.truncate_tags(trace_info.tags),
    }
    if trace_info.client_request_id is not None:
        info["client_request_id"] = trace_info.client_request_id
    if trace_info.execution_duration is not None:
        info["execution_duration"] = f"{trace_info.execution_duration / 1000:.3f}s"
    for preview in ("request_preview", "response_preview"):
        if (value := getattr(trace_info, preview)) is not None:
            info[preview] = value
    return json.dumps({"trace": {"trace_info": info}})


def _proto_body(trace_info: Any) -> str:
    return internals.start_trace_proto_json(Trace(info=trace_info, data=TraceData(spans=[])))


def _plain_host_creds(client: Any) -> Any | None:
    """The credentials MLflow's REST store uses, when this client can use them as they are, else None."""
    creds = internals.host_creds(client)
    if creds is None:
        return None
    unsupported = (
        creds.aws_sigv4
        or creds.auth
        or creds.ignore_tls_verification
        or creds.client_cert_path
        or creds.server_cert_path
        or getattr(creds, "use_databricks_sdk", False)
    )
    return None if unsupported else creds


def _uses_proxy(host: str) -> bool:
    proxies = urllib.request.getproxies()
    return bool(proxies) and not urllib.request.proxy_bypass(host)


class FastTraceInfoClient:
    """Wraps MLflow's ``TracingClient`` inside its exporter; only ``start_trace`` takes the fast path."""

    def __init__(self, delegate: Any, uri: str, creds: Any, exporter: Any) -> None:
        self._delegate = delegate
        self._exporter = exporter
        self._uri = uri
        parsed = urlparse(uri)
        self._https = parsed.scheme == "https"
        self._host = parsed.hostname or "localhost"
        self._port = parsed.port
        self._path = parsed.path.rstrip("/") + _START_TRACE_PATH
        self._headers = self._fixed_headers(creds)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[http.client.HTTPConnection] = []  # every thread's, so they can be closed
        self._closed = False  # after the exit hook: each call on a connection of its own, closed after it
        self.fast_calls = 0  # trace infos sent on the fast path (for tests and diagnostics)
        self.delegated_calls = 0
        self._down_at: float | None = None  # monotonic time the server last refused a connection
        # Span batches waiting for their trace's info: trace ID -> (held since, location, spans).
        self._held: dict[str, tuple[float, str, list[Any]]] = {}
        self._held_spans = 0
        self._stored_infos: OrderedDict[str, None] = OrderedDict()
        self._spans_ok = False  # a span upload succeeded: the server stores spans (none are held before)
        self._sweeping = False

    @staticmethod
    def _fixed_headers(creds: Any) -> dict[str, str]:
        # Header providers describe the process (user agent, environment); resolved once, not per call.
        headers = internals.request_headers()
        headers["Content-Type"] = "application/json"
        if creds.username and creds.password:
            basic = base64.standard_b64encode(f"{creds.username}:{creds.password}".encode()).decode("ascii")
            headers["Authorization"] = f"Basic {basic}"
        elif creds.token:
            headers["Authorization"] = f"Bearer {creds.token}"
        return headers

    def __getattr__(self, name: str) -> Any:
        return getattr(self._delegate, name)

    def _connection(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            conn = cls(self._host, self._port, timeout=_TIMEOUT_SECONDS)
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def close_connections(self, final: bool = False) -> None:
        """Close every kept-alive connection (each reopens on its next use, unless `final`). At the `final`
        close (the exit hook) spans still held for a trace's info are spooled for the next start."""
        if final and (spool := current_spool()) is not None:
            for location, spans in self.release_held():
                spool.add_spans(location, spans)
        with self._lock:
            self._closed = self._closed or final
            connections = list(self._connections)
        for conn in connections:
            conn.close()

    def _post(self, body: bytes) -> Any:
        """The response body of a 200, `_UNREACHABLE` when no connection could be made, else None.

        A kept-alive connection the server has closed in the meantime fails on first use; the upsert is
        idempotent, so it is sent once more on a fresh connection.
        """
        for attempt in range(2):
            conn = self._connection()
            try:
                conn.request("POST", self._path, body=body, headers=self._headers)
                response = conn.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                self._local.conn = None
                with self._lock:
                    self._connections.remove(conn)
                if attempt:
                    return _UNREACHABLE if isinstance(exc, ConnectionError | TimeoutError) else None
                continue
            if self._closed:  # at exit: nothing may stay open for the garbage collector to warn about
                conn.close()
                self._local.conn = None
                with self._lock:
                    self._connections.remove(conn)
            return data if response.status == 200 else None
        return None

    def _server_version(self) -> Any:
        """The server's answer to ``GET /version`` (with the credentials, waited for up to 10 s): its text,
        None if it answered with an error, `_UNREACHABLE` if it did not answer."""
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        conn = cls(self._host, self._port, timeout=_VERSION_TIMEOUT_SECONDS)
        try:
            conn.request("GET", self._path.removesuffix(_START_TRACE_PATH) + "/version", headers=self._headers)
            response = conn.getresponse()
            text = response.read().decode("utf-8", "replace")
        except (OSError, http.client.HTTPException):
            return _UNREACHABLE
        finally:
            conn.close()
        return text if response.status == 200 else None

    def start_trace(self, trace_info: Any) -> Any:
        """Upsert the trace info; returns it with the tags the server added (as MLflow's client does)."""
        data = None
        # A workspace (header per request) is MLflow's client's business.
        if not internals.request_workspace():
            try:
                body = start_trace_body(trace_info).encode()
            except Exception:  # MLflow's entities changed under us: its own client knows them
                logger.debug("cannot build the StartTraceV3 body; MLflow's client sends it", exc_info=True)
            else:
                data = self._post(body)
        spool = current_spool()
        if data is _UNREACHABLE and spool is not None:
            # The server is down: keep the trace info for replay rather than let MLflow's client retry it
            # for minutes and then drop it.
            self._down_at = time.monotonic()
            self._spool_info(spool, trace_info)
            raise ConnectionError("the tracking server is unreachable; the trace info was spooled for replay")
        if data is _UNREACHABLE:
            data = None
        if data is not None:
            self._down_at = None
            try:
                stored = json.loads(data)["trace"]["trace_info"]
                trace_info.tags.update({str(k): str(v) for k, v in stored.get("tags", {}).items()})
            except (ValueError, KeyError, TypeError, AttributeError):
                logger.debug("unexpected StartTraceV3 answer; the trace info was stored", exc_info=True)
            if internals.exporter_logs_spans(self._exporter) and not export_losses.spans_dropped(trace_info.trace_id):
                # The server tags a trace's spans location when its spans arrive; the exporter sends
                # those in a separate task that may land after this one, and without the tag it would
                # also upload the whole trace as an artifact: a second copy, and the costliest call.
                # Where the spans' batch was dropped, that upload is the only copy, so it stays.
                trace_info.tags.setdefault(_SPANS_LOCATION_TAG, _TRACKING_STORE)
            with self._lock:
                self.fast_calls += 1
            self._info_stored(trace_info.trace_id)
            return trace_info
        # Refused, failed or not understood: MLflow's client retries and reports it as it always does; if it
        # gives up too, the trace info is spooled for replay rather than dropped.
        with self._lock:
            self.delegated_calls += 1
        try:
            stored_info = self._delegate.start_trace(trace_info)
        except RestException:
            self._info_stored(trace_info.trace_id)  # refused: its spans still go, as MLflow would send them
            raise  # the server answered and refused it: replaying would not change its mind
        except Exception:
            if spool is not None:
                self._spool_info(spool, trace_info)
            else:
                self._info_stored(trace_info.trace_id)
            raise
        self._info_stored(trace_info.trace_id)
        return stored_info

    def _spool_info(self, spool: Any, trace_info: Any) -> None:
        """Spool a trace info the server did not take, with the spans held for it, in one part."""
        export_losses.count_failure()
        held = [span for _, spans in self.take_held(trace_info.trace_id) for span in spans]
        spool.add_info(trace_info, held)

    # -- a trace's info before its spans ------------------------------------------------------------------

    def _info_stored(self, trace_id: str) -> None:
        """Remember that `trace_id`'s info is stored and send the spans held for it (on this thread)."""
        with self._lock:
            self._stored_infos[trace_id] = None
            while len(self._stored_infos) > _REMEMBERED_INFOS:
                self._stored_infos.popitem(last=False)
        held = self.take_held(trace_id)
        if export_losses.spans_dropped(trace_id):
            # Another batch of this trace was lost: MLflow's exporter now uploads the whole trace as an
            # artifact, which the server reads only while no span of the trace is in its store.
            return
        for location, spans in held:
            self._send_held(location, spans)

    def take_held(self, trace_id: str) -> list[tuple[str, list[Any]]]:
        """The span batches held for `trace_id`'s info, taken out."""
        with self._lock:
            held = self._held.pop(trace_id, None)
            if held is None:
                return []
            self._held_spans -= len(held[2])
        return [(held[1], held[2])]

    def _send_held(self, location: str, spans: list[Any]) -> None:
        """Upload held spans; failures are handled (spooled or counted) as the exporter's own batches are."""
        try:
            self._upload_spans(location, spans)
        except NotImplementedError:
            internals.stop_span_logging(self._exporter)
        except Exception as exc:
            logger.debug("failed to log held spans to MLflow: %s", exc)

    def _hold(self, location: str, spans: list[Any]) -> list[Any]:
        """Hold the spans of traces whose info is not stored yet; the spans to send now."""
        now, send = time.monotonic(), []
        with self._lock:
            for span in spans:
                trace_id = getattr(span, "trace_id", None)
                if (
                    not isinstance(trace_id, str)
                    or trace_id in self._stored_infos
                    or self._held_spans >= _HOLD_MAX_SPANS
                ):
                    send.append(span)
                    continue
                _, _, held = self._held.setdefault(trace_id, (now, location, []))
                held.append(span)
                self._held_spans += 1
            start_sweeper = bool(self._held) and not self._sweeping
            self._sweeping = self._sweeping or start_sweeper
        if start_sweeper:
            threading.Thread(target=self._sweep, name="mlflow_feedback_held_spans", daemon=True).start()
        return send

    def _sweep(self) -> None:
        """Send the spans held longer than `_HOLD_SECONDS` (a trace still running, or one whose info MLflow
        dropped), while any are held."""
        while True:
            time.sleep(1.0)
            now = time.monotonic()
            with self._lock:
                expired = [trace_id for trace_id, (since, _, _) in self._held.items() if now - since >= _HOLD_SECONDS]
                if not self._held:
                    self._sweeping = False
                    return
            for trace_id in expired:
                for location, spans in self.take_held(trace_id):
                    self._send_held(location, spans)

    def release_held(self) -> list[tuple[str, list[Any]]]:
        """Every held batch, taken out (at shutdown: to send or spool)."""
        with self._lock:
            trace_ids = list(self._held)
        return [batch for trace_id in trace_ids for batch in self.take_held(trace_id)]

    def log_spans(self, location: str, spans: list[Any]) -> Any:
        """MLflow's span batch upload. Spans of a trace whose info is not stored yet wait for it (see the
        module's docstring). While the server is down (or when the upload fails without an answer from
        it), the batch is spooled for replay instead of dropped."""
        if self._spans_ok and not internals.request_workspace():
            spans = self._hold(location, spans)
            if not spans:
                return None
        result = self._upload_spans(location, spans)
        self._spans_ok = True
        return result

    def _upload_spans(self, location: str, spans: list[Any], version_known: bool = False) -> Any:
        spool = current_spool()
        down = self._down_at is not None and time.monotonic() - self._down_at < _DOWN_SECONDS
        if spool is not None and down:
            export_losses.count_failure()
            spool.add_spans(location, spans)
            raise ConnectionError("the tracking server is unreachable; the spans were spooled for replay")
        try:
            return self._delegate.log_spans(location, spans)
        except RestException:
            raise  # the server answered: MLflow's exporter knows what that means
        except NotImplementedError:
            # MLflow's client says "not supported" also when it could not learn the server's version within 3 s
            # (down, or only busy: a basic-auth server checks the password on every call, seconds under load),
            # remembers that for the process, and its exporter then stops logging spans for good. The server's
            # own answer, waited for, decides: an old server's "not supported" stands, no answer is an outage,
            # and a server that stores spans gets the batch again (MLflow's client asking once more), else
            # from the spool; span logging stays on.
            if version_known:
                internals.forget_server_version()  # the replay (or the next batch) asks again
                export_losses.count_failure()
                if spool is not None:
                    spool.add_spans(location, spans)
                raise ConnectionError("MLflow's client could not learn the server's version in time") from None
            version = self._server_version()
            if version is _UNREACHABLE:
                if spool is None:
                    raise
                self._down_at = time.monotonic()
                export_losses.count_failure()
                spool.add_spans(location, spans)
                raise ConnectionError("the tracking server is unreachable; the spans were spooled for replay") from None
            if not _stores_spans(version) or not internals.forget_server_version():
                raise  # an old server, one that would not say, or an MLflow that changed: MLflow's behaviour
            return self._upload_spans(location, spans, version_known=True)
        except Exception:
            if spool is not None:
                export_losses.count_failure()
                spool.add_spans(location, spans)
            raise


def _stores_spans(version: Any) -> bool:
    """Whether a server answering `version` to ``GET /version`` takes span uploads (MLflow 3.4 and later)."""
    found = re.match(r"(\d+)\.(\d+)", version.strip()) if isinstance(version, str) else None
    return found is not None and (int(found[1]), int(found[2])) >= (3, 4)


def install_fast_trace_info_client(exporter: Any) -> FastTraceInfoClient | None:
    """Give MLflow's exporter the fast trace-info client, when its tracking URI is one it covers."""
    client = internals.exporter_client(exporter)
    if isinstance(client, FastTraceInfoClient):
        return client
    if not internals.start_trace_helpers_available():
        return None
    if client is None or not hasattr(client, "start_trace"):
        return None
    uri = str(getattr(client, "tracking_uri", ""))
    parsed = urlparse(uri)
    creds = None
    if parsed.scheme in ("http", "https") and not _uses_proxy(parsed.hostname or ""):
        creds = _plain_host_creds(client)
    if creds is None:
        logger.debug("trace infos go through MLflow's own client (%s: not a plain tracking server)", uri)
        return None
    fast = FastTraceInfoClient(client, uri, creds, exporter)
    internals.replace_exporter_client(exporter, fast)
    # Whichever runs first at exit, MLflow's final flush or this, no socket is left for the GC to warn of.
    atexit.register(fast.close_connections, True)
    return fast


def close_fast_connections() -> None:
    """Close the kept-alive connections of the fast client MLflow's exporter has now, if it has one."""
    client = internals.exporter_client(internals.trace_exporter())
    if isinstance(client, FastTraceInfoClient):
        client.close_connections()
