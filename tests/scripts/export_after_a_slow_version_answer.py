"""Traces sent to a tracking server whose /version answers came too late for MLflow's client (experiment in
argv[1], the server's URL in MLFLOW_TRACKING_URI): where their spans went.

Run by the tests in a fresh process (`tests.support.run_script`); prints one JSON line once the trace spool
is empty (a batch MLflow's client could not send went there and was replayed)."""

import asyncio
import json
import sys

import httpx
from mlflow.tracing.provider import _get_trace_exporter

from mlflow_feedback_middleware._mlflow.export import flush_exports
from mlflow_feedback_middleware._mlflow.export_losses import export_losses
from mlflow_feedback_middleware._mlflow.trace_spool import current_spool
from tests.apps import build_app
from tests.support import wait_until


async def main():
    app = build_app(experiment_name=sys.argv[1])
    ids = []
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        for i in range(3):
            response = await client.post("/chat", json={"message": f"m{i}"})
            ids.append(response.headers["x-mlflow-trace-id"])
            flush_exports(60)
        spool = current_spool()
        # The delivery thread replays the spool while the app runs.
        await asyncio.to_thread(wait_until, lambda: spool.pending() == 0, 120, "the trace spool empty")
    print(
        json.dumps(
            {
                "trace_ids": ids,
                "logs_spans": _get_trace_exporter()._store_supports_log_spans,
                "failures": export_losses.snapshot()["export_failures"],
            }
        )
    )


asyncio.run(main())
