"""Reports against a real tracking server: seeded traces over four days and more than one page of search
results, feedback of every kind (and some that must not count), numbers computed independently here."""

from __future__ import annotations

import csv
import io
import json
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlflow
import pytest
from mlflow.entities import AssessmentSource, Feedback

from mlflow_feedback_middleware._mlflow.tracing import find_experiment
from mlflow_feedback_middleware.insight.cli import main
from mlflow_feedback_middleware.insight.report import PAGE_SIZE, build_report, search_requests
from mlflow_feedback_middleware.intake.models import RETRACTED_KEY

from .apps import build_app
from .support import CHROMIUM_FLAGS, ROOT, MlflowServer, chromium_or_skip, client_for, full_mlflow_python, get_trace

N_TRACES = 560  # more than one page of search results
DAY = 86400.0
HUMAN = "HUMAN"
RETRACT = object()  # a vote's "then": withdrawn


@dataclass
class Seeded:
    """What was written, and what each figure must therefore be."""

    experiment: str
    experiment_id: str
    now: float
    times: list[float] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    judged_or_overridden: set[int] = field(default_factory=set)
    up: dict[int, int] = field(default_factory=Counter)  # trace index -> valid 👍 votes
    down: dict[int, int] = field(default_factory=Counter)
    ratings: list[tuple[int, float]] = field(default_factory=list)
    issues: list[tuple[int, str]] = field(default_factory=list)
    comments: list[tuple[int, str]] = field(default_factory=list)  # negative votes with a comment
    with_human_feedback: set[int] = field(default_factory=set)
    withdrawn: set[int] = field(default_factory=set)  # a vote its user took back

    def expected(self, indices: list[int]) -> dict[str, Any]:
        chosen = set(indices)
        with_feedback = len(self.with_human_feedback & chosen)
        positive = sum(self.up[i] for i in chosen)
        negative = sum(self.down[i] for i in chosen)
        ratings = [v for i, v in self.ratings if i in chosen]
        return {
            "total_traces": len(chosen),
            "traces_with_feedback": with_feedback,
            "feedback_rate": with_feedback / len(chosen) * 100 if chosen else 0,
            "positive_rate": positive / with_feedback * 100 if with_feedback else 0,
            "positive_count": positive,
            "negative_count": negative,
            "rating_mean": statistics.fmean(ratings) if ratings else None,
            "rating_count": len(ratings),
            "issues": dict(Counter(v for i, v in self.issues if i in chosen)),
            "withdrawn_count": len(self.withdrawn & chosen),
        }


def _user(i: int) -> str:
    return f"user{i % 5}"


