"""An internal the fast trace-info client mirrors deleted: MLflow's client sends, one warning (experiment in argv[1]).

Run by the tests in a fresh process (`tests.support.run_script`); prints one JSON line."""

# ruff: noqa: E402 - the internal is deleted before the package imports it

import asyncio
import json
import logging
import sys

import httpx
import mlflow
import mlflow.protos.service_pb2
import mlflow.store.tracking.rest_store  # MLflow's client has its own reference

del mlflow.protos.service_pb2.StartTraceV3  # as if MLflow had moved an internal the fast client mirrors
from mlflow.tracing.provider import _get_trace_exporter

from mlflow_feedback_middleware._mlflow.export import flush_exports
from tests.apps import build_app
from tests.support import get_trace, middleware_log

warnings = middleware_log(logging.WARNING)


async def main():
    app = build_app(experiment_name=sys.argv[1])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        responses = [await client.post("/chat", json={"message": f"m{i}"}) for i in range(2)]
    flush_exports(30)
    stored = [
        get_trace(r.headers["x-mlflow-trace-id"]).info.client_request_id == r.headers["x-request-id"] for r in responses
    ]
    print(
        json.dumps(
            {
                "client": type(_get_trace_exporter()._client).__name__,
                "stored": stored,
                "warnings": [w.getMessage() for w in warnings if "MLflow API changed" in w.getMessage()],
            }
        )
    )


asyncio.run(main())
