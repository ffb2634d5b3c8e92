"""One measurement of one variant, in a process of its own (MLflow's and OTel's tracers are process-wide).

Prints one JSON object. Run by `benchmarks/run.py`, not by hand.

``inproc``: drives the app with raw ASGI calls on one event loop, no network, so the numbers are the
app's and the tracer's own: request-path CPU (the event-loop thread), CPU including export (the whole
process, after the exporter has drained), and how many traces reached the tracking server.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import re
import sys
import time
from typing import Any

import mlflow

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.variants import OTEL_PROVIDERS, VARIANTS
from mlflow_feedback_middleware._mlflow.export import flush_exports

BODY = json.dumps({"message": "hello there"}).encode()


def scope_for(path: str, body: bytes = BODY, query: bytes = b"") -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }


async def call(app: Any, path: str, body: bytes = BODY, query: bytes = b"") -> tuple[int, bytes]:
    received = False
    status = 0
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal received
        if not received:
            received = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)  # no disconnect while the response is being sent
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope_for(path, body, query), receive, send)
    return status, b"".join(chunks)


def flush(variant: str) -> None:
    if variant == "otel":
        for provider in OTEL_PROVIDERS:
            provider.force_flush()
    elif variant != "bare":
        flush_exports(60)


def count_traces(experiment_id: str) -> int:
    from mlflow.tracing.client import TracingClient

    client = TracingClient()
    total, token = 0, None
    while True:
        page = client.search_traces(locations=[experiment_id], max_results=500, page_token=token, include_spans=False)
        total += len(page)
        token = page.token
        if not token:
            return total


def settled_count(experiment_id: str, before: int, interval: float, timeout: float) -> int:
    """Traces stored since `before`, once the count stops moving: the server may still be ingesting."""
    delivered, deadline = -1, time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(interval)
        now = count_traces(experiment_id) - before
        if now == delivered:
            break
        delivered = now
    return delivered


async def inproc(args: argparse.Namespace) -> dict[str, Any]:
    app = VARIANTS[args.variant](args.experiment_name, args.experiment_id, args.tracking_uri)
    path = "/chat" if args.kind == "json" else "/chat/stream"
    for _ in range(args.warmup):
        status, _body = await call(app, path)
        assert status == 200, status
    flush(args.variant)
    before = count_traces(args.experiment_id) if args.variant not in ("bare",) else 0
    thread0, process0 = time.thread_time(), time.process_time()
    for _ in range(args.n):
        await call(app, path)
    thread1 = time.thread_time()
    flush(args.variant)
    process1 = time.process_time()
    delivered = None if args.variant == "bare" else settled_count(args.experiment_id, before, 1.0, 120)
    return {
        "request_cpu_us": (thread1 - thread0) / args.n * 1e6,
        "total_cpu_us": (process1 - process0) / args.n * 1e6,
        "delivered": delivered,
        "served": args.n,
    }


_FEEDBACK_WARMUP = 5


async def feedback_burst(args: argparse.Namespace) -> dict[str, Any]:
    """Event-loop lag while `n` feedback posts are in flight at once, and their throughput."""
    app = VARIANTS[args.variant](args.experiment_name, args.experiment_id, args.tracking_uri)
    trace_ids = []
    for _ in range(args.n + _FEEDBACK_WARMUP):
        status, _ = await call(app, "/chat")
        assert status == 200
    # The trace IDs: the bench app's body has none, so read them from the store once exported.
    flush(args.variant)
    from mlflow.tracing.client import TracingClient

    token = None
    while True:
        page = TracingClient().search_traces(
            locations=[args.experiment_id], max_results=500, page_token=token, include_spans=False
        )
        trace_ids += [t.info.trace_id for t in page]
        token = page.token
        if not token:
            break
    lags: list[float] = []
    running = True

    async def ticker() -> None:
        while running:
            started = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append(time.perf_counter() - started - 0.001)

    feedback = json.dumps({"is_correct": True, "comment": "burst"}).encode()

    async def post(trace_id: str) -> int:
        status, _ = await call(app, "/feedback", feedback, f"trace_id={trace_id}".encode())
        return status

    # As in the other modes, the first calls (lazy imports, thread and pool start-up) are not measured.
    for trace_id in trace_ids[:_FEEDBACK_WARMUP]:
        await post(trace_id)
    trace_ids = trace_ids[_FEEDBACK_WARMUP:]
    if os.environ.get("BENCH_GC_FREEZE"):
        # What a service can do once after start-up: move every object alive now (MLflow's large module
        # graph included) out of the collector's reach, so later full collections scan far less.
        gc.collect()
        gc.freeze()

    # The ticker's lag counts everything that ran on the loop, including 500 tasks made ready at once by
    # the burst itself. asyncio's debug mode times each step of each task alone: the longest step is
    # the longest the library itself held the loop.
    steps: list[float] = []

    class SlowSteps(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            match = re.search(r"took ([\d.]+) seconds", record.getMessage())
            if match:
                steps.append(float(match.group(1)))
                # BENCH_SHOW_SLOW=1 names the slow steps: trivial timer callbacks among them mean the
                # loop thread was waiting for the GIL, not running slow code.
                if os.environ.get("BENCH_SHOW_SLOW") and float(match.group(1)) > 0.02:
                    print(record.getMessage()[:200], "...", record.getMessage()[-120:], file=sys.stderr)

    logging.getLogger("asyncio").addHandler(SlowSteps())
    loop = asyncio.get_running_loop()
    loop.set_debug(True)
    loop.slow_callback_duration = 0.001
    # Garbage-collector pauses stop every thread, the loop's too; timed apart, they are not the library's
    # steps (though its allocations add to what triggers them).
    gc_pauses: list[float] = []
    gc_started = [0.0]

    def time_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            gc_started[0] = time.perf_counter()
        else:
            gc_pauses.append(time.perf_counter() - gc_started[0])

    gc.callbacks.append(time_gc)
    tick = asyncio.create_task(ticker())
    started = time.perf_counter()
    statuses = await asyncio.gather(*(post(t) for t in trace_ids))
    elapsed = time.perf_counter() - started
    running = False
    await tick
    gc.callbacks.remove(time_gc)
    loop.set_debug(False)
    lags.sort()
    return {
        "posts": len(statuses),
        "ok": sum(s in (200, 202) for s in statuses),  # written, or durably queued
        "posts_per_s": len(statuses) / elapsed,
        "max_stall_ms": lags[-1] * 1000,
        "p99_stall_ms": lags[int(len(lags) * 0.99)] * 1000,
        "longest_step_ms": max(steps, default=0.0) * 1000,
        "steps_over_5ms": sum(step > 0.005 for step in steps),
        "longest_gc_ms": max(gc_pauses, default=0.0) * 1000,
        "gc_over_5ms": sum(pause > 0.005 for pause in gc_pauses),
    }


WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = '{"message": "hello there"}'
wrk.headers["Content-Type"] = "application/json"
"""


