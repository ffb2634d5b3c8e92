"""export="otlp": MLflow's batched OTLP exporter, checked for the same stored facts as the default path.

Runs in its own process: the switch sets OpenTelemetry's process-wide environment variables.
"""

from __future__ import annotations

from .support import MlflowServer, run_script

SCRIPT = "otlp_export"  # tests/scripts/otlp_export.py


def test_otlp_export_keeps_what_feedback_and_reports_need(mlflow_server: MlflowServer) -> None:
    out = run_script(SCRIPT, [mlflow_server.url], {}, timeout=180)
    assert out["otlp_env"]["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] == f"{mlflow_server.url}/v1/traces"
    trace = out["trace"]
    assert trace["name"] == "POST /chat"
    assert trace["tag_request_id"] == out["request_id"]
    assert trace["metadata"]["mlflow.trace.user"] == "u1"
    assert trace["metadata"]["mlflow.trace.session"] == "s1"
    assert trace["state"] == "OK"
    assert trace["inputs"] == {"method": "POST", "path": "/chat", "query": {"x": "1"}, "body": {"message": "hi"}}
    assert trace["status"] == 200
    assert trace["spans"] == ["POST /chat", "fake_llm_async"]
    assert out["feedback"][0] == 200 and out["feedback"][1]["trace_id"] == out["trace_id"]
    assert out["other_feedback"][0] == 200 and out["other_feedback"][1]["trace_id"] == out["trace_id"]
    assert sorted(trace["assessments"]) == [
        ["user_accuracy", 1.0, "anonymous", None],
        ["user_feedback", True, "anonymous", "ok"],
    ]
    assert out["tagged"] == "billing"  # a handler's own trace tags survive OTLP export
    assert out["stream_tail"].startswith('data: {"type":"done"')
