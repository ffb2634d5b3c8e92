"""Five requests and one vote against the app built with the JSON kwargs in argv[1]; responses and logs.

Run by the tests in a fresh process (`tests.support.run_script`); prints one JSON line."""

import asyncio
import json
import sys

import httpx

from tests.apps import build_app
from tests.support import middleware_log, middleware_of

kept = middleware_log()


async def main():
    app = build_app(**json.loads(sys.argv[1]))
    transport = httpx.ASGITransport(app=app)
    out = []
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        for _ in range(5):
            r = await client.post("/chat", json={"message": "hi"})
            out.append({"status": r.status_code, "headers": dict(r.headers), "body": r.json()})
        fb = await client.post("/feedback?trace_id=tr-0123456789abcdef0123456789abcdef", json={"is_correct": True})
        out.append({"status": fb.status_code, "body": fb.json()})
    waits = middleware_of(app).backend.startup_waits
    print(json.dumps({"responses": out, "logs": [(r.levelname, r.getMessage()) for r in kept], "waits": waits}))


asyncio.run(main())
