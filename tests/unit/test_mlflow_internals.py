"""Each private MLflow touch-point, deleted in turn: the package falls back to MLflow's own behaviour and says
"MLflow API changed" once, naming the version. And no module but `_mlflow.internals` touches one. No server."""

from __future__ import annotations

import ast
import importlib
import queue
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from mlflow_feedback_middleware._mlflow import internals
from mlflow_feedback_middleware._mlflow.export_losses import ExportLosses
from mlflow_feedback_middleware._mlflow.trace_info_client import install_fast_trace_info_client

PACKAGE = Path(__file__).resolve().parents[2] / "mlflow_feedback_middleware"


@pytest.fixture(autouse=True)
def fresh_warnings() -> Iterator[None]:
    internals._warned.clear()
    yield
    internals._warned.clear()


def api_changes(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "MLflow API changed" in r.getMessage()]


def assert_one_warning(caplog: pytest.LogCaptureFixture, *names: str) -> None:
    [warning] = api_changes(caplog)
    assert internals.MLFLOW_VERSION in warning and "verified with 3.12.0 to 3.17.2" in warning
    for name in names:
        assert name in warning


# (touch-point function, its arguments, the MLflow attribute to delete, the fallback value)
CASES = [
    ("trace_exporter", (), "mlflow.tracing.provider._get_trace_exporter", None),
    ("span_processor", (), "mlflow.tracing.provider._get_span_processor", None),
    ("build_tracer", ("t",), "mlflow.tracing.provider._get_tracer", False),
    ("is_mlflow_exporter", (object(),), "mlflow.tracing.export.mlflow_v3.MlflowV3SpanExporter", False),
    ("otlp_headers", ("1",), "mlflow.tracing.utils.otlp.build_otlp_headers", None),
    ("reset_provider", (), "mlflow.tracing.provider.reset", False),
    ("flush_provider", (1000,), "mlflow.tracing.provider.provider", None),
    ("trace_continuation", (), "mlflow.tracing.utils.generate_mlflow_trace_id_from_otel_trace_id", None),
    ("forget_server_version", (), "mlflow.store.tracking.rest_store.RestStore", False),
]


@pytest.mark.parametrize(("function", "args", "internal", "fallback"), CASES, ids=[c[0] for c in CASES])
def test_a_deleted_internal_gives_the_fallback_and_one_warning(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    function: str,
    args: tuple[Any, ...],
    internal: str,
    fallback: Any,
) -> None:
    importlib.import_module(internal.rsplit(".", 1)[0])
    monkeypatch.delattr(internal)
    for _ in range(3):
        assert getattr(internals, function)(*args) == fallback
    assert_one_warning(caplog, internal.rsplit(".", 1)[1])


