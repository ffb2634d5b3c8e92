"""Three traced requests against a basic-auth tracking server (URL in argv[1]); what the fast client did.

Run by the tests in a fresh process (`tests.support.run_script`); prints one JSON line."""

import asyncio
import json
import sys

import httpx
from mlflow.tracing.provider import _get_trace_exporter

from mlflow_feedback_middleware._mlflow.export import flush_exports
from mlflow_feedback_middleware._mlflow.export_losses import export_losses
from mlflow_feedback_middleware._mlflow.trace_spool import current_spool
from tests.apps import build_app
from tests.support import get_trace


async def main():
    # A loaded machine makes the basic-auth server slow: the first request waits for the experiment as long
    # as it takes (the default start-up wait is short), and so do the reads.
    app = build_app(tracking_uri=sys.argv[1], experiment_name="auth-export", startup_timeout_seconds=120)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        responses = [await client.post("/chat", json={"message": f"m{i}"}) for i in range(3)]
    flush_exports(120)
    fast = _get_trace_exporter()._client
    try:
        stored = [
            get_trace(r.headers["x-mlflow-trace-id"], timeout=120).info.client_request_id == r.headers["x-request-id"]
            for r in responses
        ]
    except AssertionError as exc:
        # What the export path did, so that a failure says where the spans went.
        spool = current_spool()
        state = {
            "logs_spans": getattr(_get_trace_exporter(), "_store_supports_log_spans", None),
            "fast": fast.fast_calls,
            "delegated": fast.delegated_calls,
            "losses": export_losses.snapshot(),
            "spool": spool.stats() if spool is not None else None,
        }
        raise AssertionError(f"{exc}; export state: {json.dumps(state)}") from None
    print(
        json.dumps(
            {
                "client": type(fast).__name__,
                "fast": fast.fast_calls,
                "delegated": fast.delegated_calls,
                "stored": stored,
            }
        )
    )


asyncio.run(main())
