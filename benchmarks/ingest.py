"""How many traces a PostgreSQL-backed MLflow tracking server stores per second, and what each costs it,
per export mode: the calls each of the middleware's export paths makes, sent straight to the server.

    make bench-ingest BENCH_ARGS="--traces 2000 --server-workers 1 2 4"

One real trace of the test app (a chat answer: root span plus the handler's spans, with the middleware's
metadata) is cloned under fresh trace IDs and sent by `--senders` threads, as:

- `mlflow`: what MLflow's exporter sends (the default, `export="mlflow"`): per trace, the spans
  (`log_spans`) and the trace info (`start_trace`) as two concurrent calls, as its export threads do;
- `mlflow-ordered`: the same calls, the trace info first and then the spans (no race between them);
- `otlp`: `export="otlp"`: only spans, the spans of `--otlp-batch` traces per OTLP request (the trace info is
  derived from the spans by the server: no client request ID, no trace-level metadata).

For each server worker count and mode it prints traces stored per second, and the CPU the tracking server
(all its workers) and PostgreSQL spent per trace, read from /proc: the figure to plan capacity with, since
the sender shares this machine's cores. It also counts the `trace_info_pk` duplicate-key errors in
PostgreSQL's log. Only traffic to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support import MlflowServer, PostgresCluster  # noqa: E402

MODES = ("mlflow", "mlflow-ordered", "otlp")
_CLOCK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(match: Any) -> float:
    """CPU seconds (user + system, reaped children included) of the live processes `match(stat_fields, uid)`
    selects."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            uid = entry.stat().st_uid
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        if match(fields, uid):
            total += sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
    return total / _CLOCK


