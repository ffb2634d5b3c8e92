"""Load on a deployment like production's: MLflow's server on PostgreSQL with several workers, the app under
uvicorn with several workers sharing one outbox, a tracking-server outage and an app restart under load.

    make bench-deployment BENCH_ARGS="--seconds 60 --connections 8 --outage 30"

Each client loops: ask (POST /chat), then vote on the answer (POST /feedback) over a fresh connection, so
votes reach either worker. Mid-run the tracking server is killed for `--outage` seconds; after the load the
app is restarted (SIGTERM) and left to drain its outbox and trace spool. Prints, and writes as JSON:
traces stored / served, feedback stored / accepted, duplicates, and what the middleware counted as lost.
Only traffic to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mlflow_feedback_middleware.feedback_writer import FEEDBACK_ID_KEY  # noqa: E402
from tests.support import AppProcess, MlflowServer, PostgresCluster, wait_until  # noqa: E402


def _client_loop(app: AppProcess, stop: threading.Event, served: list[str], accepted: list[tuple[str, str]]) -> None:
    with httpx.Client(timeout=60) as answers:
        while not stop.is_set():
            try:
                answer = answers.post(f"{app.url}/chat", json={"message": "how are you?"})
                trace_id = answer.headers.get("x-mlflow-trace-id")
                if trace_id is None:
                    continue  # served untraced (the experiment not resolved yet): nothing to vote on
                served.append(trace_id)
                vote = httpx.post(f"{app.url}/feedback?trace_id={trace_id}", json={"is_correct": True}, timeout=60)
                if vote.status_code in (200, 202):
                    accepted.append((trace_id, vote.json()["feedback_id"]))
            except httpx.HTTPError:
                time.sleep(0.1)  # the app is restarting


def _stored(server: MlflowServer, experiment: str) -> tuple[set[str], Counter[str]]:
    """Trace IDs in the experiment, and how many assessments each feedback ID wrote."""
    from mlflow.tracing.client import TracingClient

    from mlflow_feedback_middleware.tracing import find_experiment

    experiment_id = find_experiment(server.url, experiment, None, create=False)
    client, traces, written = TracingClient(tracking_uri=server.url), set(), Counter[str]()
    token = None
    while True:
        page = client.search_traces(locations=[experiment_id], max_results=500, page_token=token, include_spans=False)
        for trace in page:
            traces.add(trace.info.trace_id)
            for assessment in trace.info.assessments:
                feedback_id = (assessment.metadata or {}).get(FEEDBACK_ID_KEY, "").split("/")[0]
                if feedback_id:
                    written[feedback_id] += 1
        token = page.token
        if not token:
            return traces, written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60, help="load duration")
    parser.add_argument("--connections", type=int, default=8, help="concurrent clients")
    parser.add_argument("--outage", type=float, default=30, help="seconds the tracking server is down mid-run")
    parser.add_argument("--server-workers", type=int, default=4)
    parser.add_argument("--app-workers", type=int, default=2)
    parser.add_argument("--export", default="mlflow", choices=["mlflow", "otlp"])
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "deployment-results.json"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-deployment-"))
    (work / "server").mkdir()
    postgres = PostgresCluster().start()
    server = MlflowServer(work / "server", backend_store_uri=postgres.uri, workers=args.server_workers)
    experiment = f"bench-deployment-{int(time.time())}"
    kwargs = {"experiment_name": experiment, "outbox_path": str(work / "outbox.db"), "export": args.export}
    served: list[str] = []
    accepted: list[tuple[str, str]] = []
    try:
        server.start(timeout=300)
        env = {"MLFLOW_TRACKING_URI": server.url}
        app = AppProcess(work, env, kwargs, workers=args.app_workers).__enter__()
        stop = threading.Event()
        with ThreadPoolExecutor(args.connections) as pool:
            for _ in range(args.connections):
                pool.submit(_client_loop, app, stop, served, accepted)
            time.sleep(max(args.seconds - args.outage, 0) / 2)
            print(f"killing the tracking server for {args.outage:g} s", flush=True)
            server.stop(signal.SIGKILL)
            time.sleep(args.outage)
            server.start(timeout=300)
            time.sleep(max(args.seconds - args.outage, 0) / 2)
            print("restarting the app (SIGTERM)", flush=True)
            app.__exit__(None, None, None)
            app = AppProcess(work, env, kwargs, workers=args.app_workers).__enter__()
            stop.set()
        health: dict[str, Any] = {}

        def drained() -> bool:
            nonlocal health
            health = httpx.get(f"{app.url}/feedback/health", timeout=30).json()
            spool = health.get("trace_spool") or {}
            return bool(health["outbox"]["pending"] == 0 and spool.get("pending_parts", 0) == 0)

        wait_until(drained, 900, "the outbox and the spool drained")
        app.__exit__(None, None, None)
        traces, written = _stored(server, experiment)
    finally:
        server.stop()
        postgres.stop()
    result = {
        "seconds": args.seconds,
        "connections": args.connections,
        "outage_seconds": args.outage,
        "server_workers": args.server_workers,
        "app_workers": args.app_workers,
        "export": args.export,
        "traces_served": len(served),
        "traces_stored": len(set(served) & traces),
        "feedback_accepted": len(accepted),
        "feedback_stored": sum(1 for _, feedback_id in accepted if written[feedback_id]),
        "feedback_duplicates": sum(max(written[feedback_id] - 1, 0) for _, feedback_id in accepted),
        "last_health": {k: health.get(k) for k in ("traces_dropped", "export_failures", "trace_spool")},
    }
    print(json.dumps(result, indent=2))
    Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
