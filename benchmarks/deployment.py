"""Load on a deployment like production's: MLflow's server on PostgreSQL with several workers, the app under
uvicorn with several workers sharing one outbox, a tracking-server outage and an app restart under load.

    make bench-deployment BENCH_ARGS="--seconds 60 --connections 8 --outage 30"

Each client loops: ask (POST /chat), then vote on the answer (POST /feedback) over a fresh connection, so
votes reach either worker. Mid-run the tracking server is killed for `--outage` seconds (0: no outage);
after the load the app is restarted (SIGTERM; `--no-restart` to skip) and left to drain its outbox, its
trace spool and MLflow's export queue. Prints, and writes as JSON: traces stored / served (and stored with
their metadata), feedback stored / accepted, duplicates, what the middleware counted as lost, the rate the
tracking server stored traces at (counted in PostgreSQL, not through the server), and the `trace_info_pk`
duplicate-key errors in PostgreSQL's log.

Ingestion per export mode (no outage, more clients than the server can keep up with):

    make bench-deployment BENCH_ARGS="--seconds 60 --connections 32 --outage 0 --no-restart --export otlp"

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

from mlflow_feedback_middleware.delivery.writer import FEEDBACK_ID_KEY  # noqa: E402
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
                # With the answer's signed token, as a browser would: the rate limit is then per answer.
                token = {"X-MLflow-Feedback-Token": answer.headers.get("x-mlflow-feedback-token", "")}
                url = f"{app.url}/feedback?trace_id={trace_id}"
                vote = httpx.post(url, json={"is_correct": True}, headers=token, timeout=60)
                if vote.status_code in (200, 202):
                    accepted.append((trace_id, vote.json()["feedback_id"]))
            except httpx.HTTPError:
                time.sleep(0.1)  # the app is restarting


def _stored(server: MlflowServer, experiment: str) -> tuple[set[str], Counter[str]]:
    """Trace IDs in the experiment, and how many assessments each feedback ID wrote."""
    from mlflow.tracing.client import TracingClient

    from mlflow_feedback_middleware._mlflow.tracing import find_experiment

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


class StoreWatch:
    """Samples the traces the experiment has in PostgreSQL (and those with their client request ID, which
    only the trace-info write sets) every `every` seconds, without loading the tracking server."""

    def __init__(self, postgres: PostgresCluster, experiment: str, every: float = 2.0) -> None:
        self._postgres, self._experiment, self._every = postgres, experiment, every
        self.samples: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.started = time.monotonic()

    def counts(self) -> tuple[int, int]:
        try:
            rows = self._postgres.query(
                "SELECT count(*), count(t.client_request_id) FROM trace_info t JOIN experiments e"
                f" ON t.experiment_id = e.experiment_id WHERE e.name = '{self._experiment}'"
            )
            return int(rows[0][0]), int(rows[0][1])
        except Exception:
            return (self.samples[-1][1], self.samples[-1][2]) if self.samples else (0, 0)

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            self.samples.append((time.monotonic() - self.started, *self.counts()))

    def start(self) -> StoreWatch:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def settled(self, quiet: float) -> bool:
        """No new trace stored for `quiet` seconds."""
        if not self.samples:
            return False
        last = self.samples[-1][1]
        changed = max((t for t, stored, _ in self.samples if stored != last), default=0.0)
        return self.samples[-1][0] - changed >= quiet and self.samples[-1][0] >= quiet

    def landed(self) -> float:
        """Seconds from the start until the last trace landed."""
        final = self.samples[-1][1] if self.samples else 0
        return min((t for t, stored, _ in self.samples if stored == final), default=0.0)

    def rate(self) -> float:
        """Traces stored per second, from the start until the last trace landed."""
        landed = self.landed()
        return self.samples[-1][1] / landed if landed else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60, help="load duration")
    parser.add_argument("--connections", type=int, default=8, help="concurrent clients")
    parser.add_argument("--outage", type=float, default=30, help="seconds the server is down mid-run (0: none)")
    parser.add_argument("--no-restart", action="store_true", help="do not restart the app after the load")
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
        env = {"MLFLOW_TRACKING_URI": server.url, "MLFLOW_FEEDBACK_SECRET": "bench-deployment-secret-0123456789"}
        app = AppProcess(work, env, kwargs, workers=args.app_workers).__enter__()
        stop = threading.Event()
        watch = StoreWatch(postgres, experiment).start()
        with ThreadPoolExecutor(args.connections) as pool:
            for _ in range(args.connections):
                pool.submit(_client_loop, app, stop, served, accepted)
            if args.outage > 0:
                time.sleep(max(args.seconds - args.outage, 0) / 2)
                print(f"killing the tracking server for {args.outage:g} s", flush=True)
                server.stop(signal.SIGKILL)
                time.sleep(args.outage)
                server.start(timeout=300)
                time.sleep(max(args.seconds - args.outage, 0) / 2)
            else:
                time.sleep(args.seconds)
            if not args.no_restart:
                print("restarting the app (SIGTERM)", flush=True)
                app.__exit__(None, None, None)
                app = AppProcess(work, env, kwargs, workers=args.app_workers).__enter__()
            stop.set()
        load_ended = time.monotonic() - watch.started
        health: dict[str, Any] = {}

        def drained() -> bool:
            nonlocal health
            health = httpx.get(f"{app.url}/feedback/health", timeout=30).json()
            spool = health.get("trace_spool") or {}
            idle = health["outbox"]["pending"] == 0 and spool.get("pending_parts", 0) == 0
            return bool(idle and watch.settled(20.0))

        wait_until(drained, 1800, "the outbox, the spool and MLflow's export queue drained")
        watch.stop()
        app.__exit__(None, None, None)
        traces, written = _stored(server, experiment)
        with_metadata = watch.counts()[1]
        duplicate_keys = postgres.log_count('violates unique constraint "trace_info_pk"')
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
        "served_per_second": round(len(served) / args.seconds, 1),
        "traces_stored": len(set(served) & traces),
        "traces_stored_with_metadata": with_metadata,
        "stored_per_second": round(watch.rate(), 1),
        "last_trace_stored_seconds_after_load": round(max(watch.landed() - load_ended, 0.0), 1),
        "trace_info_pk_duplicate_key_errors": duplicate_keys,
        "feedback_accepted": len(accepted),
        "feedback_stored": sum(1 for _, feedback_id in accepted if written[feedback_id]),
        "feedback_duplicates": sum(max(written[feedback_id] - 1, 0) for _, feedback_id in accepted),
        "last_health": {
            k: health.get(k)
            for k in (
                "traces_dropped",
                "span_batches_dropped",
                "export_failures",
                "otlp_spans_dropped",
                "export_queue_overflow_spooled",
                "trace_spool",
            )
        },
    }
    print(json.dumps(result, indent=2))
    Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
