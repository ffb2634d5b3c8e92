"""Benchmark: `mlflow-feedback report` against the guide's `analyze_user_feedback` over the same traces.

    make bench-report            # or: .venv/bin/python benchmarks/report_bench.py --traces 2000 --rounds 3

Starts its own `mlflow server` (sqlite, loopback), seeds `--traces` traces with end-user feedback on
most of them, then, round by round and each in a fresh process, runs the guide's code (full `mlflow`,
`MlflowClient`; its listing made to read every page, as it would otherwise stop at the first, and
`trace.data.assessments` read as `trace.info.assessments`, where MLflow 3 keeps them) and this
library's report (`mlflow-tracing` only). Prints the median wall time of each, the ratio, and whether
the six overall figures are identical.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support import MlflowServer  # noqa: E402

GUIDE = '''
import json, sys, time
import mlflow
from mlflow import MlflowClient

def analyze_user_feedback(traces):
    """Analyze feedback patterns from traces (MLflow's guide; assessments now live on trace.info)."""
    client = MlflowClient()
    total_traces = len(traces)
    traces_with_feedback = 0
    positive_count = 0
    negative_count = 0
    for trace in traces:
        trace_detail = client.get_trace(trace.info.trace_id)
        if trace_detail.info.assessments:
            traces_with_feedback += 1
            for assessment in trace_detail.info.assessments:
                if assessment.name == "user_feedback":
                    if assessment.value:
                        positive_count += 1
                    else:
                        negative_count += 1
    if traces_with_feedback > 0:
        feedback_rate = (traces_with_feedback / total_traces) * 100
        positive_rate = (positive_count / traces_with_feedback) * 100
    else:
        feedback_rate = 0
        positive_rate = 0
    return {"total_traces": total_traces, "traces_with_feedback": traces_with_feedback,
            "feedback_rate": feedback_rate, "positive_rate": positive_rate,
            "positive_count": positive_count, "negative_count": negative_count}

uri, experiment_id = sys.argv[1:3]
mlflow.set_tracking_uri(uri)
start = time.perf_counter()
client = MlflowClient()
traces, token = [], None
while True:  # every page: the guide's single search_traces call returns the first one only
    page = client.search_traces(locations=[experiment_id], max_results=500, page_token=token, include_spans=False)
    traces.extend(page)
    token = page.token
    if not token:
        break
result = analyze_user_feedback(traces)
print(json.dumps({"seconds": time.perf_counter() - start, "figures": result}))
'''

OURS = """
import json, sys, time
import mlflow
from mlflow_feedback_middleware.insight.report import build_report, search_requests

uri, experiment_id = sys.argv[1:3]
mlflow.set_tracking_uri(uri)
start = time.perf_counter()
report = build_report(search_requests(experiment_id))
print(json.dumps({"seconds": time.perf_counter() - start, "figures": report}))
"""

FIGURES = ("total_traces", "traces_with_feedback", "feedback_rate", "positive_rate", "positive_count", "negative_count")


def seed(uri: str, traces: int) -> str:
    """An experiment with `traces` traces and feedback like a live service's: thumbs, comments, ratings."""
    import mlflow
    from mlflow.entities import AssessmentSource

    from mlflow_feedback_middleware._mlflow.tracing import find_experiment

    mlflow.set_tracking_uri(uri)
    experiment_id = find_experiment(uri, f"report-bench-{uuid.uuid4().hex[:8]}", None, create=True)
    ids = []
    for i in range(traces):
        span = mlflow.start_span_no_context(
            name="POST /chat",
            experiment_id=experiment_id,
            inputs={"message": f"q{i}"},
            metadata={"mlflow.trace.user": f"u{i % 50}"},
        )
        span.set_outputs({"response": f"a{i}"})
        span.end()
        ids.append(span.trace_id)
        if i % 100 == 99:
            mlflow.flush_trace_async_logging()
    mlflow.flush_trace_async_logging()

    def feedback(i: int) -> None:
        source = AssessmentSource(source_type="HUMAN", source_id=f"u{i % 50}")
        if i % 3 != 2:
            comment = "not quite" if i % 7 == 0 else None
            mlflow.log_feedback(
                trace_id=ids[i], name="user_feedback", value=i % 4 != 1, rationale=comment, source=source
            )
        if i % 5 == 0:
            mlflow.log_feedback(trace_id=ids[i], name="user_accuracy", value=(i % 5 + 1) / 5, source=source)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(feedback, range(traces)))
    return experiment_id


def run(python: Path, script: str, uri: str, experiment_id: str) -> dict[str, Any]:
    result = subprocess.run(
        [str(python), "-c", script, uri, experiment_id], capture_output=True, text=True, timeout=3600, cwd=ROOT
    )
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traces", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "report_results.json"))
    args = parser.parse_args()
    guide_python = ROOT / ".venv-mlflow" / "bin" / "python"
    with tempfile.TemporaryDirectory() as workdir:
        server = MlflowServer(Path(workdir))
        server.start()
        try:
            started = time.perf_counter()
            experiment_id = seed(server.url, args.traces)
            print(f"seeded {args.traces} traces in {time.perf_counter() - started:.0f} s", file=sys.stderr)
            guide, ours = [], []
            for round_number in range(args.rounds):
                guide.append(run(guide_python, GUIDE, server.url, experiment_id))
                ours.append(run(Path(sys.executable), OURS, server.url, experiment_id))
                print(
                    f"round {round_number + 1}: guide {guide[-1]['seconds']:.2f} s, ours {ours[-1]['seconds']:.2f} s",
                    file=sys.stderr,
                )
        finally:
            server.stop()
    guide_s = statistics.median(r["seconds"] for r in guide)
    ours_s = statistics.median(r["seconds"] for r in ours)
    identical = all({k: r["figures"][k] for k in FIGURES} == guide[0]["figures"] for r in ours + guide)
    summary = {
        "traces": args.traces,
        "rounds": args.rounds,
        "guide_seconds": guide_s,
        "ours_seconds": ours_s,
        "speedup": guide_s / ours_s,
        "identical_figures": identical,
        "figures": guide[0]["figures"],
    }
    Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nReport over {args.traces} traces, median of {args.rounds} rounds (wall time, fresh processes)\n")
    print(f"  MLflow guide's analyze_user_feedback  {guide_s:8.2f} s")
    print(f"  mlflow-feedback report                {ours_s:8.2f} s")
    print(f"  speed-up                              {guide_s / ours_s:8.1f}x   (target >= 10x)")
    print(f"  identical figures                     {'yes' if identical else 'NO'}   {json.dumps(guide[0]['figures'])}")
    print(f"\nJSON: {args.json}")


if __name__ == "__main__":
    main()
