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
    experiment_id = create_experiment(server.url, name)
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "worker.py"),
        f"--mode={mode}",
        f"--variant={variant}",
        f"--kind={kind}",
        f"--n={args.n if mode == 'inproc' else args.feedback_posts}",
        f"--seconds={args.seconds}",
        f"--connections={args.connections}",
        f"--port={free_port()}",
        f"--tracking-uri={server.url}",
        f"--experiment-name={name}",
        f"--experiment-id={experiment_id}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800, cwd=ROOT)
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


def report_feedback(rows: dict[tuple[str, str, str], list[dict[str, Any]]], variants: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    header = (
        f"{'variant':9} {'posts':>6} {'ok':>6} {'posts/s':>8} {'max lag ms':>11} {'p99 lag ms':>11} "
        f"{'longest step ms':>16} {'steps >5ms':>11}"
    )
    print("\nA burst of feedback posts at once (in-process): event-loop stalls; medians over rounds\n")
    print(header)
    print("-" * len(header))
    for variant in variants:
        got = rows[("feedback", variant, "json")]
        keys = ("posts", "ok", "posts_per_s", "max_stall_ms", "p99_stall_ms", "longest_step_ms", "steps_over_5ms")
        values = {key: median(got, key) for key in keys}
        out[f"feedback/{variant}"] = {**values, "rounds": got}
        print(
            f"{variant:9} {values['posts'] or 0:6.0f} {values['ok'] or 0:6.0f} {values['posts_per_s'] or 0:8.0f} "
            f"{values['max_stall_ms'] or 0:11.2f} {values['p99_stall_ms'] or 0:11.2f} "
            f"{values['longest_step_ms'] or 0:16.2f} {values['steps_over_5ms'] or 0:11.0f}"
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--modes", default="inproc,saturation,feedback")
    parser.add_argument("--n", type=int, default=1000, help="in-process requests per variant per round")
    parser.add_argument("--seconds", type=int, default=10, help="saturation run length")
    parser.add_argument("--connections", type=int, default=16, help="saturation concurrency")
    parser.add_argument("--feedback-posts", type=int, default=500)
    parser.add_argument("--kinds", default="json,sse")
    parser.add_argument("--variants", default=",".join(VARIANT_ORDER))
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results.json"))
    args = parser.parse_args()
    variants, kinds, modes = args.variants.split(","), args.kinds.split(","), args.modes.split(",")
    plan = [
        (mode, kind, variant)
        for mode in modes
        for kind in (["json"] if mode == "feedback" else kinds)
        for variant in ([v for v in variants if v.startswith("ours")] if mode == "feedback" else variants)
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
    if "feedback" in modes:
        summary["results"].update(report_feedback(rows, [v for v in variants if v.startswith("ours")]))
    Path(args.json).write_text(json.dumps(summary, indent=2))
    print(f"\nJSON: {args.json}")


if __name__ == "__main__":
    main()