def test_with_the_internals_present_each_touch_point_works(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing is sent to it
    assert internals.reset_provider() is True
    assert internals.build_tracer("t") is True
    exporter = internals.trace_exporter()
    assert internals.is_mlflow_exporter(exporter) is (type(exporter).__name__ == "MlflowV3SpanExporter")
    assert internals.trace_continuation() is not None
    assert internals.otlp_headers("1") is not None
    names: list[str] = []
    assert internals.rename_span(SimpleNamespace(_span=SimpleNamespace(update_name=names.append)), "GET /x")
    assert names == ["GET /x"]
    with internals.in_memory_trace("tr-" + "0" * 32) as trace:
        assert trace is None  # no such trace running
    assert api_changes(caplog) == []


def test_a_failed_server_version_lookup_is_forgotten(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """MLflow caches its tracking server's version per process, a failed lookup too (None: span uploads are
    then "not supported" for good); the adapter clears that cache, and says so once where it cannot."""
    from mlflow.store.tracking.rest_store import RestStore
    from mlflow.utils.rest_utils import MlflowHostCreds

    lookup = RestStore._get_server_version
    assert lookup(MlflowHostCreds("http://127.0.0.1:9")) is None  # nothing listens on port 9: refused at once
    assert lookup.cache_info().currsize >= 1
    assert internals.forget_server_version() is True
    assert lookup.cache_info().currsize == 0

    monkeypatch.setattr(RestStore, "_get_server_version", staticmethod(lookup.__wrapped__))  # no cache
    for _ in range(3):
        assert internals.forget_server_version() is False
    assert_one_warning(caplog, "_get_server_version", "cache_clear")


def test_an_error_inside_an_internal_is_not_an_api_change(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A missing optional dependency (sqlparse for a local sqlite store) surfaces as MLflow's own error at the
    first span, not as "MLflow API changed"."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///:memory:")
    internals.reset_provider()
    internals.build_tracer("t")  # True with the full mlflow package, False with mlflow-tracing only
    assert api_changes(caplog) == []
    internals.reset_provider()


def test_a_missing_trace_manager_leaves_handler_tags_where_they_are(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delattr("mlflow.tracing.trace_manager.InMemoryTraceManager")
    with internals.in_memory_trace("tr-0") as trace:
        assert trace is None
    assert_one_warning(caplog, "InMemoryTraceManager")


def test_a_span_without_its_otel_span_keeps_its_name(caplog: pytest.LogCaptureFixture) -> None:
    assert internals.rename_span(SimpleNamespace(), "GET /x") is False
    assert_one_warning(caplog, "_span.update_name")


def test_a_moved_tracking_service_client_raises_for_the_caller_to_report(monkeypatch: pytest.MonkeyPatch) -> None:
    """The experiment lookup cannot fall back: tracing turns itself off naming the API change
    (tests/test_export_path.py checks the message the service logs)."""
    monkeypatch.delattr("mlflow.tracking._tracking_service.client.TrackingServiceClient")
    with pytest.raises(ImportError):
        internals.tracking_service_client("http://127.0.0.1:1")


def test_an_exporter_without_a_task_queue_is_not_counted(caplog: pytest.LogCaptureFixture) -> None:
    assert internals.export_queue(SimpleNamespace()) is None
    assert internals.exporter_client(SimpleNamespace()) is None
    assert internals.otlp_drop_metrics(SimpleNamespace()) is None
    assert install_fast_trace_info_client(SimpleNamespace()) is None  # MLflow's client stays
    losses = ExportLosses()
    losses.watch()  # whatever exporter MLflow has now, this one counts only what it can hook
    assert api_changes(caplog) == []


def test_export_tasks_are_decoded_or_left_alone() -> None:
    def _log_trace(trace: Any) -> None: ...
    def _log_spans(location: str, spans: list[Any], workspace: Any = None) -> None: ...
    def other() -> None: ...

    trace = SimpleNamespace(info=SimpleNamespace(trace_id="tr-1"), data=SimpleNamespace(spans=[]))
    assert internals.decode_task(SimpleNamespace(handler=_log_trace, args=(trace,))) == internals.ExportTask(
        trace=trace
    )
    decoded = internals.decode_task(SimpleNamespace(handler=_log_spans, args=("7", ("a", "b"), None)))
    assert decoded == internals.ExportTask(location="7", spans=["a", "b"])
    assert internals.decode_task(SimpleNamespace(handler=other, args=())) is None
    assert internals.decode_task(object()) is None
    task = SimpleNamespace(handler=_log_spans, args=("7", []))
    internals.wrap_task_handler(task, lambda handler: lambda *a: handler(*a))
    internals.wrap_task_handler(task, lambda handler: pytest.fail("wrapped twice"))
    assert task.handler.__name__ == "_log_spans" and internals.decode_task(task) is not None


def test_the_full_queue_hook_leaves_an_unknown_queue_alone() -> None:
    """MLflow's queue is a plain `queue.Queue`; anything else (another exporter) is not swapped."""
    exporter = SimpleNamespace(_async_queue=SimpleNamespace(_queue=queue.LifoQueue()))
    assert type(internals.export_queue(exporter)) is queue.LifoQueue


def test_missing_request_building_internals_keep_mlflows_client(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import mlflow.protos.service_pb2 as service_pb2

    monkeypatch.delattr(service_pb2, "StartTraceV3")
    try:
        importlib.reload(internals)
        assert internals.start_trace_helpers_available() is False
        assert internals.start_trace_helpers_available() is False
        assert_one_warning(caplog, "StartTraceV3")
    finally:
        monkeypatch.undo()
        importlib.reload(internals)
    assert internals.start_trace_helpers_available() is True


def test_another_major_version_touches_nothing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(internals, "VERSION_SUPPORTED", False)
    assert internals.trace_exporter() is None
    assert internals.export_queue(SimpleNamespace(_async_queue=SimpleNamespace(_queue=queue.Queue()))) is None
    assert internals.start_trace_helpers_available() is False
    with pytest.raises(ImportError):
        internals.tracking_service_client("http://127.0.0.1:1")
    assert any("major version not verified" in w for w in api_changes(caplog))


@pytest.mark.parametrize(
    ("version", "supported"),
    [("3.12.0", True), ("3.17.2", True), ("3.30.1rc0", True), ("3.11.4", False), ("4.0.0", False), ("2.22.0", False)],
)
def test_the_version_gate(version: str, supported: bool) -> None:
    low, high = internals.VERIFIED
    release = internals._release
    assert (release(low) <= release(version) < (release(high)[0] + 1,)) is supported


# --- no private touch-point outside the adapter -------------------------------------------------------

# Private attributes of MLflow and OpenTelemetry objects the package reads or writes.
PRIVATE_ATTRIBUTES = {
    "_span",
    "_client",
    "_async_queue",
    "_queue",
    "_metrics",
    "_batch_processor",
    "_store_supports_log_spans",
}
# MLflow modules whose names are internal though their path has no underscore.
INTERNAL_MODULES = (
    "mlflow.tracing.provider",
    "mlflow.tracing.trace_manager",
    "mlflow.tracing.utils",
    "mlflow.tracing.export",
    "mlflow.utils",
    "mlflow.tracking.request_header",
    "mlflow.protos",
)


def private_touches(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("mlflow", "opentelemetry"):
            module = node.module or ""
            if "._" in module or module.startswith(INTERNAL_MODULES) or any(a.name.startswith("_") for a in node.names):
                found.append(f"{path.name}:{node.lineno} from {module} import ...")
        elif isinstance(node, ast.Attribute) and node.attr in PRIVATE_ATTRIBUTES:
            found.append(f"{path.name}:{node.lineno} .{node.attr}")
        elif isinstance(node, ast.Subscript) and ast.unparse(node.value) == "sys.modules":
            found.append(f"{path.name}:{node.lineno} sys.modules[...]")
    return found


def test_the_checker_finds_a_private_touch() -> None:
    assert private_touches(PACKAGE / "_mlflow" / "internals.py")


def test_only_the_adapter_touches_mlflow_internals() -> None:
    adapter = PACKAGE / "_mlflow" / "internals.py"
    touches = [t for path in sorted(PACKAGE.rglob("*.py")) if path != adapter for t in private_touches(path)]
    assert touches == []
