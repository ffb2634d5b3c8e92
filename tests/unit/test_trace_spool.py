"""The trace spool's bookkeeping: budget, whole traces, the writer thread. Replay is tested against a real
server in tests/test_no_loss.py and tests/test_deployment.py. No server."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from typing import Any

from mlflow.entities import TraceInfo, TraceState
from mlflow.entities.trace_location import TraceLocation

from mlflow_feedback_middleware._mlflow.trace_spool import TraceSpool


class FakeSpan:
    def __init__(self, trace_id: str, size: int = 100) -> None:
        self.trace_id, self.size = trace_id, size

    def to_dict(self) -> dict[str, Any]:
        return {"trace_id": self.trace_id, "attributes": {"x": "y" * self.size}}


def info() -> TraceInfo:
    return TraceInfo(
        trace_id=f"tr-{uuid.uuid4().hex}",
        trace_location=TraceLocation.from_experiment_id("7"),
        request_time=1_764_500_000_000,
        state=TraceState.OK,
    )


def test_a_whole_trace_is_kept_all_or_none(tmp_path: Path) -> None:
    spool = TraceSpool(str(tmp_path / "spool.db"), max_bytes=3_000)
    trace = info()
    assert spool.add_info(trace, [FakeSpan(trace.trace_id), FakeSpan(trace.trace_id)])
    assert spool.pending() == 2  # the info and its spans, one part each
    big = info()
    assert not spool.add_info(big, [FakeSpan(big.trace_id, size=5_000)])  # over the budget: none of it
    stats = spool.stats()
    assert stats["pending_parts"] == 2 and stats["spooled_traces_by_this_process"] == 1
    assert stats["dropped_traces_by_this_process"] == 1


def test_workers_sharing_the_file_share_its_budget(tmp_path: Path) -> None:
    one, two = TraceSpool(str(tmp_path / "spool.db"), max_bytes=800), TraceSpool(str(tmp_path / "spool.db"), 800)
    assert one.add_spans("7", [FakeSpan("tr-1", size=300)])
    assert two.pending() == 1
    assert not two.add_spans("7", [FakeSpan("tr-2", size=600)])


def test_parts_handed_over_are_written_off_the_callers_thread() -> None:
    spool = TraceSpool(None)
    written: list[str] = []
    dropped: list[str] = []

    def add() -> bool:
        written.append(threading.current_thread().name)
        return spool.add_spans("7", [FakeSpan("tr-1")])

    spool.add_later(add, lambda: dropped.append("x"), 0)
    spool.add_later(lambda: False, lambda: dropped.append("refused"), 1)  # a part the budget refuses
    assert spool.flush_deferred(10.0)
    assert written == ["mlflow_feedback_spool"] and dropped == ["refused"]
    assert spool.pending() == 1


def test_a_replay_mlflow_calls_not_supported_asks_the_servers_version_again(tmp_path: Path, monkeypatch: Any) -> None:
    """MLflow's client keeps a failed server-version lookup for the process and then calls every span upload
    "not supported": the replay clears that memory, so the next pass asks again; the part stays spooled."""
    import mlflow.entities
    import mlflow.tracing.client

    from mlflow_feedback_middleware._mlflow import internals

    class NotSupported:
        def log_spans(self, location: str, spans: list[Any]) -> None:
            raise NotImplementedError("log_spans is not supported: could not identify MLflow server version")

    forgotten: list[bool] = []
    monkeypatch.setattr(mlflow.tracing.client, "TracingClient", NotSupported)
    monkeypatch.setattr(mlflow.entities.Span, "from_dict", staticmethod(lambda span: span))
    monkeypatch.setattr(internals, "forget_server_version", lambda: forgotten.append(True) or True)
    spool = TraceSpool(str(tmp_path / "spool.db"))
    spool.add_spans("7", [FakeSpan("tr-1")])
    assert spool.replay() == 0
    assert forgotten == [True] and spool.pending() == 1
