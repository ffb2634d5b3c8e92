"""The durable feedback outbox: accepted feedback waits here, in a local sqlite file, until MLflow has it.

Several processes (``uvicorn --workers N``, or replicas sharing a volume) may share one file. A row is
delivered by whoever holds its lease; a lease runs out after `LEASE_SECONDS`, and one held by a dead
process on this host is taken over at start-up, so a restarted service replays its backlog at once.
Times are wall-clock seconds because rows outlive the process that wrote them.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..intake.models import Assessment
from ..sqlite_files import create_private, immediate

LEASE_SECONDS = 30.0
PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS feedback_outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    destination TEXT NOT NULL,
    trace_id TEXT,
    client_request_id TEXT,
    source_id TEXT NOT NULL,
    assessments TEXT NOT NULL,
    assessment_ids TEXT NOT NULL DEFAULT '[]',
    issued_here INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    maybe_written INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    next_at REAL NOT NULL,
    not_found_since REAL,
    owner TEXT,
    lease_until REAL,
    last_error TEXT,
    finished_at REAL,
    item_errors INTEGER NOT NULL DEFAULT 0,
    vouched INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS feedback_outbox_due ON feedback_outbox (destination, state, seq);
CREATE TABLE IF NOT EXISTS issued_traces (
    trace_id TEXT PRIMARY KEY,
    destination TEXT NOT NULL,
    client_request_id TEXT NOT NULL,
    chosen_by_client INTEGER NOT NULL,
    issued_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS issued_traces_request ON issued_traces (destination, client_request_id);
"""
# Columns added since the first release, for outbox files an earlier version created.
_ADDED_COLUMNS = {"item_errors": "INTEGER NOT NULL DEFAULT 0", "vouched": "INTEGER NOT NULL DEFAULT 0"}
NOT_FOUND_ERROR = "trace not found after"  # how a failed "never appeared" item's last_error begins
# Pending items one service may hold: past it, feedback is refused (503) rather than filling the disk with
# votes for made-up IDs during an outage.
MAX_PENDING = 10_000


class OutboxFull(Exception):
    """The service already holds `MAX_PENDING` undelivered items."""


@dataclass
class Item:
    """One accepted feedback request: the assessments to write on one trace, for one user."""

    destination: str
    trace_id: str | None
    client_request_id: str | None
    source_id: str
    assessments: list[Assessment]
    issued_here: bool  # the trace was issued by a process of this service, as far as it knew
    id: str = field(default_factory=lambda: "fb-" + uuid.uuid4().hex)
    seq: int = 0  # position in the outbox, set once stored
    assessment_ids: list[str | None] = field(default_factory=list)
    state: str = PENDING
    attempts: int = 0
    item_errors: int = 0  # errors the server answered for this item while it was otherwise healthy
    vouched: bool = False  # a worker of this service issued the trace (its token, or the shared record)
    maybe_written: bool = False  # a write was started whose outcome is unknown (crash, timeout)
    created_at: float = field(default_factory=time.time)
    not_found_since: float | None = None
    last_error: str | None = None
    refusal: tuple[int, str, str] | None = None  # status, why, field: the item names nothing it may vote on

    def to_public(self) -> dict[str, Any]:
        """What the status route shows of the item."""
        return {
            "feedback_id": self.id,
            "state": self.state,
            "trace_id": self.trace_id,
            "client_request_id": self.client_request_id,
            "assessment_ids": self.assessment_ids,
            "attempts": self.attempts,
            "error": public_error(self.state, self.last_error),
        }


def public_error(state: str, error: str | None) -> str | None:
    """What an anonymous caller may learn of an item's error: its kind, never the tracking server's text."""
    if error is None:
        return None
    if error.startswith("trace not found"):
        return error  # our own words ("trace not found after 15 s", "... in this service's experiment")
    return "the tracking server refused this feedback" if state == FAILED else "waiting for the tracking server"


def _owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's
        return True
    return True


