"""A burst past MLflow's export queue: what the trace spool keeps (experiment, spool budget in argv).

Run by the tests in a fresh process (`tests.support.run_script`); prints one JSON line."""

import asyncio
import json
import sys
import time

import httpx
import mlflow

from mlflow_feedback_middleware._mlflow.export import flush_exports
from mlflow_feedback_middleware._mlflow.trace_spool import configure_spool
from tests.apps import build_app


async def main():
    if int(sys.argv[2]):
        configure_spool(None, max_bytes=int(sys.argv[2]))  # a tiny spool, in memory
    app = build_app(experiment_name=sys.argv[1])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        ids = [(await client.post("/chat", json={"message": str(i)})).headers["x-mlflow-trace-id"] for i in range(150)]
        flush_exports(60)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the delivery thread replays the spool at the server's pace
            health = (await client.get("/feedback/health")).json()
            if health["trace_spool"]["pending_parts"] == 0:
                break
            await asyncio.sleep(0.2)
    stored = mlflow.search_traces(
        locations=[health["experiment_id"]],
        max_results=1000,
        return_type="list",
        include_spans=False,
        filter_string="trace.status = 'OK'",
    )
    # A stored trace is usable only with its spans (from the tracking store, or the artifact fallback).
    unreadable = [t.info.trace_id for t in stored if not getattr(mlflow.get_trace(t.info.trace_id), "data", None)]
    with_metadata = sum(t.info.client_request_id is not None for t in stored)
    print(
        json.dumps(
            {
                "issued": len(set(ids)),
                "stored_ok": len(stored),
                "with_metadata": with_metadata,
                "unreadable": unreadable,
                "health": health,
            }
        )
    )


asyncio.run(main())