def saturation(args: argparse.Namespace) -> dict[str, Any]:
    """Throughput and latency under uvicorn on loopback, driven by wrk, and what reached the server."""
    import re
    import shutil
    import subprocess
    import tempfile
    import threading

    import uvicorn

    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("saturation needs wrk (Debian: apt-get install wrk)")
    app = VARIANTS[args.variant](args.experiment_name, args.experiment_id, args.tracking_uri)
    # Requests the server finished: wrk's own count misses those still in flight when it stops.
    finished = 0

    async def counting(scope: Any, receive: Any, send: Any) -> None:
        nonlocal finished
        await app(scope, receive, send)
        if scope["type"] == "http":
            finished += 1

    config = uvicorn.Config(counting, host="127.0.0.1", port=args.port, log_level="error", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    path = "/chat" if args.kind == "json" else "/chat/stream"
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT)
    url = f"http://127.0.0.1:{args.port}{path}"
    # Warm-up (also resolves the experiment), then the measured run.
    subprocess.run([wrk, "-t1", "-c4", "-d2s", "-s", script.name, url], capture_output=True, check=True)
    flush(args.variant)
    # wrk stops mid-request; let those last warm-up traces land before counting.
    before = settled_count(args.experiment_id, 0, 1.0, 60) if args.variant != "bare" else 0
    finished = 0
    out = subprocess.run(
        [wrk, "-t1", f"-c{args.connections}", f"-d{args.seconds}s", "--latency", "-s", script.name, url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    server.should_exit = True
    thread.join()
    served = finished
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)

    def percentile(p: str) -> float:
        match = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out)
        assert match, out
        scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[match.group(2)]
        return float(match.group(1)) * scale

    delivered = None
    if args.variant != "bare":
        flush(args.variant)
        delivered = settled_count(args.experiment_id, before, 2.0, 300)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "p50_ms": percentile("50"),
        "p99_ms": percentile("99"),
        "served": served,
        "errors": int(non_2xx.group(1)) if non_2xx else 0,
        "delivered": delivered,
    }


async def memory(args: argparse.Namespace) -> dict[str, Any]:
    """Resident memory after warm-up and after `n` more requests (JSON and SSE alternating)."""
    import resource

    app = VARIANTS[args.variant](args.experiment_name, args.experiment_id, args.tracking_uri)

    def rss_mb() -> float:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize() / 2**20

    async def run(count: int) -> None:
        for i in range(count):
            await call(app, "/chat" if i % 2 else "/chat/stream")

    await run(5000)
    flush(args.variant)
    warm = rss_mb()
    samples = []
    for _ in range(10):
        await run(args.n // 10)
        samples.append(rss_mb())
    flush(args.variant)
    return {"warm_mb": warm, "end_mb": rss_mb(), "max_mb": max(samples), "growth": rss_mb() / warm - 1}


def ttfb(args: argparse.Namespace) -> dict[str, Any]:
    """Time to the first body byte of a streamed answer, over a real socket, one request at a time."""
    import statistics
    import threading

    import httpx
    import uvicorn

    app = VARIANTS[args.variant](args.experiment_name, args.experiment_id, args.tracking_uri)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=args.port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    times = []
    with httpx.Client(base_url=f"http://127.0.0.1:{args.port}") as client:
        for i in range(args.n + 50):
            started = time.perf_counter()
            with client.stream("POST", "/chat/stream", content=BODY, headers={"content-type": "application/json"}) as r:
                chunks = r.iter_raw()
                next(chunks)
                first = time.perf_counter() - started
                for _ in chunks:  # drain the rest of the stream
                    pass
            if i >= 50:  # the first ones warm up (and resolve the experiment)
                times.append(first * 1000)
    server.should_exit = True
    thread.join()
    return {"ttfb_ms_median": statistics.median(times), "ttfb_ms_p90": sorted(times)[int(len(times) * 0.9)]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", required=True, choices=sorted(VARIANTS))
    parser.add_argument("--mode", default="inproc", choices=["inproc", "feedback", "saturation", "memory", "ttfb"])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--kind", default="json", choices=["json", "sse"])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--experiment-name", required=True)
    parser.add_argument("--experiment-id", required=True)
    args = parser.parse_args()
    mlflow.set_tracking_uri(args.tracking_uri)
    if args.mode in ("saturation", "ttfb"):
        result = saturation(args) if args.mode == "saturation" else ttfb(args)
    else:
        runner = {"inproc": inproc, "feedback": feedback_burst, "memory": memory}[args.mode]
        result = asyncio.run(runner(args))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