@pytest.fixture(scope="module")
def seeded(mlflow_server: MlflowServer) -> Seeded:
    """N_TRACES traces spread over 3 days ago, 2, 1 and the last hour, and feedback on many of them."""
    name = f"report-{uuid.uuid4().hex[:10]}"
    experiment_id = find_experiment(mlflow_server.url, name, None, create=True)
    now = time.time()
    data = Seeded(name, experiment_id, now)
    ids = data.ids
    for i in range(N_TRACES):
        when = now - (3 * DAY, 2 * DAY, DAY, 3600.0)[i % 4] + i * 0.01
        span = mlflow.start_span_no_context(
            name="POST /chat" if i % 3 else "POST /chat/stream",
            experiment_id=experiment_id,
            start_time_ns=int(when * 1e9),
            inputs={"message": f"question {i}"},
            metadata={"mlflow.trace.user": _user(i), "mlflow.trace.session": f"s{i % 11}"},
        )
        span.set_outputs({"response": f"answer {i}"})
        span.end(end_time_ns=int((when + 0.05) * 1e9))
        data.times.append(when)
        data.ids.append(span.trace_id)
        if i % 100 == 99:
            mlflow.flush_trace_async_logging()  # keep MLflow's export queue from overflowing
    mlflow.flush_trace_async_logging()

    # The plan first (what each figure must be), then the writes, trace by trace on a few threads.
    plan: dict[int, list[tuple[str, Any, str | None, str, Any]]] = {}  # i -> (name, value, why, source, then)
    for i in range(N_TRACES):
        votes = plan.setdefault(i, [])
        if i % 4 == 0:
            votes.append(("user_feedback", True, None, HUMAN, None))
            data.up[i] += 1
        if i % 6 == 1:
            comment = f"wrong answer {i}" if i % 12 == 1 else None
            votes.append(("user_feedback", False, comment, HUMAN, None))
            data.down[i] += 1
            if comment:
                data.comments.append((i, comment))
        if i % 5 == 2:
            rating = ((i // 5) % 5 + 1) / 5
            votes.append(("user_accuracy", rating, None, HUMAN, None))
            data.ratings.append((i, rating))
        if i % 9 == 3:
            issue = "wrong" if i % 2 else "slow"
            votes.append(("issue", issue, None, HUMAN, None))
            data.issues.append((i, issue))
        if i % 10 == 7:  # not an end user: never counted
            votes.append(("user_feedback", False, "judged", "LLM_JUDGE", None))
            data.judged_or_overridden.add(i)
        if i % 50 == 5:  # a 👍 corrected to 👎: only the override counts
            votes.append(("user_feedback", True, None, HUMAN, False))
            data.down[i] += 1
            data.judged_or_overridden.add(i)
        if i % 50 == 15:  # a 👍 withdrawn (overridden by a retraction): no vote at all
            votes.append(("user_feedback", True, None, HUMAN, RETRACT))
            data.withdrawn.add(i)
            data.judged_or_overridden.add(i)
        if any(source == HUMAN and then is not RETRACT for _, _, _, source, then in votes):
            data.with_human_feedback.add(i)

    def write(i: int) -> None:
        for name, value, rationale, source_type, then in plan[i]:
            source = AssessmentSource(source_type=source_type, source_id=_user(i) if source_type == HUMAN else "judge")
            written = mlflow.log_feedback(trace_id=ids[i], name=name, value=value, rationale=rationale, source=source)
            if then is RETRACT:  # stored as the feedback route stores a retraction
                metadata = {RETRACTED_KEY: "true"}
                withdrawal = Feedback(name, None, source=source, metadata=metadata, overrides=written.assessment_id)
                mlflow.log_assessment(ids[i], withdrawal)
            elif then is not None:
                mlflow.override_feedback(
                    trace_id=ids[i], assessment_id=written.assessment_id, value=then, source=source
                )

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(write, range(N_TRACES)))
    return data


def _window(data: Seeded, since: float | None = None, until: float | None = None) -> list[int]:
    return [i for i, t in enumerate(data.times) if (since is None or t >= since) and (until is None or t < until)]


def _check(report: dict[str, Any], expected: dict[str, Any]) -> None:
    for key in ("total_traces", "traces_with_feedback", "positive_count", "negative_count", "withdrawn_count"):
        assert report[key] == expected[key], key
    for key in ("feedback_rate", "positive_rate"):
        assert report[key] == pytest.approx(expected[key]), key
    accuracy = report["ratings"].get("accuracy")
    if expected["rating_count"]:
        assert accuracy["count"] == expected["rating_count"]
        assert accuracy["mean"] == pytest.approx(expected["rating_mean"])
    else:
        assert accuracy is None
    assert report["categories"].get("issue", {}) == expected["issues"]


def test_the_whole_experiment_across_pages(seeded: Seeded) -> None:
    pages: list[int] = []
    report = build_report(search_requests(seeded.experiment_id, progress=pages.append))
    assert len(pages) == -(-N_TRACES // PAGE_SIZE) > 1  # every page read, not the first only
    _check(report, seeded.expected(list(range(N_TRACES))))
    newest = [c for _, c in sorted(seeded.comments, key=lambda ic: seeded.times[ic[0]], reverse=True)]
    assert {c["comment"] for c in report["latest_negative_comments"]} <= set(newest)
    assert len(report["latest_negative_comments"]) == 10
    assert report["ratings"]["accuracy"]["distribution"] == {
        f"{v:g}": n for v, n in sorted(Counter(v for _, v in seeded.ratings).items())
    }


def test_time_windows_and_an_empty_one(seeded: Seeded) -> None:
    now = seeded.now
    for since, until in ((now - 1.5 * DAY, None), (now - 2.5 * DAY, now - 0.5 * DAY), (None, now - 2.5 * DAY)):
        requests = search_requests(
            seeded.experiment_id,
            int(since * 1000) if since else None,
            int(until * 1000) if until else None,
        )
        _check(build_report(requests), seeded.expected(_window(seeded, since, until)))
    empty = build_report(search_requests(seeded.experiment_id, int((now + 3600) * 1000)))
    assert (empty["total_traces"], empty["feedback_rate"], empty["positive_rate"], empty["ratings"]) == (0, 0, 0, {})


def test_groups_by_day_route_and_user(seeded: Seeded) -> None:
    requests = list(search_requests(seeded.experiment_id))
    by_day = build_report(requests, "day")["groups"]
    # The UTC days the traces started on: three or four, as "an hour ago" is yesterday before 01:00 UTC.
    days = Counter(
        datetime.fromtimestamp(int(when * 1e9) // 1_000_000 / 1000, UTC).strftime("%Y-%m-%d") for when in seeded.times
    )
    assert {day: group["total_traces"] for day, group in by_day.items()} == days and len(days) >= 3
    by_route = build_report(requests, "route")["groups"]
    stream = [i for i in range(N_TRACES) if i % 3 == 0]
    _check(by_route["POST /chat/stream"], seeded.expected(stream))
    by_user = build_report(requests, "user")["groups"]
    _check(by_user["user3"], seeded.expected([i for i in range(N_TRACES) if i % 5 == 3]))


def test_the_guides_analysis_gives_the_same_overall_numbers(seeded: Seeded) -> None:
    """MLflow's `analyze_user_feedback`, run over every trace (its own search stops at one page).

    It counts any assessment, so it is compared on traces without judge or overridden feedback."""
    comparable = {seeded.ids[i] for i in range(N_TRACES) if i not in seeded.judged_or_overridden}
    requests = [r for r in search_requests(seeded.experiment_id) if r.trace_id in comparable]
    ours = build_report(requests)
    theirs = seed_analyze_user_feedback(sorted(comparable))
    assert {k: ours[k] for k in theirs} == pytest.approx(theirs)


def seed_analyze_user_feedback(trace_ids: list[str]) -> dict[str, Any]:
    """The guide's function, verbatim but for `client.get_trace` (`mlflow.get_trace` with mlflow-tracing)."""
    total_traces = len(trace_ids)
    traces_with_feedback = positive_count = negative_count = 0
    for trace_id in trace_ids:
        trace_detail = mlflow.get_trace(trace_id)
        if trace_detail.info.assessments:
            traces_with_feedback += 1
            for assessment in trace_detail.info.assessments:
                if assessment.name == "user_feedback":
                    if assessment.value:
                        positive_count += 1
                    else:
                        negative_count += 1
    feedback_rate = traces_with_feedback / total_traces * 100 if traces_with_feedback else 0
    positive_rate = positive_count / traces_with_feedback * 100 if traces_with_feedback else 0
    return {
        "total_traces": total_traces,
        "traces_with_feedback": traces_with_feedback,
        "feedback_rate": feedback_rate,
        "positive_rate": positive_rate,
        "positive_count": positive_count,
        "negative_count": negative_count,
    }


def test_cli_json_csv_and_table(seeded: Seeded, capsys: pytest.CaptureFixture[str]) -> None:
    uri = mlflow.get_tracking_uri()
    args = ["report", "--experiment", seeded.experiment, "--tracking-uri", uri, "--since", "36h"]
    assert main([*args, "--format", "json", "--by", "route"]) == 0
    report = json.loads(capsys.readouterr().out)
    _check(report, seeded.expected(_window(seeded, seeded.now - 1.5 * DAY)))
    assert set(report["groups"]) == {"POST /chat", "POST /chat/stream"}
    assert main([*args, "--format", "csv", "--by", "day"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert rows[0]["group"] == "(all)" and int(rows[0]["total_traces"]) == report["total_traces"]
    assert sum(int(r["total_traces"]) for r in rows[1:]) == report["total_traces"]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert f"traced requests       {report['total_traces']}" in table and "\nRatings\n" in table
    assert "(0-1)" in table  # ratings logged without their scale show as stored


def test_cli_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["report", "--experiment", "x", "--since", "yesterday-ish"])
    assert exit_info.value.code == 2 and "neither a duration" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["report", "--experiment", "x", "--agreement", "--format", "csv"])
    assert exit_info.value.code == 2 and "--agreement is shown in the table" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--experiment", "no-such-experiment"], "no experiment named 'no-such-experiment'"),
        (["--experiment-id", "999999"], "experiment ID 999999: RESOURCE_DOES_NOT_EXIST"),
        (["--experiment-id", "0", "--tracking-uri", "http://127.0.0.1:9"], "cannot reach the tracking server"),
        (["--experiment-id", "0", "--html", "/no/such/folder/report.html"], "cannot write /no/such/folder"),
        (["--experiment-id", "0", "--schema", "/no/such/schema.toml"], "--schema /no/such/schema.toml"),
    ],
)
def test_cli_user_errors_are_one_line_and_exit_2(
    args: list[str], says: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever the user got wrong, one line on stderr names it: no traceback, no minutes of retries."""
    # The command sets these for its process; here they are undone after the test, as is its tracking URI.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    server = mlflow.get_tracking_uri()
    uri = ["--tracking-uri", server] if "--tracking-uri" not in args else []
    try:
        assert main(["report", *args, *uri, "--timeout", "5"]) == 2
    finally:
        mlflow.set_tracking_uri(server)
    err = capsys.readouterr().err.strip()
    assert err.startswith("mlflow-feedback: ") and says in err and "\n" not in err, err


def test_installed_command_writes_html_that_renders_in_chromium(seeded: Seeded, tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    command = Path(sys.executable).parent / "mlflow-feedback"
    result = subprocess.run(
        [str(command), "report", "--experiment", seeded.experiment, "--by", "user", "--html", str(page)],
        env={"MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    text = page.read_text()
    assert "http://" not in text.replace(mlflow.get_tracking_uri(), "") and "<script src" not in text
    chromium = chromium_or_skip()
    artifacts = ROOT / "tests" / "artifacts"
    artifacts.mkdir(exist_ok=True)
    flags = ["--headless", *CHROMIUM_FLAGS, "--window-size=820,1400"]
    dom = subprocess.run(
        [chromium, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120
    ).stdout
    assert dom.count('<polyline class="feedback_rate"') == 1 and dom.count("<rect") >= 5
    shot = artifacts / "report.png"
    subprocess.run([chromium, *flags, f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120)
    assert shot.stat().st_size > 10_000  # a blank page is a few kB


# -- evaluation datasets ---------------------------------------------------------------------------

EVALUATE = "evaluate_exported_records"  # tests/scripts/evaluate_exported_records.py

STORE_DATASET = "store_dataset"  # tests/scripts/store_dataset.py


@pytest.mark.anyio
async def test_export_negative_feedback_as_records_that_mlflow_evaluates(
    experiment_name: str, mlflow_server: MlflowServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with client_for(build_app(experiment_name=experiment_name, rate_limit=None)) as client:
        answers = []
        for i in range(6):
            response = await client.post("/chat", json={"message": f"question {i}"}, headers={"X-User-ID": f"u{i}"})
            answers.append(response.headers["x-mlflow-trace-id"])
        for trace_id in answers:
            get_trace(trace_id)
        votes = [
            (0, {"is_correct": False, "comment": "wrong"}),
            (1, {"is_correct": True}),
            (2, {"is_correct": False, "name": "correction", "value": "echo: the right answer"}),
            (3, {"ratings": {"accuracy": 1}}),
        ]
        for i, body in votes:
            sent = await client.post(f"/feedback?trace_id={answers[i]}", json=body, headers={"X-User-ID": f"u{i}"})
            assert sent.status_code == 200, sent.text
    mlflow.log_expectation(
        trace_id=answers[0],
        name="expected_response",
        value="echo: question 0, but right",
        source=AssessmentSource(source_type="HUMAN", source_id="reviewer"),
    )
    experiment_id = find_experiment(mlflow_server.url, experiment_name, None, create=False)
    out = tmp_path / "negative.jsonl"
    args = ["export", "--experiment", experiment_name, "--tracking-uri", mlflow_server.url, "--output", str(out)]
    assert main(args) == 0
    records = {r["trace_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(records) == {answers[0], answers[2]}
    first = records[answers[0]]
    assert first["inputs"] == {"message": "question 0"}
    assert first["outputs"]["response"] == "echo: question 0"
    assert first["expectations"] == {"expected_response": "echo: question 0, but right"}
    assert [(f["name"], f["value"], f["rationale"], f["user"]) for f in first["feedback"]] == [
        ("user_feedback", False, "wrong", "u0")
    ]
    assert records[answers[2]]["expectations"] == {"expected_response": "echo: the right answer"}
    assert main([*args[:-1], str(tmp_path / "low.jsonl"), "--only", "rating-below:0.5"]) == 0
    assert [json.loads(line)["trace_id"] for line in (tmp_path / "low.jsonl").read_text().splitlines()] == [answers[3]]

    capsys.readouterr()
    assert main([*args, "--dataset", "thumbs-down"]) == 2  # this environment has mlflow-tracing only
    assert "need the full `mlflow` package" in capsys.readouterr().err

    mlflow_python = full_mlflow_python()
    stored = subprocess.run(
        [
            str(mlflow_python),
            "-m",
            f"tests.scripts.{STORE_DATASET}",
            *args[1:],
            "--dataset",
            f"thumbs-down-{experiment_id}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert stored.returncode == 0, stored.stderr[-3000:]
    assert json.loads(stored.stdout.strip().splitlines()[-1]) == {"records": 2, "with_expectations": 2}
    evaluated = subprocess.run(
        [str(mlflow_python), "-m", f"tests.scripts.{EVALUATE}", mlflow_server.url, experiment_id, str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    result = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert result["rows"] == 2
    # Inputs, outputs and expectations all arrived: every answer repeats its question, none is as corrected.
    assert result["metrics"]["repeats_the_question/mean"] == 1.0 and result["metrics"]["as_corrected/mean"] == 0.0


@pytest.mark.anyio
async def test_the_summary_route_needs_opt_in_and_the_admin_token(seeded: Seeded) -> None:
    admin = "admin-token-0123456789abcdef"
    async with client_for(build_app(experiment_name=seeded.experiment)) as client:
        assert (await client.get("/feedback/summary")).status_code == 404  # not enabled: no such route
    async with client_for(build_app(experiment_name=seeded.experiment, summary_token=admin)) as client:
        assert (await client.get("/feedback/summary")).status_code == 401
        wrong = await client.get("/feedback/summary", headers={"Authorization": "Bearer not-the-token-at-all"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        bad = await client.get("/feedback/summary?since=yesterday", headers={"Authorization": f"Bearer {admin}"})
        assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "since"
        ok = await client.get("/feedback/summary?since=36h&by=route", headers={"Authorization": f"Bearer {admin}"})
    assert ok.status_code == 200, ok.text
    summary = ok.json()
    _check(summary, seeded.expected(_window(seeded, seeded.now - 1.5 * DAY)))
    assert set(summary["groups"]) == {"POST /chat", "POST /chat/stream"}
