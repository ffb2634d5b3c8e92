"""An app run without a lifespan exits: nothing held is lost (experiment in argv[1]).

Run by the tests in a fresh process (`tests.support.run_script`); prints one JSON line."""

import asyncio
import json
import sys

import httpx

from tests.apps import build_app


async def main():
    app = build_app(experiment_name=sys.argv[1], feedback_sync_seconds=0)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        trace_id = (await client.post("/chat", json={"message": "hi"})).headers["x-mlflow-trace-id"]
        fb = await client.post(f"/feedback?trace_id={trace_id}", json={"is_correct": True})
    print(json.dumps({"trace_id": trace_id, "status": fb.status_code, "feedback_id": fb.json()["feedback_id"]}))


asyncio.run(main())  # then the interpreter exits: no lifespan ran, the atexit hook has to deliver
