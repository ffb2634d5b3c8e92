"""Traces sent to a tracking server whose first /version answer came too late for MLflow's client (experiment
in argv[1], the server's URL in MLFLOW_TRACKING_URI): where their spans went.

Run by the tests in a fresh process (`tests.support.run_script`); prints one JSON line."""

import asyncio
import json
import sys

import httpx
from mlflow.tracing.provider import _get_trace_exporter

from mlflow_feedback_middleware._mlflow.export import flush_exports
from tests.apps import build_app


async def main():
    app = build_app(experiment_name=sys.argv[1])
    ids = []
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        for i in range(3):
            response = await client.post("/chat", json={"message": f"m{i}"})
            ids.append(response.headers["x-mlflow-trace-id"])
            flush_exports(60)
    print(json.dumps({"trace_ids": ids, "logs_spans": _get_trace_exporter()._store_supports_log_spans}))


asyncio.run(main())
