"""Apps torn down without a lifespan, run with -W error::ResourceWarning: no socket or thread is left behind.

Run by the tests in a fresh process; prints one JSON line."""

import asyncio
import gc
import uuid

import httpx

from mlflow_feedback_middleware._mlflow.export import flush_exports
from tests.apps import build_app


async def main():
    for _ in range(3):  # a test suite builds many apps
        app = build_app(experiment_name="hygiene-" + uuid.uuid4().hex[:8])
        transport = httpx.ASGITransport(app=app)  # no lifespan, as in most test suites
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            for _ in range(5):
                assert "x-mlflow-trace-id" in (await client.post("/chat", json={"message": "x"})).headers
    flush_exports(30)  # the fast client's kept-alive connections have been used by now


asyncio.run(main())
gc.collect()
print("{}")
