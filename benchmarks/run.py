"""Benchmark: the middleware against a bare app, the hand-written pattern and OpenTelemetry's middleware.

    make bench                       # or: .venv/bin/python benchmarks/run.py --rounds 5 --n 1000

Starts its own `mlflow server` (sqlite, loopback), then, for each round, runs every variant once in a
fresh process, in turn (interleaved, so machine noise hits all variants alike). Reports medians over the
rounds and ratios, never single absolute times: these machines are noisy. Prints a table and writes JSON
(``--json``, default ``benchmarks/results.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support import MlflowServer, free_port  # noqa: E402

VARIANT_ORDER = ["bare", "seed", "otel", "ours", "ours-otlp"]


def create_experiment(tracking_uri: str, name: str) -> str:
    from mlflow.tracking._tracking_service.client import TrackingServiceClient

    return str(TrackingServiceClient(tracking_uri).create_experiment(name))


def run_worker(mode: str, variant: str, kind: str, args: argparse.Namespace, server: MlflowServer) -> dict[str, Any]:
    name = f"bench-{mode}-{variant}-{kind}-{uuid.uuid4().hex[:8]}"
    requests_for = {
        "inproc": args.n,
        "saturation": args.n,
        "feedback": args.feedback_posts,
        "memory": args.memory_requests,
        "ttfb": args.ttfb_requests,
    }
    experiment_id = create_experiment(server.url, name)
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "worker.py"),
        f"--mode={mode}",
        f"--variant={variant}",
        f"--kind={kind}",
        f"--n={requests_for[mode]}",
        f"--seconds={args.seconds}",
        f"--connections={args.connections}",
        f"--port={free_port()}",
        f"--tracking-uri={server.url}",
        f"--experiment-name={name}",
        f"--experiment-id={experiment_id}",
    ]
    env = os.environ | {"MLFLOW_FEEDBACK_OUTBOX": str(server.workdir / "outbox.db")}  # not the working tree
    if args.gc_freeze:
        env["BENCH_GC_FREEZE"] = "1"
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800, cwd=ROOT, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{mode}/{variant}/{kind} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def median(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [row[key] for row in rows if row.get(key) is not None]
    return statistics.median(values) if values else None


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def delivered(rows: list[dict[str, Any]]) -> float | None:
    fractions = [r["delivered"] / r["served"] for r in rows if r.get("delivered") is not None and r["served"]]
    return min(fractions) if fractions else None


def percent(value: float | None) -> str:
    return f"{value:.0%}" if value is not None else "-"


def report_inproc(
    rows: dict[tuple[str, str, str], list[dict[str, Any]]], variants: list[str], kinds: list[str]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    header = (
        f"{'kind':5} {'variant':9} {'req CPU us':>10} {'vs bare':>8} {'vs seed':>8} "
        f"{'CPU+export us':>13} {'vs bare':>8} {'vs seed':>8} {'delivered':>10}"
    )
    print("\nIn-process (raw ASGI calls): CPU per request; medians over rounds; delivered = worst round\n")
    print(header)
    print("-" * len(header))
    for kind in kinds:
        base, seed = rows.get(("inproc", "bare", kind), []), rows.get(("inproc", "seed", kind), [])
        base_req, base_tot = median(base, "request_cpu_us"), median(base, "total_cpu_us")
        seed_req, seed_tot = median(seed, "request_cpu_us"), median(seed, "total_cpu_us")
        for variant in variants:
            got = rows[("inproc", variant, kind)]
            req, tot = median(got, "request_cpu_us"), median(got, "total_cpu_us")
            out[f"inproc/{kind}/{variant}"] = {
                "request_cpu_us": req,
                "total_cpu_us": tot,
                "request_cpu_vs_bare": req / base_req if req and base_req else None,
                "request_cpu_vs_seed": req / seed_req if req and seed_req else None,
                "total_cpu_vs_bare": tot / base_tot if tot and base_tot else None,
                "total_cpu_vs_seed": tot / seed_tot if tot and seed_tot else None,
                "delivered_min_fraction": delivered(got),
                "rounds": got,
            }
            print(
                f"{kind:5} {variant:9} {req or 0:10.0f} {ratio(req, base_req):>8} {ratio(req, seed_req):>8} "
                f"{tot or 0:13.0f} {ratio(tot, base_tot):>8} {ratio(tot, seed_tot):>8} {percent(delivered(got)):>10}"
            )
    return out


def report_saturation(
    rows: dict[tuple[str, str, str], list[dict[str, Any]]], variants: list[str], kinds: list[str]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    header = f"{'kind':5} {'variant':9} {'req/s':>8} {'vs bare':>8} {'p50 ms':>7} {'p99 ms':>7} {'delivered':>10}"
    print("\nSaturation under uvicorn (wrk on loopback); medians over rounds\n")
    print(header)
    print("-" * len(header))
    for kind in kinds:
        base = median(rows.get(("saturation", "bare", kind), []), "rps")
        for variant in variants:
            got = rows[("saturation", variant, kind)]
            rps, p50, p99 = median(got, "rps"), median(got, "p50_ms"), median(got, "p99_ms")
            out[f"saturation/{kind}/{variant}"] = {
                "rps": rps,
                "rps_vs_bare": rps / base if rps and base else None,
                "p50_ms": p50,
                "p99_ms": p99,
                "delivered_min_fraction": delivered(got),
                "rounds": got,
            }
            print(
                f"{kind:5} {variant:9} {rps or 0:8.0f} {ratio(rps, base):>8} {p50 or 0:7.2f} {p99 or 0:7.2f} "
                f"{percent(delivered(got)):>10}"
            )
    return out


def report_table(
    rows: dict[tuple[str, str, str], list[dict[str, Any]]],
    mode: str,
    variants: list[str],
    columns: list[tuple[str, str, str]],
    title: str,
) -> dict[str, Any]:
    """A table of medians over rounds for one mode; `columns` are (key, header, format spec)."""
    out: dict[str, Any] = {}
    header = f"{'variant':9} " + " ".join(f"{name:>{max(len(name), 8)}}" for _, name, _ in columns)
    print(f"\n{title}\n")
    print(header)
    print("-" * len(header))
    for variant in variants:
        got = rows[(mode, variant, "json")]
        values = {key: median(got, key) for key, _, _ in columns}
        out[f"{mode}/{variant}"] = {**values, "rounds": got}
        cells = [f"{values[key] or 0:>{max(len(name), 8)}{spec}}" for key, name, spec in columns]
        print(f"{variant:9} " + " ".join(cells))
    return out


FEEDBACK_COLUMNS = [
    ("posts", "posts", ".0f"),
    ("ok", "ok", ".0f"),
    ("posts_per_s", "posts/s", ".0f"),
    ("max_stall_ms", "max lag ms", ".1f"),
    ("p99_stall_ms", "p99 lag ms", ".1f"),
    ("longest_step_ms", "longest step ms", ".1f"),
    ("steps_over_5ms", "steps >5ms", ".0f"),
    ("longest_gc_ms", "longest GC ms", ".1f"),
    ("gc_over_5ms", "GCs >5ms", ".0f"),
]
MEMORY_COLUMNS = [("warm_mb", "warm MB", ".1f"), ("end_mb", "end MB", ".1f"), ("growth", "growth", ".1%")]
TTFB_COLUMNS = [("ttfb_ms_median", "TTFB ms", ".2f"), ("ttfb_ms_p90", "p90 ms", ".2f")]
# Which variants each mode runs, and on which kinds.
MODE_VARIANTS = {"feedback": ("ours", "ours-otlp"), "memory": ("bare", "ours", "ours-otlp")}
SINGLE_KIND_MODES = ("feedback", "memory", "ttfb")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--modes", default="inproc,saturation,feedback,ttfb,memory")
    parser.add_argument("--n", type=int, default=1000, help="in-process requests per variant per round")
    parser.add_argument("--seconds", type=int, default=10, help="saturation run length")
    parser.add_argument("--connections", type=int, default=16, help="saturation concurrency")
    parser.add_argument("--feedback-posts", type=int, default=500)
    parser.add_argument("--memory-requests", type=int, default=50_000)
    parser.add_argument("--ttfb-requests", type=int, default=200)
    parser.add_argument("--kinds", default="json,sse")
    parser.add_argument(
        "--gc-freeze", action="store_true", help="feedback mode: gc.freeze() after warm-up, as a service could"
    )
    parser.add_argument("--variants", default=",".join(VARIANT_ORDER))
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results.json"))
    args = parser.parse_args()
    variants, kinds, modes = args.variants.split(","), args.kinds.split(","), args.modes.split(",")
    if "saturation" in modes and shutil.which("wrk") is None:
        print("skipping saturation: it needs wrk (Debian: apt-get install wrk)", file=sys.stderr)
        modes.remove("saturation")
    plan = [
        (mode, kind, variant)
        for mode in modes
        for kind in (["json"] if mode in SINGLE_KIND_MODES else kinds)
        for variant in variants
        if variant in MODE_VARIANTS.get(mode, variants)
    ]

    rows: dict[tuple[str, str, str], list[dict[str, Any]]] = {(m, v, k): [] for m, k, v in plan}
    with tempfile.TemporaryDirectory() as workdir:
        server = MlflowServer(Path(workdir))
        server.start()
        try:
            for round_number in range(args.rounds):
                for mode, kind, variant in plan:
                    row = run_worker(mode, variant, kind, args, server)
                    rows[(mode, variant, kind)].append(row)
                    print(f"round {round_number + 1} {mode} {kind} {variant}: {json.dumps(row)}", file=sys.stderr)
        finally:
            server.stop()

    summary: dict[str, Any] = {"rounds": args.rounds, "args": vars(args), "results": {}}
    if "inproc" in modes:
        summary["results"].update(report_inproc(rows, variants, kinds))
    if "saturation" in modes:
        summary["results"].update(report_saturation(rows, variants, kinds))

    def ran(mode: str) -> list[str]:
        return [v for v in variants if (mode, v, "json") in rows]

    if "feedback" in modes:
        title = "A burst of feedback posts at once (in-process): event-loop lag and the longest single step"
        summary["results"].update(report_table(rows, "feedback", ran("feedback"), FEEDBACK_COLUMNS, title))
    if "memory" in modes:
        title = f"Resident memory over {args.memory_requests} requests after 5000 of warm-up (in-process)"
        summary["results"].update(report_table(rows, "memory", ran("memory"), MEMORY_COLUMNS, title))
    if "ttfb" in modes:
        title = "SSE time to first byte under uvicorn, one request at a time"
        summary["results"].update(report_table(rows, "ttfb", ran("ttfb"), TTFB_COLUMNS, title))
    Path(args.json).write_text(json.dumps(summary, indent=2))
    print(f"\nJSON: {args.json}")


if __name__ == "__main__":
    main()
