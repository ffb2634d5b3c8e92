"""export='otlp' end to end against the tracking server in argv[1].

Run by the tests in a fresh process (`tests.support.run_script`); prints one JSON line."""

import asyncio
import json
import sys

import httpx

from tests.apps import build_app
from tests.support import get_trace, root_span


async def main():
    app = build_app(tracking_uri=sys.argv[1], experiment_name="otlp-export", export="otlp", feedback_sync_seconds=30)
    out = {}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        r = await client.post("/chat?x=1", json={"message": "hi"}, headers={"X-User-ID": "u1", "X-Session-ID": "s1"})
        request_id = r.headers["x-request-id"]  # drawn by the service: it may name the answer to vote on
        out["request_id"] = request_id
        s = await client.post("/chat/stream", json={"message": "a b"})
        fb = await client.post(f"/feedback?client_request_id={request_id}", json={"is_correct": True, "comment": "ok"})
        out["feedback"] = [fb.status_code, fb.json()]
        out["stream_tail"] = s.text.strip().splitlines()[-1]
        tagged = await client.post("/chat-tagged", json={"message": "hi"})
    trace = get_trace(r.headers["x-mlflow-trace-id"], finalized=False)
    # A fresh middleware (another worker) finds the client request ID by its tag.
    other = build_app(tracking_uri=sys.argv[1], experiment_name="otlp-export", export="otlp", feedback_sync_seconds=30)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=other), base_url="http://t") as client:
        fb = await client.post(f"/feedback?client_request_id={request_id}", json={"ratings": {"accuracy": 5}})
        out["other_feedback"] = [fb.status_code, fb.json()]
    trace = get_trace(r.headers["x-mlflow-trace-id"], finalized=False)
    root = root_span(trace)
    out["trace"] = {
        "name": trace.info.tags.get("mlflow.traceName"),
        "tag_request_id": trace.info.tags.get("mlflow_feedback.client_request_id"),
        "metadata": {k: v for k, v in trace.info.trace_metadata.items() if k.startswith("mlflow.trace.")},
        "state": trace.info.state.value,
        "inputs": root.inputs,
        "status": root.outputs["status_code"],
        "spans": sorted(span.name for span in trace.data.spans),
        "assessments": [(a.name, a.value, a.source.source_id, a.rationale) for a in trace.info.assessments],
    }
    out["trace_id"] = r.headers["x-mlflow-trace-id"]
    out["tagged"] = get_trace(tagged.headers["x-mlflow-trace-id"], finalized=False).info.tags.get("app.topic")
    out["otlp_env"] = {k: v for k, v in __import__("os").environ.items() if k.startswith("OTEL_EXPORTER")}
    print(json.dumps(out))


asyncio.run(main())