def _sample_trace(server: MlflowServer, experiment: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One trace of the test app, served in-process with the middleware and read back whole."""
    import asyncio

    import mlflow
    from mlflow.tracing.client import TracingClient

    from mlflow_feedback_middleware._mlflow.export import flush_exports
    from tests.apps import build_app

    mlflow.set_tracking_uri(server.url)

    async def ask() -> str:
        app = build_app(experiment_name=experiment, feedback_path=None)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            response = await client.post("/chat", json={"message": "how do I plan capacity?"})
            return response.headers["x-mlflow-trace-id"]

    trace_id = asyncio.run(ask())
    flush_exports(60)
    client = TracingClient()
    deadline = time.monotonic() + 60
    while True:
        try:
            trace = client.get_trace(trace_id)
            if trace.data.spans:
                break
        except Exception:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.2)
    info = trace.info.to_dict()
    # As the exporter sends it: without what the server added when it stored the trace.
    info["tags"].pop("mlflow.artifactLocation", None)
    info["trace_metadata"].pop("mlflow.trace.infoFinalized", None)
    return info, [span.to_dict() for span in trace.data.spans]


class Clones:
    """Copies of one trace under fresh trace IDs: (trace info, spans) as MLflow entities."""

    def __init__(self, info: dict[str, Any], spans: list[dict[str, Any]]) -> None:
        self._hex = info["trace_id"].removeprefix("tr-")
        self._b64 = base64.b64encode(bytes.fromhex(self._hex)).decode()
        self._info = json.dumps(info)
        self._spans = json.dumps(spans)

    def make(self) -> tuple[Any, list[Any]]:
        from mlflow.entities import Span, TraceInfo

        new = os.urandom(16)
        new_hex, new_b64 = new.hex(), base64.b64encode(new).decode()
        info = TraceInfo.from_dict(json.loads(self._info.replace(self._hex, new_hex)))
        spans_text = self._spans.replace(self._hex, new_hex).replace(self._b64, new_b64)
        return info, [Span.from_dict(span) for span in json.loads(spans_text)]


def _send(mode: str, clones: Clones, experiment_id: str, traces: int, senders: int, otlp_batch: int) -> float:
    """Send `traces` clones in `mode`; seconds until the server answered the last call."""
    from mlflow.tracing.client import TracingClient

    client = TracingClient()
    made = [clones.make() for _ in range(traces)]
    for info, _ in made:
        info.trace_location.mlflow_experiment.experiment_id = experiment_id
    started = time.monotonic()
    with ThreadPoolExecutor(senders) as pool:
        if mode == "otlp":
            batches = [made[i : i + otlp_batch] for i in range(0, traces, otlp_batch)]
            calls = [pool.submit(client.log_spans, experiment_id, [s for _, ss in b for s in ss]) for b in batches]
        elif mode == "mlflow":
            calls = [pool.submit(client.log_spans, experiment_id, spans) for _, spans in made]
            calls += [pool.submit(client.start_trace, info) for info, _ in made]
        else:

            def ordered(info: Any, spans: list[Any]) -> None:
                client.start_trace(info)
                client.log_spans(experiment_id, spans)

            calls = [pool.submit(ordered, info, spans) for info, spans in made]
        for call in calls:
            call.result()
    return time.monotonic() - started


def _measure(
    mode: str, clones: Clones, experiment_id: str, server: MlflowServer, postgres: PostgresCluster, args: Any
) -> dict[str, Any]:
    """Send `args.traces` clones in `mode`; the rates, CPU per trace and duplicate-key errors it cost."""
    assert server.process is not None
    group, postgres_uid = server.process.pid, Path(postgres.workdir).stat().st_uid

    def server_cpu() -> float:
        return _cpu_seconds(lambda fields, uid: int(fields[2]) == group)  # the server's process group

    def postgres_cpu() -> float:
        return _cpu_seconds(lambda fields, uid: uid == postgres_uid)

    def duplicate_keys() -> int:
        return postgres.log_count('violates unique constraint "trace_info_pk"')

    def stored() -> int:
        return int(postgres.query(f"SELECT count(*) FROM trace_info WHERE experiment_id = {int(experiment_id)}")[0][0])

    _send(mode, clones, experiment_id, 50, args.senders, args.otlp_batch)  # warm the server's workers
    before = (server_cpu(), postgres_cpu(), duplicate_keys(), stored())
    seconds = _send(mode, clones, experiment_id, args.traces, args.senders, args.otlp_batch)
    return {
        "server_workers": server.workers,
        "mode": mode,
        "traces": args.traces,
        "stored": stored() - before[3],
        "stored_per_second": round(args.traces / seconds, 1),
        "server_cpu_ms_per_trace": round(1000 * (server_cpu() - before[0]) / args.traces, 2),
        "postgres_cpu_ms_per_trace": round(1000 * (postgres_cpu() - before[1]) / args.traces, 2),
        "trace_info_pk_errors": duplicate_keys() - before[2],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traces", type=int, default=2000, help="traces per mode and worker count")
    parser.add_argument("--server-workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--senders", type=int, default=8, help="concurrent calls (MLflow's exporter: 10 threads)")
    parser.add_argument("--otlp-batch", type=int, default=64, help="traces per OTLP request")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "ingest-results.json"))
    args = parser.parse_args()

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a refused call is a result, not a wait
    results: list[dict[str, Any]] = []
    postgres = PostgresCluster().start()
    try:
        for workers in args.server_workers:
            work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
            server = MlflowServer(work, backend_store_uri=postgres.uri, workers=workers)
            server.start(timeout=300)
            try:
                experiment = f"bench-ingest-{workers}-{int(time.time())}"
                info, spans = _sample_trace(server, experiment)
                clones = Clones(info, spans)
                experiment_id = info["trace_location"]["mlflow_experiment"]["experiment_id"]
                for mode in args.modes:
                    row = _measure(mode, clones, experiment_id, server, postgres, args)
                    print(json.dumps(row), flush=True)
                    results.append(row)
            finally:
                server.stop()
    finally:
        postgres.stop()
    Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
