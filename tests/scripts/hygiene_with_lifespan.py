"""A lifespan under real uvicorn: MLflow ready before the first request; threads and sockets released after.

Run by the tests in a fresh process; prints one JSON line."""

import json
import threading
import time
import uuid

import httpx
from mlflow.tracing.provider import _get_trace_exporter, provider

from tests.apps import build_app
from tests.support import UvicornThread, wait_until

app = build_app(experiment_name="hygiene-" + uuid.uuid4().hex[:8])
report = {}
with UvicornThread(app) as server:
    # After lifespan start-up, before any request: MLflow's tracer and exporter are built and tuned.
    report["tracer_ready_before_first_request"] = provider.once._done
    exporter = _get_trace_exporter()
    report["fast_client_before_first_request"] = type(getattr(exporter, "_client", None)).__name__
    with httpx.Client(base_url=server.url) as client:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            assert "x-mlflow-trace-id" in client.post("/chat", json={"message": "x"}).headers
            times.append(time.perf_counter() - start)
    report["first_over_second"] = times[0] / times[1]
fast = getattr(_get_trace_exporter(), "_client", None)
wait_until(lambda: not [t for t in threading.enumerate() if t.name.startswith("mlflow-feedback")], 30, "threads end")
report["open_connections"] = sum(c.sock is not None for c in getattr(fast, "_connections", []))
print(json.dumps(report))
