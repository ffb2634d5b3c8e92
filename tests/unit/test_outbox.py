"""The feedback outbox: storing, claiming, leases between processes, idempotency and its cap. No server."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from mlflow.entities import AssessmentSource, Feedback

from mlflow_feedback_middleware.delivery import outbox as outbox_module
from mlflow_feedback_middleware.delivery.outbox import DELIVERED, Item, Outbox, OutboxFull

TRACE = "tr-" + "b" * 32


def item(**fields: object) -> Item:
    values: dict[str, object] = {
        "destination": "uri|exp",
        "trace_id": TRACE,
        "client_request_id": None,
        "source_id": "alice",
        "assessments": [Feedback(name="user_feedback", value=True, source=AssessmentSource("HUMAN", "alice"))],
        "issued_here": True,
    }
    values.update(fields)
    return Item(**values)  # type: ignore[arg-type]


def test_an_item_round_trips_and_a_retry_is_stored_once(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    first = item()
    assert box.add(first, lease_seconds=30) is None
    again = box.add(item(id=first.id), lease_seconds=30)  # the same Idempotency-Key
    assert again is not None and again.id == first.id
    stored = box.get(first.id)
    assert stored is not None and stored.assessments[0].value is True and stored.source_id == "alice"
    assert box.stats("uri|exp")["pending"] == 1


def test_the_file_is_private_to_its_owner(tmp_path: Path) -> None:
    Outbox(tmp_path / "private" / "o.db")
    assert stat.S_IMODE(os.stat(tmp_path / "private").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "private" / "o.db").st_mode) == 0o600


def test_a_leased_item_is_skipped_by_another_process_until_its_lease_ends(tmp_path: Path) -> None:
    mine, theirs = Outbox(tmp_path / "o.db"), Outbox(tmp_path / "o.db")
    theirs.owner = "another-host:1"  # a second worker sharing the file
    added = item()
    mine.add(added, lease_seconds=30)
    assert theirs.claim("uri|exp", limit=10) == []
    mine.save(added, next_at=0.0)  # released, due now
    [taken] = theirs.claim("uri|exp", limit=10)
    assert taken.id == added.id and taken.maybe_written is False
    taken.state = DELIVERED
    theirs.save(taken)
    assert mine.claim("uri|exp", limit=10, everything=True) == []
    assert mine.stats("uri|exp")["pending"] == 0


def test_the_outbox_refuses_past_its_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outbox_module, "MAX_PENDING", 2)
    box = Outbox(None)
    box.add(item(), 30)
    box.add(item(), 30)
    with pytest.raises(OutboxFull):
        box.add(item(), 30)
    box.add(item(destination="another|service"), 30)  # the cap is per service
