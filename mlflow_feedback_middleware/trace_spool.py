"""A bounded, durable spool for the traces MLflow's exporter could not send, replayed when the server is back.

MLflow's exporter drops a trace whose export fails (the tracking server down, or the process stopping
before its queue drained) and only logs it. Those traces' parts, the spans batches and the trace info,
come here instead: a sqlite file beside the feedback outbox, shared by the workers of one host, capped at
`max_bytes`. The delivery thread replays them once the server answers again: spans first, then the trace
info (MLflow's upsert, so a replay that happens twice stores the trace once). What does not fit is
dropped and counted; nothing is lost silently.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
from typing import Any

from .sqlite_files import create_private, immediate

logger = logging.getLogger("mlflow_feedback_middleware")

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
_LEASE_SECONDS = 60.0
_MAX_FAILURES = 5  # replays of one part that failed; then it is dropped (counted), never blocking the rest
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

    def _tx(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return immediate(self._conn, self._lock)

    def add(self, kind: str, location: str, payload: Any, traces: int) -> bool:
        """Keep one part (`kind` "spans" or "info") for `traces` traces; False when over the budget."""
        text = json.dumps(payload, separators=(",", ":"), default=str)
        with self._tx() as db:
            used = db.execute("SELECT COALESCE(SUM(size), 0) FROM trace_spool").fetchone()[0]
            if used + len(text) > self.max_bytes:
                fits = False
            else:
                db.execute(
                    "INSERT INTO trace_spool (kind, location, payload, size, traces, created_at) VALUES (?,?,?,?,?,?)",
                    (kind, location, text, len(text), traces, time.time()),
                )
                fits = True
        with self._lock:
            if not fits:
                self.dropped_traces += traces
            elif kind == "info":
                self.spooled_traces += traces
        if not fits:
            logger.warning("the trace spool is full (%d bytes): %d trace(s) dropped", self.max_bytes, traces)
        return fits

    def add_spans(self, location: str, spans: list[Any]) -> bool:
        return self.add("spans", location, [span.to_dict() for span in spans], 0)

    def add_info(self, trace_info: Any) -> bool:
        location = getattr(getattr(trace_info.trace_location, "mlflow_experiment", None), "experiment_id", "")
        return self.add("info", str(location), trace_info.to_dict(), 1)

    def pending(self) -> int:
        """Spooled parts not replayed yet."""
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM trace_spool").fetchone()[0])

    def replay(self, limit: int = 100) -> int:
        """Send up to `limit` spooled parts to the tracking server (blocking); the traces replayed.

        Rows are leased while they are sent, so the workers sharing the file never send one twice at once;
        a part that fails goes back for later and the pass stops (the server is likely down again)."""
        from mlflow.entities import Span, TraceInfo
        from mlflow.tracing.client import TracingClient

        now = time.time()
        with self._tx() as db:
            rows = db.execute(
                "SELECT * FROM trace_spool WHERE lease_until<? ORDER BY kind DESC, seq LIMIT ?", (now, limit)
            ).fetchall()  # "spans" before "info": the info upsert then finds its spans stored
            db.executemany(
                "UPDATE trace_spool SET lease_until=? WHERE seq=?", [(now + _LEASE_SECONDS, r["seq"]) for r in rows]
            )
        client = TracingClient()
        replayed = 0
        for row in rows:
            payload = json.loads(row["payload"])
            try:
                if row["kind"] == "spans":
                    client.log_spans(row["location"], [Span.from_dict(span) for span in payload])
                else:
                    client.start_trace(TraceInfo.from_dict(payload))
            except Exception as exc:
                logger.debug("replaying a spooled trace part failed: %s", exc)
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


def configure_spool(path: str | None) -> TraceSpool:
    """The process's spool: the first middleware's (MLflow's exporter is one per process, so is its spool)."""
    global _spool
    with _spool_lock:
        if _spool is None:
            try:
                _spool = TraceSpool(path)
            except Exception as exc:  # a read-only disk: keep traces in memory rather than not at all
                logger.error("cannot open the trace spool at %s (%s); spooled traces are kept in memory", path, exc)
                _spool = TraceSpool(None)
        return _spool


def current_spool() -> TraceSpool | None:
    """The spool, once a middleware has configured it."""
    return _spool
