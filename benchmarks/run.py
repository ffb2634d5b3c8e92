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

from tests.support import MlflowServer  # noqa: E402

VARIANT_ORDER = ["bare", "seed", "otel", "ours", "ours-otlp"]


def create_experiment(tracking_uri: str, name: str) -> str:
    from mlflow.tracking._tracking_service.client import TrackingServiceClient

    return str(TrackingServiceClient(tracking_uri).create_experiment(name))


def run_worker(variant: str, kind: str, n: int, server: MlflowServer) -> dict[str, Any]:
    name = f"bench-{variant}-{kind}-{uuid.uuid4().hex[:8]}"
    experiment_id = create_experiment(server.url, name)
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "worker.py"),
        f"--variant={variant}",
        f"--kind={kind}",
        f"--n={n}",
        f"--tracking-uri={server.url}",
        f"--experiment-name={name}",
        f"--experiment-id={experiment_id}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"{variant}/{kind} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def median(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [row[key] for row in rows if row.get(key) is not None]
    return statistics.median(values) if values else None


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--n", type=int, default=1000, help="requests per variant per round")
    parser.add_argument("--kinds", default="json,sse")
    parser.add_argument("--variants", default=",".join(VARIANT_ORDER))
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results.json"))
    args = parser.parse_args()
    variants = args.variants.split(",")
    kinds = args.kinds.split(",")

    with tempfile.TemporaryDirectory() as workdir:
        server = MlflowServer(Path(workdir))
        server.start()
        try:
            rows: dict[tuple[str, str], list[dict[str, Any]]] = {(v, k): [] for v in variants for k in kinds}
            for round_number in range(args.rounds):
                for kind in kinds:
                    for variant in variants:
                        row = run_worker(variant, kind, args.n, server)
                        rows[(variant, kind)].append(row)
                        print(f"round {round_number + 1} {kind:4} {variant:9} {json.dumps(row)}", file=sys.stderr)
        finally:
            server.stop()

    summary: dict[str, Any] = {"rounds": args.rounds, "n": args.n, "results": {}}
    print(f"\nin-process, {args.n} requests x {args.rounds} rounds, medians; ratios vs bare and vs seed\n")
    header = (
        f"{'kind':5} {'variant':9} {'req CPU us':>10} {'vs bare':>8} {'vs seed':>8} "
        f"{'CPU+export us':>13} {'vs bare':>8} {'vs seed':>8} {'delivered':>10}"
    )
    print(header)
    print("-" * len(header))
    for kind in kinds:
        base_req = median(rows.get(("bare", kind), []), "request_cpu_us")
        base_tot = median(rows.get(("bare", kind), []), "total_cpu_us")
        seed_req = median(rows.get(("seed", kind), []), "request_cpu_us")
        seed_tot = median(rows.get(("seed", kind), []), "total_cpu_us")
        for variant in variants:
            got = rows[(variant, kind)]
            req, tot = median(got, "request_cpu_us"), median(got, "total_cpu_us")
            delivered = [r["delivered"] / r["served"] for r in got if r.get("delivered") is not None]
            delivered_text = f"{min(delivered):.0%}" if delivered else "-"
            summary["results"][f"{kind}/{variant}"] = {
                "request_cpu_us": req,
                "total_cpu_us": tot,
                "request_cpu_vs_bare": req / base_req if req and base_req else None,
                "request_cpu_vs_seed": req / seed_req if req and seed_req else None,
                "total_cpu_vs_bare": tot / base_tot if tot and base_tot else None,
                "total_cpu_vs_seed": tot / seed_tot if tot and seed_tot else None,
                "delivered_min_fraction": min(delivered) if delivered else None,
                "rounds": got,
            }
            print(
                f"{kind:5} {variant:9} {req:10.0f} {ratio(req, base_req):>8} {ratio(req, seed_req):>8} "
                f"{tot:13.0f} {ratio(tot, base_tot):>8} {ratio(tot, seed_tot):>8} {delivered_text:>10}"
            )
    Path(args.json).write_text(json.dumps(summary, indent=2))
    print(f"\nJSON: {args.json}")


if __name__ == "__main__":
    main()