class Outbox:
    """Rows of accepted feedback in a sqlite file (or in memory when `path` is None). Thread-safe."""

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.owner = _owner_id()
        self.path = str(path) if path is not None else None
        if self.path is not None:
            # Comments and user IDs are nobody else's to read: the folder and files are the owner's only
            # (sqlite gives its -wal and -shm files the database file's mode).
            create_private(self.path)
        # One connection, serialised by a lock: sqlite's own locking then orders us against other processes.
        self._conn = sqlite3.connect(
            self.path or ":memory:", timeout=10.0, isolation_level=None, check_same_thread=False
        )
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        if self.path is not None:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")  # an accepted vote survives a crash or power cut
        # Issued-trace records go through a connection of their own that does not sync each write: many a
        # second, and one lost in a power cut only shortens a vote's wait.
        self._shared = self._conn
        if self.path is not None:
            self._shared = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
            self._shared.execute("PRAGMA synchronous=NORMAL")
            self._shared.row_factory = sqlite3.Row
        self._shared_lock = threading.Lock() if self.path is not None else self._lock
        with self._lock:
            self._conn.executescript(_SCHEMA)
            present = {row["name"] for row in self._conn.execute("PRAGMA table_info(feedback_outbox)")}
            for column, definition in _ADDED_COLUMNS.items():
                if column not in present:
                    self._conn.execute(f"ALTER TABLE feedback_outbox ADD COLUMN {column} {definition}")

    def _tx(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return immediate(self._conn, self._lock)

    def close(self) -> None:
        """Close the file; the outbox is unusable afterwards."""
        with self._lock:
            self._conn.close()

    def add(self, item: Item, lease_seconds: float) -> Item | None:
        """Store `item`, leased to this process for `lease_seconds` (it delivers it, unless it dies).

        An item with the same ID already stored (an idempotent retry) is left as it is, and returned.
        """
        now = time.time()
        with self._tx() as db:
            earlier = db.execute("SELECT * FROM feedback_outbox WHERE id=?", (item.id,)).fetchone()
            if earlier is not None:
                return _item(earlier)
            pending = db.execute(
                "SELECT COUNT(*) FROM feedback_outbox WHERE destination=? AND state='pending'", (item.destination,)
            ).fetchone()[0]
            if pending >= MAX_PENDING:
                raise OutboxFull(f"{pending} feedback items are waiting for delivery")
            db.execute(
                "INSERT INTO feedback_outbox (id, destination, trace_id, client_request_id, source_id, assessments,"
                " issued_here, created_at, next_at, owner, lease_until, vouched) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    item.id,
                    item.destination,
                    item.trace_id,
                    item.client_request_id,
                    item.source_id,
                    json.dumps([_assessment_json(a) for a in item.assessments]),
                    int(item.issued_here),
                    item.created_at,
                    now,
                    self.owner,
                    now + lease_seconds,
                    int(item.vouched),
                ),
            )
        return None

    def remove(self, item_id: str) -> None:
        """Forget an item that was never accepted (its request got a 4xx)."""
        with self._tx() as db:
            db.execute("DELETE FROM feedback_outbox WHERE id = ?", (item_id,))

    def save(self, item: Item, next_at: float | None = None) -> None:
        """Record an item's progress; a pending item is kept leased only if `next_at` is None."""
        finished = time.time() if item.state != PENDING else None
        with self._tx() as db:
            db.execute(
                "UPDATE feedback_outbox SET trace_id=?, assessment_ids=?, state=?, attempts=?, item_errors=?,"
                " vouched=?, maybe_written=?, not_found_since=?, last_error=?, finished_at=?,"
                " next_at=COALESCE(?, next_at),"
                " owner=CASE WHEN ? IS NULL THEN owner ELSE NULL END,"
                " lease_until=CASE WHEN ? IS NULL THEN lease_until ELSE NULL END WHERE id=?",
                (
                    item.trace_id,
                    json.dumps(item.assessment_ids),
                    item.state,
                    item.attempts,
                    item.item_errors,
                    int(item.vouched),
                    int(item.maybe_written),
                    item.not_found_since,
                    item.last_error,
                    finished,
                    next_at,
                    next_at,
                    next_at,
                    item.id,
                ),
            )

    def claim(self, destination: str, limit: int, everything: bool = False, after: int = 0) -> list[Item]:
        """Lease up to `limit` due pending items of `destination` to this process, oldest first.

        `everything` takes items not due yet too (a last try at shutdown); `after` skips seq numbers up to it.
        Items leased to another process are skipped until their lease runs out.
        """
        now = time.time()
        with self._tx() as db:
            rows = db.execute(
                "SELECT * FROM feedback_outbox WHERE destination=? AND state='pending' AND next_at<=? AND seq>?"
                " AND (owner IS NULL OR owner=? OR lease_until<?) ORDER BY seq LIMIT ?",
                (destination, float("inf") if everything else now, after, self.owner, now, limit),
            ).fetchall()
            items = [_item(row) for row in rows]
            for row, item in zip(rows, items, strict=True):
                if row["owner"] not in (None, self.owner):
                    item.maybe_written = True  # its owner may have died mid-write: check before writing
            db.executemany(
                "UPDATE feedback_outbox SET owner=?, lease_until=?, maybe_written=? WHERE id=?",
                [(self.owner, now + LEASE_SECONDS, int(i.maybe_written), i.id) for i in items],
            )
        return items

    def extend_leases(self, item_ids: list[str]) -> None:
        """Keep holding items this process is still working on (a call to MLflow may take minutes)."""
        if not item_ids:
            return
        marks = ",".join("?" * len(item_ids))
        with self._tx() as db:
            db.execute(
                f"UPDATE feedback_outbox SET lease_until=? WHERE owner=? AND state='pending' AND id IN ({marks})",
                (time.time() + LEASE_SECONDS, self.owner, *item_ids),
            )

    def release_dead_owners(self) -> int:
        """Free the leases of processes on this host that no longer run; how many items were freed."""
        host = socket.gethostname()
        with self._tx() as db:
            owners = [r[0] for r in db.execute("SELECT DISTINCT owner FROM feedback_outbox WHERE state='pending'")]
            dead = [
                o
                for o in owners
                if o and o != self.owner and o.split(":")[0] == host and not _pid_alive(int(o.split(":")[1]))
            ]
            freed = 0
            for owner in dead:
                # It may have died mid-write: whoever takes these checks the trace before writing again.
                freed += db.execute(
                    "UPDATE feedback_outbox SET owner=NULL, lease_until=NULL, maybe_written=1 WHERE owner=?", (owner,)
                ).rowcount
        return freed

    def release_mine(self) -> None:
        """Hand this process's leased items back, e.g. at shutdown, so a successor takes them at once.

        One may be in a call that has not returned yet: the successor checks the trace before writing.
        """
        with self._tx() as db:
            db.execute(
                "UPDATE feedback_outbox SET owner=NULL, lease_until=NULL, maybe_written=1"
                " WHERE owner=? AND state='pending'",
                (self.owner,),
            )

    def get(self, item_id: str) -> Item | None:
        """The item with that ID, if the outbox still has it."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM feedback_outbox WHERE id=?", (item_id,)).fetchone()
        return _item(row) if row else None

    def next_due(self, destination: str) -> float | None:
        """When the earliest pending item of `destination` falls due (wall-clock), or None if none is pending."""
        with self._tx() as db:
            row = db.execute(
                "SELECT MIN(CASE WHEN owner IS NULL OR owner=? THEN next_at ELSE MAX(next_at, lease_until) END)"
                " FROM feedback_outbox WHERE destination=? AND state='pending'",
                (self.owner, destination),
            ).fetchone()
        return float(row[0]) if row and row[0] is not None else None

    def stats(self, destination: str) -> dict[str, Any]:
        """Counts by state and the age of the oldest pending item, for the health route."""
        with self._tx() as db:
            counts = dict(
                db.execute(
                    "SELECT state, COUNT(*) FROM feedback_outbox WHERE destination=? GROUP BY state", (destination,)
                ).fetchall()
            )
            oldest, oldest_clean, retrying = db.execute(
                "SELECT MIN(created_at), MIN(CASE WHEN item_errors=0 THEN created_at END), SUM(item_errors>0)"
                " FROM feedback_outbox WHERE destination=? AND state='pending'",
                (destination,),
            ).fetchone()
        now = time.time()
        return {
            "pending": counts.get(PENDING, 0),
            "oldest_pending_seconds": round(now - oldest, 3) if oldest is not None else None,
            # What health judges the backlog by: items the server erred on (hostile IDs, say) say nothing
            # about the backend, and are counted apart.
            "oldest_queued_seconds": round(now - oldest_clean, 3) if oldest_clean is not None else None,
            "retrying_item_errors": retrying or 0,
            "delivered": counts.get(DELIVERED, 0),
            "failed": counts.get(FAILED, 0),
        }

    # -- what the workers of this host issued ---------------------------------------------------------

    def record_issued(self, destination: str, issued: list[tuple[str, str, bool]], now: float) -> None:
        """Share traces this process issued, (trace ID, client request ID, chosen by the client), with every
        process using this outbox file."""
        rows = [(trace_id, destination, crid, int(chosen), now) for trace_id, crid, chosen in issued]
        with immediate(self._shared, self._shared_lock) as db:
            db.executemany("INSERT OR IGNORE INTO issued_traces VALUES (?,?,?,?,?)", rows)

    def issued(self, destination: str, trace_id: str | None, client_request_id: str | None) -> list[sqlite3.Row]:
        """The issued-trace records for a trace ID or a client request ID (two or more: the ID is ambiguous)."""
        with self._shared_lock:
            if trace_id is not None:
                query, key = "trace_id=?", trace_id
            else:
                query, key = "client_request_id=?", client_request_id or ""
            return self._shared.execute(
                f"SELECT * FROM issued_traces WHERE destination=? AND {query} LIMIT 2", (destination, key)
            ).fetchall()

    def prune_issued(self, older_than_seconds: float) -> None:
        """Forget issued-trace records nobody will wait for any more."""
        with self._shared_lock:
            self._shared.execute("DELETE FROM issued_traces WHERE issued_at<?", (time.time() - older_than_seconds,))

    # -- late traces -----------------------------------------------------------------------------------

    def failed_not_found(self, destination: str, since: float, limit: int) -> list[Item]:
        """Accepted items that failed because their trace had not appeared, most recent first."""
        with self._tx() as db:
            rows = db.execute(
                "SELECT * FROM feedback_outbox WHERE destination=? AND state='failed' AND finished_at>=?"
                " AND last_error LIKE ? ORDER BY finished_at DESC LIMIT ?",
                (destination, since, NOT_FOUND_ERROR + "%", limit),
            ).fetchall()
        return [_item(row) for row in rows]

    def revive(self, item_id: str) -> None:
        """Put a failed item back in the queue (its trace has appeared since)."""
        with self._tx() as db:
            db.execute(
                "UPDATE feedback_outbox SET state='pending', not_found_since=NULL, finished_at=NULL, last_error=NULL,"
                " next_at=? WHERE id=? AND state='failed'",
                (time.time(), item_id),
            )

    def purge_finished(self, delivered_seconds: float, failed_seconds: float) -> int:
        """Delete delivered rows older than `delivered_seconds`, and failed ones (kept longer for an operator
        to inspect) older than `failed_seconds`."""
        now = time.time()
        with self._tx() as db:
            return db.execute(
                "DELETE FROM feedback_outbox WHERE (state='delivered' AND finished_at<?)"
                " OR (state='failed' AND finished_at<?)",
                (now - delivered_seconds, now - failed_seconds),
            ).rowcount


def _assessment_json(a: Assessment) -> dict[str, Any]:
    return {"name": a.name, "value": a.value, "rationale": a.rationale, "metadata": a.metadata, "span_id": a.span_id}


def _item(row: sqlite3.Row) -> Item:
    return Item(
        id=row["id"],
        seq=row["seq"],
        destination=row["destination"],
        trace_id=row["trace_id"],
        client_request_id=row["client_request_id"],
        source_id=row["source_id"],
        assessments=[Assessment(**a) for a in json.loads(row["assessments"])],
        issued_here=bool(row["issued_here"]),
        assessment_ids=json.loads(row["assessment_ids"]),
        state=row["state"],
        attempts=row["attempts"],
        item_errors=row["item_errors"],
        vouched=bool(row["vouched"]),
        maybe_written=bool(row["maybe_written"]),
        created_at=row["created_at"],
        not_found_since=row["not_found_since"],
        last_error=row["last_error"],
    )
