"""MLflow's TrackingServiceClient deleted: tracing turns off naming the API change (experiment in argv[1]).

Run by the tests in a fresh process (`tests.support.run_script`); prints one JSON line."""

# ruff: noqa: E402 - the internal is deleted before the package imports it

import asyncio
import json
import logging
import sys

import httpx
import mlflow.tracking._tracking_service.client as service

del service.TrackingServiceClient  # as if MLflow had moved the client that finds experiments
from tests.apps import build_app
from tests.support import middleware_log

errors = middleware_log(logging.WARNING)


async def main():
    app = build_app(experiment_name=sys.argv[1])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        answer = await client.post("/chat", json={"message": "hi"})
    print(
        json.dumps(
            {
                "status": answer.status_code,
                "traced": "x-mlflow-trace-id" in answer.headers,
                "errors": [e.getMessage() for e in errors],
            }
        )
    )


asyncio.run(main())
