"""Delivers outbox items to MLflow, from one background thread per process, in order.

One thread, not a pool: MLflow's client spends about 3 ms of CPU per call, and a burst of feedback
written by many threads at once held the GIL long enough to stall the event loop for tens of
milliseconds. A request waits (without blocking the loop) for its own item's first decisive outcome.

An item moves from pending to delivered, or to failed when MLflow refuses it, when its trace never
appears, or after `MAX_ATTEMPTS` server errors. "Trace not found" is normal for a while: MLflow exports
traces seconds after they end, and not at all while a stream is still open. How long it is tolerated
depends on whether this service issued the trace (`known_wait`) or not (`unknown_wait`).

While the tracking server is unreachable (`ServerWatch`), delivery stops and backs off; items keep
their order and wait in the outbox, which survives restarts.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import logging
import threading
import time
from typing import Any

from .._mlflow.export import flush_exports
from .._mlflow.server_watch import ServerWatch
from .._mlflow.trace_spool import current_spool
from .._mlflow.tracing import MlflowBackend
from ..intake.models import SCOPE_KEY, SESSION_KEY, SIGNAL_KEY, Assessment, vote_key
from .outbox import DELIVERED, FAILED, LEASE_SECONDS, Item, Outbox
from .registry import RecentTraces
from .review import ReviewRouter
from .writer import (
    AMBIGUOUS,
    CAST_AT_KEY,
    CHOSEN_BY_CLIENT,
    NOT_FOUND,
    REFUSED,
    REJECTED,
    UNAVAILABLE,
    FeedbackWriter,
    MlflowFeedbackWriter,
    Refused,
    TraceFacts,
    classify,
)

logger = logging.getLogger("mlflow_feedback_middleware")

WAITING = "waiting"  # the trace is not in MLflow yet; try again soon
MAX_ATTEMPTS = 20
# An item the server errs on while it answers its health check is retried on its own, this many times at
# most, with these pauses, and never holds up the items behind it.
MAX_ITEM_ERRORS = 5
_ITEM_BACKOFF = (1, 5, 30, 60, 300)
ITEM_ERROR = "item_error"
_POLL_SECONDS = 5.0  # picks up items other processes left behind, and expired leases
_BATCH = 20
_RETENTION_SECONDS = 7 * 24 * 3600
_SHARE_SECONDS = 1.0  # how often issued traces are shared with the other workers through the outbox file
# Items failed because their trace never appeared are looked for again this often, for this long: a trace
# delayed by an outage or a slow server may still land, and then its vote is delivered.
_RECHECK_SECONDS = 300.0
_RECHECK_HORIZON_SECONDS = 24 * 3600
_RECHECK_BATCH = 50
VOUCHED = "vouched"  # a worker of this service issued the trace: the request is answered 202 at once
_FAILED_RETENTION_SECONDS = 30 * 24 * 3600
_exports_flushed_at_exit = False


class FeedbackDelivery:
    """Moves feedback from the outbox into MLflow; one per middleware, thread-safe."""

    def __init__(
        self,
        outbox: Outbox,
        backend: MlflowBackend,
        recent: RecentTraces,
        destination: str,
        *,
        unknown_wait: float,
        known_wait: float,
        exit_timeout: float,
        writer: FeedbackWriter | None = None,
        review: ReviewRouter | None = None,
    ) -> None:
        self.outbox = outbox
        self._review = review
        self._writer: FeedbackWriter = writer or MlflowFeedbackWriter()
        self.destination = destination
        self._backend = backend
        self._recent = recent
        self._unknown_wait = unknown_wait
        self._known_wait = known_wait
        self._exit_timeout = exit_timeout
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        # Items leased to this process and not settled yet: their leases are renewed while a call to MLflow
        # runs (its client retries for minutes), so no other worker takes one over and writes it twice.
        self._held: set[str] = set()
        self._held_lock = threading.Lock()
        self._start_lock = threading.Lock()
        self._waiters: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Future[tuple[str, Item]]]] = {}
        self._waiters_lock = threading.Lock()
        self._server = ServerWatch(lambda: backend.unreachable)
        self.delivered = 0
        self.failed = 0
        self.revived = 0
        self._next_recheck = time.monotonic() + _RECHECK_SECONDS

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the background thread (once), which first replays what earlier processes left."""
        if self._thread is not None:
            return
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="mlflow-feedback-outbox", daemon=True)
                self._thread.start()
                threading.Thread(target=self._renew_leases, name="mlflow-feedback-leases", daemon=True).start()
                atexit.register(self._at_exit)

    def wake(self) -> None:
        """Tell the background thread an item is due now."""
        self._wake.set()

    def flush(self, timeout: float) -> None:
        """Stop the thread and try every pending item once, within `timeout`; the rest stays in the outbox."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._wake.set()
        deadline = time.monotonic() + timeout
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
        try:
            if not self._thread or not self._thread.is_alive():
                self._pass(deadline, everything=True)
        finally:
            self.outbox.release_mine()
            with self._held_lock:
                self._held.clear()
        atexit.unregister(self._at_exit)
        if self._thread is not None and not self._thread.is_alive():
            # Stopped for good: a lifespan that starts again (a test client entered twice) restarts it.
            self._thread = None
            self._stopping.clear()

    def _at_exit(self) -> None:
        """Without a lifespan shutdown: export held traces, then deliver the feedback waiting for them.

        With no feedback pending there is nothing to do: MLflow's own exit hook exports the traces.
        """
        global _exports_flushed_at_exit
        deadline = time.monotonic() + self._exit_timeout
        try:
            if self.outbox.next_due(self.destination) is None:
                return
            if self._backend.experiment_id is not None and not _exports_flushed_at_exit:
                _exports_flushed_at_exit = True  # the exporter is process-wide: once is enough (~1 s)
                flush_exports(self._exit_timeout / 2)
        except Exception:
            logger.debug("could not flush MLflow's trace export at exit", exc_info=True)
        self.flush(max(deadline - time.monotonic(), 0.5))

    # -- one item ----------------------------------------------------------------------------------

    def accept(self, item: Item) -> Item | None:
        """Store `item` durably before its request is answered, leased to this process, and wake the thread.

        Returns the item already stored under the same ID (an idempotent retry) instead, if there is one.
        """
        earlier = self.outbox.add(item, LEASE_SECONDS)
        if earlier is None:
            self._hold([item.id])
            self.wake()
        return earlier

    def _hold(self, item_ids: list[str]) -> None:
        with self._held_lock:
            self._held.update(item_ids)

    def _renew_leases(self) -> None:
        while not self._stopping.wait(LEASE_SECONDS / 3):
            with self._held_lock:
                held = list(self._held)
            try:
                self.outbox.extend_leases(held)
            except Exception:
                logger.debug("could not renew the outbox leases", exc_info=True)

    def expect(self, item_id: str, loop: asyncio.AbstractEventLoop) -> asyncio.Future[tuple[str, Item]]:
        """A future resolved (on `loop`) with the outcome of the item's first decisive attempt:
        DELIVERED, UNAVAILABLE, NOT_FOUND or REJECTED, and the item as the attempt left it."""
        future: asyncio.Future[tuple[str, Item]] = loop.create_future()
        with self._waiters_lock:
            self._waiters[item_id] = (loop, future)
        return future

    def forget(self, item_id: str) -> None:
        """Stop reporting on `item_id` (its request has been answered)."""
        with self._waiters_lock:
            self._waiters.pop(item_id, None)

    def _report(self, item: Item, outcome: str) -> None:
        """Hand a decisive outcome to the request waiting for it, if one is."""
        with self._waiters_lock:
            waiter = self._waiters.pop(item.id, None) if outcome != WAITING else None
        if waiter is None:
            return
        loop, future = waiter

        def resolve() -> None:
            if not future.done():
                future.set_result((outcome, item))

        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            loop.call_soon_threadsafe(resolve)

    def attempt(self, item: Item) -> str:
        """Try to write `item` once: DELIVERED, WAITING, UNAVAILABLE, NOT_FOUND or REJECTED.

        Progress is saved by `settle`; a crash before it leaves the row leased, and whoever takes it
        over checks the trace's assessments before writing again.
        """
        problem = self._server.problem()
        if problem is not None:
            item.last_error = problem
            return UNAVAILABLE
        try:
            if item.trace_id is None:
                assert item.client_request_id is not None
                try:
                    item.trace_id = self._resolve(item.client_request_id)
                except Refused as refused:
                    return self._refused(item, refused)
                if item.trace_id is None:
                    return self._not_found(item)
            if not item.issued_here and self._backend.experiment_id is None:
                self._backend.start_resolving()
                raise ConnectionError("the MLflow experiment is not resolved yet")
            # One vote per voter and name on a trace: a user, or for anonymous votes the one person the answer
            # was given to (a trace is one request's answer), so a vote changes and is never stuffed. Items are
            # attempted by one thread (a shutdown flush runs only once it has stopped), in order.
            try:
                outcome = self._write(item)
            except Refused as refused:
                return self._refused(item, refused)
            if outcome is not None:
                return outcome
        except Exception as exc:
            return self._failed(item, exc)
        self._server.answered()
        item.state, item.last_error = DELIVERED, None
        self.delivered += 1
        if self._review is not None and item.trace_id is not None:
            self._review.route(item.trace_id, item.assessments, self._backend.experiment_id)
        return DELIVERED

    def _write(self, item: Item) -> str | None:
        """Write the item's assessments not written yet; NOT_FOUND when the trace is another service's, WAITING
        while a span it names is not stored yet. Raises `Refused` for a span or session the trace does not have."""
        assert item.trace_id is not None
        facts = self._writer.trace_facts(item.trace_id, item.id, item.source_id)
        if not item.issued_here and facts.experiment_id != self._backend.experiment_id:
            # Another service's trace on the same server: refused exactly as a made-up ID is.
            item.state, item.last_error = FAILED, "trace not found in this service's experiment"
            return NOT_FOUND
        if not item.assessment_ids and (waiting := self._check_spans(item)) is not None:
            return waiting
        target, assessments = item.trace_id, item.assessments
        if any((a.metadata or {}).get(SCOPE_KEY) == "session" for a in assessments):
            target, facts, assessments = self._session_target(item, facts)
        item.maybe_written = True  # until a definite "not written" (not found, rejected)
        cast_at = int(item.created_at * 1000)
        for index in range(len(item.assessment_ids), len(assessments)):
            assessment = assessments[index]
            assessment = dataclasses.replace(
                assessment, metadata={**(assessment.metadata or {}), CAST_AT_KEY: str(cast_at)}
            )
            assessment_id = facts.written.get(index)
            earlier = facts.earlier_votes.get(vote_key(assessment.name, assessment.span_id, assessment.metadata))
            if assessment_id is None and earlier is not None:  # one vote per user, name and target
                earlier_id, earlier_cast, withdrawn = earlier
                if earlier_cast is not None and earlier_cast > cast_at:
                    assessment_id = earlier_id  # the voter's newer vote is stored already: this one is superseded
                elif SIGNAL_KEY in (assessment.metadata or {}) and not withdrawn:
                    assessment_id = earlier_id  # a signal already given (copied twice): no news, no new history
                else:
                    assessment_id = self._writer.override_feedback(
                        target, earlier_id, assessment, item.source_id, item.id, index
                    )
            elif assessment_id is None:
                # A retraction with no vote stored yet is written too: the vote it withdraws may be delivered
                # later (it waited for its trace), and then its older cast time loses to the retraction.
                assessment_id = self._writer.log_feedback(target, assessment, item.source_id, item.id, index)
            item.assessment_ids.append(assessment_id)
        return None

    def _check_spans(self, item: Item) -> str | None:
        """None when every span the item names is a span of its trace; WAITING while the trace's spans may not all
        be stored yet (then NOT_FOUND once the wait is over). Raises `Refused` for a span the trace does not have."""
        assert item.trace_id is not None
        named = {a.span_id for a in item.assessments if a.span_id is not None}
        if not named:
            return None
        stored, complete = self._writer.span_ids(item.trace_id)
        missing = sorted(named - stored)
        if not missing:
            return None
        message = f"span_id {missing[0]!r} is not a span of trace {item.trace_id!r}"
        if complete:
            raise Refused(422, message, "span_id")
        outcome = self._not_found(item)
        if outcome == NOT_FOUND:
            item.last_error = message
        return outcome

    def _session_target(self, item: Item, facts: TraceFacts) -> tuple[str, TraceFacts, list[Assessment]]:
        """Where a session-wide vote goes: the first trace of the named trace's session (as MLflow's multi-turn
        evaluation stores session-level assessments), with the session in each assessment's metadata."""
        assert item.trace_id is not None
        session = facts.session
        if not session:
            raise Refused(422, "this answer belongs to no session (its request named none)", "scope")
        if any(c in session for c in "'\\`"):
            raise Refused(422, "this answer's session ID has quotes, so its session cannot be looked up", "scope")
        assert facts.experiment_id is not None
        target = self._writer.first_trace_of_session(facts.experiment_id, session) or item.trace_id
        if target != item.trace_id:
            facts = self._writer.trace_facts(target, item.id, item.source_id)
        assessments = [
            dataclasses.replace(a, metadata={**(a.metadata or {}), SESSION_KEY: session}) for a in item.assessments
        ]
        return target, facts, assessments

    def settle(self, item: Item, outcome: str) -> None:
        """Save an attempted item, schedule it again if it is still pending, and tell its request."""
        with self._held_lock:
            self._held.discard(item.id)  # saved below without a lease, or finished
        if outcome in (WAITING, VOUCHED):  # VOUCHED is still waiting for its trace; its request hears of it
            age = time.time() - (item.not_found_since or time.time())
            self.outbox.save(item, next_at=time.time() + min(max(age / 4, 0.25), 5.0))
        elif outcome == UNAVAILABLE:
            self.outbox.save(item, next_at=time.time() + self._server.backoff())
        elif outcome == ITEM_ERROR:
            pause = _ITEM_BACKOFF[min(max(item.item_errors, 1), len(_ITEM_BACKOFF)) - 1]
            self.outbox.save(item, next_at=time.time() + pause)
        else:
            with self._waiters_lock:
                # Its request answers it (and the route logs it once): no warning per hostile request.
                answered = outcome in (NOT_FOUND, REFUSED, REJECTED) and item.id in self._waiters
            if item.state == FAILED and not answered:
                self.failed += 1
                logger.warning("feedback %s for trace %s failed: %s", item.id, item.trace_id, item.last_error)
            self.outbox.save(item, next_at=time.time())
        self._report(item, outcome)

    def vouch(self, item: Item) -> bool:
        """Whether another worker of this host recorded the item's trace as issued (then it waits as long as
        its own worker would). Fills in the trace ID of an item named by client request ID."""
        try:
            records = self.outbox.issued(self.destination, item.trace_id, item.client_request_id)
            if len(records) != 1 or (item.trace_id is None and records[0]["chosen_by_client"]):
                return False  # unknown, ambiguous, or a client-chosen ID (refused once MLflow has the trace)
            trace_id: str = records[0]["trace_id"]
        except Exception:  # a record is a shortcut, never a reason to fail a vote
            logger.debug("could not read the issued-trace records", exc_info=True)
            return False
        item.trace_id = item.trace_id or trace_id
        item.vouched = True
        return True

    def _replay_spool(self) -> None:
        """Send spooled traces once the server answers (before feedback that may be waiting for them)."""
        spool = current_spool()
        if spool is None or self._backend.experiment_id is None or not spool.pending():
            return
        if self._server.problem() is None:
            spool.replay()

    def share_issued(self) -> None:
        """Record the traces this process issued where the other workers sharing the outbox can see them."""
        issued = self._recent.take_unshared()
        if issued:
            try:
                self.outbox.record_issued(self.destination, issued, time.time())
            except Exception:
                logger.debug("could not share %d issued trace(s)", len(issued), exc_info=True)

    def recheck_failed(self) -> int:
        """Put back in the queue the items failed for a missing trace that has appeared since; how many."""

        since = time.time() - _RECHECK_HORIZON_SECONDS
        revived = 0
        for item in self.outbox.failed_not_found(self.destination, since, _RECHECK_BATCH):
            if self._server.problem() is not None:
                break
            try:
                found = (
                    self._writer.trace_exists(item.trace_id)
                    if item.trace_id
                    else self._resolve(item.client_request_id or "")
                )
            except Exception:
                continue
            if found:
                self.outbox.revive(item.id)
                revived += 1
        if revived:
            self.revived += revived
            logger.info("%d feedback item(s) whose trace appeared late are delivered now", revived)
        return revived

    def _resolve(self, client_request_id: str) -> str | None:
        found = self._recent.lookup(client_request_id)
        if found.ambiguous:
            raise Refused(409, AMBIGUOUS)
        if found.chosen_by_client:
            raise Refused(403, CHOSEN_BY_CLIENT)
        if found.trace_id is not None:
            return found.trace_id
        experiment_id = self._backend.experiment_id
        if experiment_id is None:
            self._backend.start_resolving()
            raise ConnectionError("the MLflow experiment is not resolved yet")
        return self._writer.search_trace_id(experiment_id, client_request_id, self._backend.otlp)

    def _refused(self, item: Item, refused: Refused) -> str:
        item.state, item.last_error = FAILED, refused.message
        item.refusal = (refused.status, refused.message, refused.field)
        return REFUSED

    def _not_found(self, item: Item) -> str:
        now = time.time()
        if item.not_found_since is None or (item.trace_id is not None and self._recent.is_open(item.trace_id)):
            item.not_found_since = now  # a stream still running is not exported yet: the clock has not started
        item.maybe_written = False
        newly_vouched = not (item.issued_here or item.vouched) and self.vouch(item)
        limit = self._known_wait if item.issued_here or item.vouched else self._unknown_wait
        if now - item.not_found_since < limit:
            return VOUCHED if newly_vouched else WAITING
        item.state, item.last_error = FAILED, f"trace not found after {limit:g} s"
        return NOT_FOUND

    def _item_error(self, item: Item) -> str:
        """An error on one item while the server answers its health check: retried on its own a few times
        (one log line each, never the server's multi-line text), then failed; the queue moves on."""
        item.item_errors += 1
        item.attempts -= 1  # counted as the item's error, not as one of the server's
        logger.warning(
            "feedback %s failed while the tracking server is up (%d of %d): %s",
            item.id,
            item.item_errors,
            MAX_ITEM_ERRORS,
            (item.last_error or "")[:200],
        )
        if item.item_errors >= MAX_ITEM_ERRORS:
            item.state = FAILED
            return REJECTED
        return ITEM_ERROR

    def _failed(self, item: Item, exc: Exception) -> str:
        kind = classify(exc)
        if kind != UNAVAILABLE:
            self._server.answered()
        if kind == NOT_FOUND:
            return self._not_found(item)
        # One line, bounded: the server's text may be long and multi-line, and anyone can provoke it.
        item.last_error = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        if kind == REJECTED:
            item.state = FAILED
            return REJECTED
        self._server.call_failed()
        item.attempts += 1
        if item.attempts >= MAX_ATTEMPTS:
            item.state = FAILED
            return REJECTED
        return UNAVAILABLE

    # -- background --------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            freed = self.outbox.release_dead_owners()
            if freed:
                logger.info("replaying %d feedback item(s) left by a stopped process", freed)
            self.outbox.purge_finished(_RETENTION_SECONDS, _FAILED_RETENTION_SECONDS)
        except Exception:
            logger.warning("could not read the feedback outbox", exc_info=True)
        while not self._stopping.is_set():
            self.share_issued()
            try:
                self._replay_spool()
                if time.monotonic() >= self._next_recheck:
                    self._next_recheck = time.monotonic() + _RECHECK_SECONDS
                    self.outbox.prune_issued(2 * max(self._known_wait, _RECHECK_HORIZON_SECONDS))
                    self.recheck_failed()
                pause = self._pass(None, everything=False)
            except Exception:
                logger.warning("feedback delivery pass failed", exc_info=True)
                pause = _POLL_SECONDS
            self._wake.wait(min(pause, _SHARE_SECONDS))
            self._wake.clear()

    def _pass(self, deadline: float | None, everything: bool) -> float:
        """Deliver due items in order; seconds until the next one is due."""
        last_seq = 0  # each item is tried at most once per pass
        while deadline is None or time.monotonic() < deadline:
            if self._stopping.is_set() and not everything:
                return 0.0
            due = self.outbox.next_due(self.destination)
            if due is None or (due > time.time() and not everything):
                break  # nothing to deliver: no reason to contact the server
            if self._server.problem() is not None:
                return self._server.retry_in()
            items = self.outbox.claim(self.destination, _BATCH, everything, after=last_seq)
            if not items:
                break
            self._hold([item.id for item in items])
            for index, item in enumerate(items):
                last_seq = item.seq
                outcome = self.attempt(item)
                if outcome == UNAVAILABLE and self._server.problem() is None:
                    outcome = self._item_error(item)  # the server is up: the problem is this item's
                self.settle(item, outcome)
                if outcome == UNAVAILABLE:  # keep the order: nothing after it goes first
                    for rest in items[index + 1 :]:
                        self.outbox.save(rest, next_at=time.time())
                        with self._held_lock:
                            self._held.discard(rest.id)
                    return self._server.backoff()
        due = self.outbox.next_due(self.destination)
        return _POLL_SECONDS if due is None else min(max(due - time.time(), 0.05), _POLL_SECONDS)

    def status(self) -> dict[str, Any]:
        """Tracing, reachability and outbox figures for the health route. Blocking (reads the outbox)."""
        return {
            "experiment_id": self._backend.experiment_id,
            "tracing_disabled": self._backend.disabled_reason,
            "traces_issued": self._recent.issued,
            **self._backend.losses.snapshot(),
            "trace_spool": spool.stats() if (spool := current_spool()) is not None else None,
            "review": self._review.status() if self._review is not None else None,
            "reachable": self._server.reachable,
            "last_error": self._server.last_error,
            "outbox": {
                "path": self.outbox.path,
                **self.outbox.stats(self.destination),
                "delivered_by_this_process": self.delivered,
                "failed_by_this_process": self.failed,
                "revived_by_this_process": self.revived,
                "recheck": f"failed 'trace not found' items are looked for again every {_RECHECK_SECONDS:g} s"
                f" for {_RECHECK_HORIZON_SECONDS / 3600:g} h",
            },
        }
