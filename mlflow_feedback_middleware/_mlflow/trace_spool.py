"""A bounded, durable spool for the traces MLflow's exporter could not send, replayed when the server is back.

MLflow's exporter drops a trace whose export fails (the tracking server down, or the process stopping
before its queue drained) and only logs it. Those traces' parts, the spans batches and the trace info,
come here instead: a sqlite file beside the feedback outbox, shared by the workers of one host, capped at
`max_bytes`. A trace whose final task is spooled (its info) is spooled whole, info and every span, so it
is complete whatever became of its span batches. The delivery thread replays them once the server answers
again: trace infos first, then spans (the order the tracking server stores cheaply; both are upserts, so a
replay that happens twice stores the trace once). What does not fit is dropped and counted; nothing is
lost silently.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

from ..sqlite_files import create_private, immediate
from . import internals

logger = logging.getLogger("mlflow_feedback_middleware")

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
_LEASE_SECONDS = 60.0
_MAX_FAILURES = 5  # replays of one part that failed; then it is dropped (counted), never blocking the rest
_MAX_DEFERRED = 10_000  # parts waiting for the writer thread; past it they are dropped (counted)
_REPLAY_SECONDS = 2.0  # one replay pass's time budget: queued feedback is delivered by the same thread
_SCHEMA = """
CREATE TABLE IF NOT EXISTS trace_spool (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    location TEXT NOT NULL,
    payload TEXT NOT NULL,
    size INTEGER NOT NULL,
    traces INTEGER NOT NULL,
    created_at REAL NOT NULL,
    lease_until REAL NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0
);
"""


class TraceSpool:
    """Spooled trace parts in a sqlite file (or in memory when `path` is None). Thread-safe."""

    def __init__(self, path: str | None, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes
        if path is not None:
            create_private(path)
        self._conn = sqlite3.connect(path or ":memory:", timeout=10.0, isolation_level=None, check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        if path is not None:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
        self._lock = threading.Lock()
        with self._lock:
            self._conn.executescript(_SCHEMA)
        self.spooled_traces = 0  # trace infos this process spooled
        self.replayed_traces = 0
        self.dropped_traces = 0  # over the budget: counted, not kept
        self._dropped_parts = 0
        self._warned_at = float("-inf")
        # Parts handed over by threads that must not wait for the disk (MLflow's export queue is fed from the
        # thread ending a request's span, often the event loop): written by one daemon thread.
        self._deferred: queue.Queue[tuple[Callable[[], bool], Callable[[], None]]] = queue.Queue(_MAX_DEFERRED)
        self._writer: threading.Thread | None = None

    def _tx(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return immediate(self._conn, self._lock)

    def add(self, parts: list[tuple[str, str, Any]], traces: int) -> bool:
        """Keep `parts` ((kind "spans" or "info", location, payload) for `traces` traces) all or none; False
        when over the budget."""
        rows = [
            (kind, location, json.dumps(payload, separators=(",", ":"), default=str))
            for kind, location, payload in parts
        ]
        size = sum(len(text) for _, _, text in rows)
        with self._tx() as db:
            used = db.execute("SELECT COALESCE(SUM(size), 0) FROM trace_spool").fetchone()[0]
            fits = bool(used + size <= self.max_bytes)
            if fits:
                now = time.time()
                db.executemany(
                    "INSERT INTO trace_spool (kind, location, payload, size, traces, created_at) VALUES (?,?,?,?,?,?)",
                    [
                        (kind, location, text, len(text), int(kind == "info") * traces, now)
                        for kind, location, text in rows
                    ],
                )
        with self._lock:
            if fits:
                self.spooled_traces += traces
                return True
            self.dropped_traces += traces
            self._dropped_parts += 1
            # Once per 30 s at most: under sustained overload every part would otherwise log a line.
            warn = time.monotonic() - self._warned_at >= 30.0
            if warn:
                self._warned_at = time.monotonic()
        if warn:
            logger.warning(
                "the trace spool is full (%d bytes): %d part(s) dropped so far (%d trace(s); see the health route)",
                self.max_bytes,
                self._dropped_parts,
                self.dropped_traces,
            )
        return False

    def add_spans(self, location: str, spans: list[Any]) -> bool:
        """Keep a batch of spans (of any traces)."""
        return self.add([("spans", location, [span.to_dict() for span in spans])], 0)

    def add_info(self, trace_info: Any, spans: list[Any] | None = None) -> bool:
        """Keep a trace's info, and with `spans` the whole trace."""
        location = str(getattr(getattr(trace_info.trace_location, "mlflow_experiment", None), "experiment_id", ""))
        parts: list[tuple[str, str, Any]] = [("info", location, trace_info.to_dict())]
        if spans:
            parts.append(("spans", location, [span.to_dict() for span in spans]))
        return self.add(parts, 1)

    def add_later(self, add: Callable[[], bool], on_drop: Callable[[], None], traces: int) -> None:
        """Run `add` (one of the `add_*` calls) on the spool's writer thread; `on_drop` if it did not fit."""
        try:
            self._deferred.put_nowait((add, on_drop))
        except queue.Full:
            with self._lock:
                self.dropped_traces += traces
            on_drop()
            return
        with self._lock:
            if self._writer is None or not self._writer.is_alive():
                self._writer = threading.Thread(target=self._write_deferred, name="mlflow_feedback_spool", daemon=True)
                self._writer.start()

    def _write_deferred(self) -> None:
        while True:
            add, on_drop = self._deferred.get()
            try:
                if not add():
                    on_drop()
            except Exception:
                logger.warning("could not spool a trace part", exc_info=True)
                on_drop()
            finally:
                self._deferred.task_done()

    def flush_deferred(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the parts handed to the writer thread; whether all are written."""
        deadline = time.monotonic() + timeout
        while self._deferred.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._deferred.unfinished_tasks

    def pending(self) -> int:
        """Spooled parts not replayed yet."""
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM trace_spool").fetchone()[0])

    def replay(self, limit: int = 100, seconds: float = _REPLAY_SECONDS) -> int:
        """Send up to `limit` spooled parts to the tracking server (blocking, for about `seconds` at most);
        the traces replayed.

        Rows are leased while they are sent, so the workers sharing the file never send one twice at once;
        a part that fails goes back for later and the pass stops (the server is likely down again)."""
        from mlflow.entities import Span, TraceInfo
        from mlflow.tracing.client import TracingClient

        now = time.time()
        with self._tx() as db:
            rows = db.execute(
                "SELECT * FROM trace_spool WHERE lease_until<? ORDER BY kind, seq LIMIT ?", (now, limit)
            ).fetchall()  # "info" before "spans": a span upload then finds its trace's row (see bench-ingest)
            db.executemany(
                "UPDATE trace_spool SET lease_until=? WHERE seq=?", [(now + _LEASE_SECONDS, r["seq"]) for r in rows]
            )
        client = TracingClient()
        replayed = 0
        deadline = time.monotonic() + seconds
        for index, row in enumerate(rows):
            if time.monotonic() > deadline:  # the rest's leases lapse: a later pass (or worker) sends them
                with self._tx() as db:
                    db.executemany(
                        "UPDATE trace_spool SET lease_until=0 WHERE seq=?", [(r["seq"],) for r in rows[index:]]
                    )
                break
            payload = json.loads(row["payload"])
            try:
                if row["kind"] == "spans":
                    client.log_spans(row["location"], [Span.from_dict(span) for span in payload])
                else:
                    client.start_trace(TraceInfo.from_dict(payload))
            except Exception as exc:
                logger.debug("replaying a spooled trace part failed: %s", exc)
                if isinstance(exc, NotImplementedError):
                    # MLflow's client keeps a failed server-version lookup (a busy server) for the process:
                    # the next pass asks again. An old server's real "not supported" costs the part's replays.
                    internals.forget_server_version()
                with self._tx() as db:
                    if row["failures"] + 1 >= _MAX_FAILURES:
                        db.execute("DELETE FROM trace_spool WHERE seq=?", (row["seq"],))
                    else:
                        db.execute(
                            "UPDATE trace_spool SET lease_until=0, failures=failures+1 WHERE seq=?", (row["seq"],)
                        )
                if row["failures"] + 1 >= _MAX_FAILURES:
                    with self._lock:
                        self.dropped_traces += row["traces"]
                    logger.warning("a spooled trace part failed %d replays and was dropped: %s", _MAX_FAILURES, exc)
                    continue
                break
            with self._tx() as db:
                db.execute("DELETE FROM trace_spool WHERE seq=?", (row["seq"],))
            replayed += row["traces"]
        if replayed:
            with self._lock:
                self.replayed_traces += replayed
            logger.info("replayed %d trace(s) from the spool", replayed)
        return replayed

    def stats(self) -> dict[str, Any]:
        """Figures for the health route."""
        with self._lock:
            parts, size = self._conn.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM trace_spool").fetchone()
            return {
                "path": self.path,
                "pending_parts": parts,
                "bytes": size,
                "max_bytes": self.max_bytes,
                "spooled_traces_by_this_process": self.spooled_traces,
                "replayed_traces_by_this_process": self.replayed_traces,
                "dropped_traces_by_this_process": self.dropped_traces,
            }


_spool: TraceSpool | None = None
_spool_lock = threading.Lock()


def configure_spool(path: str | None, max_bytes: int = DEFAULT_MAX_BYTES) -> TraceSpool:
    """The process's spool: the first middleware's (MLflow's exporter is one per process, so is its spool)."""
    global _spool
    with _spool_lock:
        if _spool is None:
            try:
                _spool = TraceSpool(path, max_bytes)
            except Exception as exc:  # a read-only disk: keep traces in memory rather than not at all
                logger.error("cannot open the trace spool at %s (%s); spooled traces are kept in memory", path, exc)
                _spool = TraceSpool(None, max_bytes)
        return _spool


def current_spool() -> TraceSpool | None:
    """The spool, once a middleware has configured it."""
    return _spool
