"""Spans dropped from MLflow's full export queue: the trace info must not claim them (experiment in argv[1]).

Run by the tests in a fresh process (`tests.support.run_script`); prints one JSON line."""

import asyncio
import json
import queue
import sys

import httpx
import mlflow

from mlflow_feedback_middleware._mlflow.export import flush_exports
from mlflow_feedback_middleware._mlflow.export_losses import export_losses
from mlflow_feedback_middleware._mlflow.trace_spool import configure_spool
from tests.apps import build_app


async def main():
    spool = configure_spool(None, max_bytes=1)  # a full spool: what MLflow's full queue refuses is dropped
    app = build_app(experiment_name=sys.argv[1])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        await client.post("/chat", json={"message": "warm-up"})  # MLflow builds its exporter; hooks go in
        flush_exports(30)
        # MLflow's queue refuses span batches, as when it is full; trace infos still go through.
        put = queue.Queue.put

        def full_for_spans(self, item, *args, **kwargs):
            if getattr(getattr(item, "handler", None), "__name__", "") == "_log_spans":
                raise queue.Full
            return put(self, item, *args, **kwargs)

        queue.Queue.put = full_for_spans
        response = await client.post("/chat", json={"message": "spans lost"})
        flush_exports(30)
        queue.Queue.put = put
        spool.flush_deferred(30)  # the spool's writer has refused the batch: it is counted
    trace_id = response.headers["x-mlflow-trace-id"]
    trace = mlflow.get_trace(trace_id)
    print(
        json.dumps(
            {
                "dropped": export_losses.span_batches_dropped,
                "remembered": export_losses.spans_dropped(trace_id),
                "spans": sorted(s.name for s in trace.data.spans) if trace else None,
            }
        )
    )


asyncio.run(main())
