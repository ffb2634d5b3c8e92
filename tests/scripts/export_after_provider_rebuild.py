"""set_experiment / set_tracking_uri mid-run: the hooks follow MLflow's rebuilt exporter (experiment in argv[1]).

Run by the tests in a fresh process (`tests.support.run_script`); prints one JSON line."""

import asyncio
import json
import queue
import sys

import httpx
import mlflow
from mlflow.tracing.provider import _get_trace_exporter

from mlflow_feedback_middleware._mlflow.export import flush_exports
from mlflow_feedback_middleware._mlflow.export_losses import export_losses
from mlflow_feedback_middleware._mlflow.trace_info_client import FastTraceInfoClient
from tests.apps import build_app


def hooked():
    exporter = _get_trace_exporter()
    client = exporter._client
    return {
        "fast": isinstance(client, FastTraceInfoClient),
        "fast_calls": getattr(client, "fast_calls", 0),
        "counting": type(exporter._async_queue._queue) is not queue.Queue,
        "id": id(exporter),
    }


async def main():
    app = build_app(experiment_name=sys.argv[1])
    rounds, ids = [], []
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        for rebuild in (
            None,
            lambda: mlflow.set_experiment(sys.argv[1] + "-handler"),
            lambda: mlflow.set_tracking_uri(mlflow.get_tracking_uri()),
        ):
            if rebuild is not None:
                rebuild()  # a handler or a library resetting MLflow's tracer provider mid-run
            response = await client.post("/chat", json={"message": "hi"})
            ids.append((response.headers["x-mlflow-trace-id"], response.headers["x-request-id"]))
            flush_exports(30)
            rounds.append(hooked())
    stored = [mlflow.get_trace(trace_id).info.client_request_id == request_id for trace_id, request_id in ids]
    print(json.dumps({"rounds": rounds, "stored": stored, "watching": export_losses.watching}))


asyncio.run(main())
