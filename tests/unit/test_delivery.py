"""The delivery state machine, with a fake writer in place of the tracking store and an in-memory outbox: what
each answer of the store makes of an item, and the queue's order. No server (tests/test_no_loss.py and
tests/test_feedback.py run delivery against a real one)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST

from mlflow_feedback_middleware._mlflow import server_watch
from mlflow_feedback_middleware.delivery import feedback_delivery as delivery_module
from mlflow_feedback_middleware.delivery.feedback_delivery import WAITING, FeedbackDelivery
from mlflow_feedback_middleware.delivery.outbox import DELIVERED, FAILED, PENDING, Item, Outbox
from mlflow_feedback_middleware.delivery.registry import RecentTraces
from mlflow_feedback_middleware.delivery.writer import (
    NOT_FOUND,
    REFUSED,
    REJECTED,
    UNAVAILABLE,
    EarlierVote,
    TraceFacts,
)
from mlflow_feedback_middleware.intake.models import (
    SESSION_KEY,
    SIGNAL_KEY,
    Assessment,
    FeedbackRequest,
    retraction,
    targeted,
)

TRACE = "tr-" + "a" * 32


def missing() -> MlflowException:
    return MlflowException("trace not found", error_code=RESOURCE_DOES_NOT_EXIST)


@dataclass
class FakeWriter:
    """The tracking store as delivery sees it: facts per trace, and every write recorded."""

    facts: dict[str, TraceFacts] = field(default_factory=dict)
    spans: dict[str, tuple[set[str], bool]] = field(default_factory=dict)  # trace -> span IDs, all stored
    sessions: dict[str, str] = field(default_factory=dict)  # session -> its first trace
    fail_with: BaseException | None = None  # raised by the next write
    writes: list[tuple[str, str, Any]] = field(default_factory=list)
    written: list[Assessment] = field(default_factory=list)

    def trace_facts(self, trace_id: str, feedback_id: str, source_id: str) -> TraceFacts:
        if trace_id not in self.facts:
            raise missing()
        return self.facts[trace_id]

    def trace_exists(self, trace_id: str) -> bool:
        return trace_id in self.facts

    def search_trace_id(self, experiment_id: str, client_request_id: str, by_tag: bool) -> str | None:
        return None

    def first_trace_of_session(self, experiment_id: str, session_id: str) -> str | None:
        return self.sessions.get(session_id)

    def span_ids(self, trace_id: str) -> tuple[set[str], bool]:
        return self.spans.get(trace_id, (set(), False))

    def _write(self, kind: str, trace_id: str, assessment: Assessment) -> str:
        if self.fail_with is not None:
            error, self.fail_with = self.fail_with, None
            raise error
        self.writes.append((kind, trace_id, assessment.value))
        self.written.append(assessment)
        return f"a-{len(self.writes)}"

    def log_feedback(self, trace_id: str, assessment: Assessment, source_id: str, feedback_id: str, index: int) -> str:
        return self._write("log", trace_id, assessment)

    def override_feedback(
        self, trace_id: str, earlier_id: str, assessment: Assessment, source_id: str, feedback_id: str, index: int
    ) -> str:
        return self._write("override", trace_id, assessment)


@pytest.fixture
def server_up(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str | None]]:
    """The tracking server's health as the delivery's watch probes it: None (answers) or why not."""
    answer: list[str | None] = [None]
    monkeypatch.setattr(server_watch, "probe", lambda uri, timeout: answer[0])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    yield answer


def delivery(writer: FakeWriter, known_wait: float = 300.0, unknown_wait: float = 0.0) -> FeedbackDelivery:
    backend = SimpleNamespace(experiment_id="1", unreachable=False, otlp=False, start_resolving=lambda: None)
    return FeedbackDelivery(
        Outbox(None),
        backend,  # type: ignore[arg-type]
        RecentTraces(),
        "test",
        unknown_wait=unknown_wait,
        known_wait=known_wait,
        exit_timeout=1.0,
        writer=writer,
    )


def item(*values: Any, trace_id: str = TRACE, issued_here: bool = True) -> Item:
    assessments = [Assessment(f"name{i}", value) for i, value in enumerate(values)]
    return Item("test", trace_id, None, "ann", assessments, issued_here)


def test_an_item_is_written_and_delivered(server_up: list[str | None]) -> None:
    writer = FakeWriter({TRACE: TraceFacts("1")})
    vote = item(True, 0.8)
    assert delivery(writer).attempt(vote) == DELIVERED
    assert writer.writes == [("log", TRACE, True), ("log", TRACE, 0.8)]
    assert vote.state == DELIVERED and vote.assessment_ids == ["a-1", "a-2"]


def test_a_voters_second_vote_overrides_the_first(server_up: list[str | None]) -> None:
    writer = FakeWriter({TRACE: TraceFacts("1", earlier_votes={("name0", "", ""): EarlierVote("a-old", None)})})
    assert delivery(writer).attempt(item(False)) == DELIVERED
    assert writer.writes == [("override", TRACE, False)]


def test_a_retried_item_writes_only_what_is_missing(server_up: list[str | None]) -> None:
    """After a crash mid-item, the assessments its ID already wrote (read back from the trace) are not
    written again."""
    writer = FakeWriter({TRACE: TraceFacts("1", written={0: "a-0"})})
    vote = item(True, 0.8)
    assert delivery(writer).attempt(vote) == DELIVERED
    assert writer.writes == [("log", TRACE, 0.8)] and vote.assessment_ids == ["a-0", "a-1"]


def test_a_trace_not_exported_yet_is_waited_for_then_failed(server_up: list[str | None]) -> None:
    writer = FakeWriter()
    vote = item(True)
    assert delivery(writer, known_wait=300).attempt(vote) == WAITING and vote.state == PENDING
    assert delivery(writer, known_wait=0).attempt(vote) == NOT_FOUND and vote.state == FAILED
    assert writer.writes == []


def test_another_services_trace_is_not_found_here(server_up: list[str | None]) -> None:
    writer = FakeWriter({TRACE: TraceFacts("2")})
    vote = item(True, issued_here=False)
    assert delivery(writer).attempt(vote) == NOT_FOUND and writer.writes == []


def test_a_refusal_fails_the_item_and_an_outage_keeps_it(server_up: list[str | None]) -> None:
    writer = FakeWriter({TRACE: TraceFacts("1")})
    writer.fail_with = MlflowException("bad value", error_code=INVALID_PARAMETER_VALUE)
    refused = item(True)
    assert delivery(writer).attempt(refused) == REJECTED and refused.state == FAILED

    writer.fail_with = ConnectionError("refused")
    kept = item(True)
    assert delivery(writer).attempt(kept) == UNAVAILABLE and kept.state == PENDING and kept.attempts == 1


def test_nothing_is_tried_while_the_server_is_down(server_up: list[str | None]) -> None:
    server_up[0] = "ConnectionRefusedError: [Errno 111]"
    writer = FakeWriter({TRACE: TraceFacts("1")})
    vote = item(True)
    assert delivery(writer).attempt(vote) == UNAVAILABLE and writer.writes == []
    assert vote.last_error == server_up[0]


def test_an_items_own_error_does_not_hold_up_the_queue(server_up: list[str | None]) -> None:
    """A 5xx on one item while the server's health check passes is the item's: it is retried on its own,
    later, and the items behind it are delivered now, in order."""
    writer = FakeWriter({TRACE: TraceFacts("1"), "tr-" + "b" * 32: TraceFacts("1")})
    runner = delivery(writer)
    first, second = item("first"), item("second", trace_id="tr-" + "b" * 32)
    for vote in (first, second):
        runner.accept(vote)
    writer.fail_with = ConnectionError("500 on this item only")
    runner._pass(None, everything=False)
    assert writer.writes == [("log", "tr-" + "b" * 32, "second")]
    stored = runner.outbox.get(first.id)
    assert stored is not None and stored.state == PENDING and stored.item_errors == 1
    assert runner.outbox.stats("test")["delivered"] == 1


def test_an_outage_keeps_the_order(server_up: list[str | None]) -> None:
    """When the server stops answering mid-pass, nothing after the failed item goes first."""
    writer = FakeWriter({TRACE: TraceFacts("1")})
    runner = delivery(writer)
    first, second = item("first"), item("second")
    for vote in (first, second):
        runner.accept(vote)
    writer.fail_with = ConnectionError("refused")
    server_up[0] = None
    original = delivery_module.FeedbackDelivery.attempt

    def attempt_then_go_down(self: FeedbackDelivery, vote: Item) -> str:
        outcome = original(self, vote)
        server_up[0] = "ConnectionRefusedError"  # the server went away with the first call
        return outcome

    delivery_module.FeedbackDelivery.attempt = attempt_then_go_down  # type: ignore[method-assign]
    try:
        runner._pass(None, everything=False)
    finally:
        delivery_module.FeedbackDelivery.attempt = original  # type: ignore[method-assign]
    assert writer.writes == []
    assert runner.outbox.stats("test")["pending"] == 2


def test_an_older_vote_delivered_after_a_newer_one_does_not_win(server_up: list[str | None]) -> None:
    """A voter clicks Good, then Bad; Good waited for its trace and is delivered last: Bad stays."""
    newer = item(False)
    older = item(True)
    older.created_at = newer.created_at - 5
    stored = TraceFacts("1", earlier_votes={("name0", "", ""): EarlierVote("a-newer", int(newer.created_at * 1000))})
    writer = FakeWriter({TRACE: stored})
    assert delivery(writer).attempt(older) == DELIVERED
    assert writer.writes == [] and older.assessment_ids == ["a-newer"]
    newest = item(True)
    newest.created_at = newer.created_at + 5
    assert delivery(writer).attempt(newest) == DELIVERED and writer.writes == [("override", TRACE, True)]


def test_a_retraction_overrides_the_vote_and_outranks_an_older_vote_delivered_late(
    server_up: list[str | None],
) -> None:
    """Good, then withdrawn: the retraction overrides Good. Had Good waited for its trace and arrived after the
    retraction, its older cast time loses, so a withdrawn vote never comes back."""
    vote = item(True)
    withdraw = Item("test", TRACE, None, "ann", [retraction("name0")], True)
    withdraw.created_at = vote.created_at + 2
    writer = FakeWriter(
        {TRACE: TraceFacts("1", earlier_votes={("name0", "", ""): EarlierVote("a-vote", int(vote.created_at * 1000))})}
    )
    assert delivery(writer).attempt(withdraw) == DELIVERED and writer.writes == [("override", TRACE, None)]

    # Out of order: the retraction is stored first (with nothing to override), the vote arrives later.
    withdraw = Item("test", TRACE, None, "ann", [retraction("name0")], True)
    withdraw.created_at = vote.created_at + 2
    writer = FakeWriter({TRACE: TraceFacts("1")})
    assert delivery(writer).attempt(withdraw) == DELIVERED and writer.writes == [("log", TRACE, None)]
    writer.facts[TRACE] = TraceFacts(
        "1", earlier_votes={("name0", "", ""): EarlierVote("a-1", int(withdraw.created_at * 1000))}
    )
    assert delivery(writer).attempt(vote) == DELIVERED
    assert writer.writes == [("log", TRACE, None)] and vote.assessment_ids == ["a-1"]


SPAN = "00f067aa0ba902b7"


def test_a_vote_on_a_span_is_checked_against_the_traces_spans(server_up: list[str | None]) -> None:
    """A span of the trace: written with its span ID. A span still on its way: waited for. Not a span of a
    trace whose spans are all stored: refused, naming span_id, before anything is written."""
    on_span = Item("test", TRACE, None, "ann", [Assessment("helpful_doc", False, span_id=SPAN)], True)
    writer = FakeWriter({TRACE: TraceFacts("1")}, spans={TRACE: ({SPAN}, True)})
    assert delivery(writer).attempt(on_span) == DELIVERED and writer.written[0].span_id == SPAN

    later = Item("test", TRACE, None, "ann", [Assessment("helpful_doc", False, span_id=SPAN)], True)
    writer = FakeWriter({TRACE: TraceFacts("1")}, spans={TRACE: (set(), False)})
    assert delivery(writer).attempt(later) == WAITING and writer.writes == []

    invented = Item("test", TRACE, None, "ann", [Assessment("helpful_doc", False, span_id="1" * 16)], True)
    writer = FakeWriter({TRACE: TraceFacts("1")}, spans={TRACE: ({SPAN}, True)})
    assert delivery(writer).attempt(invented) == REFUSED and writer.writes == []
    assert invented.refusal is not None and invented.refusal[0] == 422 and invented.refusal[2] == "span_id"


def test_one_vote_per_span_and_per_answer(server_up: list[str | None]) -> None:
    """A vote of the same name on the answer and on one of its spans are two votes, not one changed."""
    on_answer = TraceFacts("1", earlier_votes={("helpful", "", ""): EarlierVote("a-answer", None)})
    writer = FakeWriter({TRACE: on_answer}, spans={TRACE: ({SPAN}, True)})
    vote = Item("test", TRACE, None, "ann", [Assessment("helpful", False, span_id=SPAN)], True)
    assert delivery(writer).attempt(vote) == DELIVERED and writer.writes == [("log", TRACE, False)]


def test_a_session_vote_goes_to_the_sessions_first_trace(server_up: list[str | None]) -> None:
    """Named by its third turn's trace; stored on the first turn's trace with the session in its metadata, beside
    (not instead of) the voter's vote on that first answer."""
    first, third = "tr-" + "1" * 32, TRACE
    writer = FakeWriter(
        {
            third: TraceFacts("1", session="chat-42"),
            first: TraceFacts(
                "1", session="chat-42", earlier_votes={("user_feedback", "", ""): EarlierVote("a-turn", None)}
            ),
        },
        sessions={"chat-42": first},
    )
    vote = Item("test", third, None, "ann", targeted([Assessment("user_feedback", True)], session_request()), True)
    assert delivery(writer).attempt(vote) == DELIVERED
    assert writer.writes == [("log", first, True)]
    assert writer.written[0].metadata is not None and writer.written[0].metadata[SESSION_KEY] == "chat-42"

    no_session = Item("test", first, None, "ann", vote.assessments, True)
    writer = FakeWriter({first: TraceFacts("1")})
    assert delivery(writer).attempt(no_session) == REFUSED and no_session.refusal is not None
    assert no_session.refusal[2] == "scope" and writer.writes == []


def session_request() -> FeedbackRequest:
    return FeedbackRequest(trace_id=TRACE, is_correct=True, scope="session")


def test_a_signal_given_again_writes_nothing_new_unless_it_was_withdrawn(server_up: list[str | None]) -> None:
    copied = Assessment("copied_answer", True, None, {SIGNAL_KEY: "true"})
    stored = TraceFacts("1", earlier_votes={("copied_answer", "", ""): EarlierVote("a-copy", None)})
    writer = FakeWriter({TRACE: stored})
    again = Item("test", TRACE, None, "ann", [copied], True)
    assert delivery(writer).attempt(again) == DELIVERED and writer.writes == [] and again.assessment_ids == ["a-copy"]

    withdrawn = TraceFacts("1", earlier_votes={("copied_answer", "", ""): EarlierVote("a-retraction", None, True)})
    writer = FakeWriter({TRACE: withdrawn})
    assert delivery(writer).attempt(Item("test", TRACE, None, "ann", [copied], True)) == DELIVERED
    assert writer.writes == [("override", TRACE, True)]
