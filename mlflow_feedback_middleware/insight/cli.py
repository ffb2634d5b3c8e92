"""``mlflow-feedback``: reports on the feedback a service collected, from the command line.

    mlflow-feedback report --experiment /Shared/production-app --since 7d --by day
    mlflow-feedback report --experiment chat --since 24h --format json
    mlflow-feedback report --experiment chat --since 30d --by day --html report.html
    mlflow-feedback report --experiment chat --since 30d --agreement       # users versus LLM judges
    mlflow-feedback export --experiment chat --only negative --output thumbs-down.jsonl

The tracking server comes from ``--tracking-uri`` or ``MLFLOW_TRACKING_URI`` (the demo's store:
``--tracking-uri sqlite:///examples/mlflow.db``, run with the demo's environment, ``.venv-mlflow/bin/mlflow-feedback``).
A user error (an unreachable server, a missing experiment or file) is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import mlflow
from mlflow.exceptions import MlflowException

from .._mlflow.server_watch import probe
from .._mlflow.tracing import find_experiment
from ..intake.schema import FeedbackSchema
from ..logs import without_credentials
from .report import GROUPINGS, build_report, iso_time, parse_time, search_requests


class UserError(Exception):
    """A problem the user can fix: printed as one line, exit status 2."""


def _tracking_uri() -> str:
    try:
        return mlflow.get_tracking_uri()
    except Exception:  # mlflow-tracing without a URI: MLflow's sqlite default needs the full package
        raise UserError(
            "no tracking server: pass --tracking-uri (or set MLFLOW_TRACKING_URI), e.g. http://127.0.0.1:5000"
        ) from None


def _connect(timeout: float) -> str:
    """The tracking URI, checked to answer within `timeout` seconds; MLflow's calls bounded by it too."""
    # MLflow's client retries a refused connection for minutes by default; a command line should not.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(int(timeout), 1)))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    uri = _tracking_uri()
    shown = without_credentials(uri)
    if sys.stderr.isatty():
        sys.stderr.write(f"connecting to {shown}…")
        sys.stderr.flush()
    problem = probe(uri, timeout)
    _done_reading()
    if problem is not None:
        raise UserError(f"cannot reach the tracking server at {shown} ({problem}); check --tracking-uri")
    return uri


def _experiment_id(uri: str, name: str | None, experiment_id: str | None) -> str:
    try:
        return find_experiment(uri, name, experiment_id, create=False)
    except LookupError as exc:
        raise UserError(str(exc)) from None
    except MlflowException as exc:
        what = f"experiment {name!r}" if name else f"experiment ID {experiment_id}"
        raise UserError(f"{what}: {exc.message}") from None


def _progress(stream: TextIO) -> Any:
    if not stream.isatty():
        return None

    def show(seen: int) -> None:
        stream.write(f"\rread {seen} traces…")
        stream.flush()

    return show


def _percent(value: float) -> str:
    return f"{value:.1f}%"


def format_table(report: dict[str, Any]) -> str:
    """The report as text for a terminal."""
    out = io.StringIO()
    window = report.get("window", {})
    out.write(
        f"Experiment {report.get('experiment')}  {window.get('since') or 'start'} → {window.get('until') or 'now'}\n\n"
    )
    out.write(f"  traced requests       {report['total_traces']}\n")
    out.write(f"  with feedback         {report['traces_with_feedback']}  ({_percent(report['feedback_rate'])})\n")
    out.write(
        f"  thumbs                {report['positive_count']} up / {report['negative_count']} down"
        f"  ({_percent(report['thumbs_positive_rate'])} of thumbs votes up)\n"
    )
    out.write(
        f"  positive rate         {_percent(report['positive_rate'])}"
        "  (MLflow guide's: thumbs up per request with any feedback)\n"
    )
    if report.get("withdrawn_count"):
        out.write(f"  withdrawn votes       {report['withdrawn_count']}  (not counted above)\n")
    for name, signal in report.get("signals", {}).items():
        out.write(f"  {name:<21} {signal['count']}  ({_percent(signal['rate'])} of traced requests)\n")
    if report["ratings"]:
        out.write("\nRatings\n")
        for dimension, stats in report["ratings"].items():
            scale = stats.get("scale_max")
            mean = stats["mean_on_scale"] if scale else stats["mean"]
            distribution = stats["distribution_on_scale"] if scale else stats["distribution"]
            spread = "  ".join(f"{value}: {count}" for value, count in distribution.items())
            out.write(
                f"  {dimension:<20} mean {mean:.2f} {f'of {scale:g}' if scale else '(0-1)'}"
                f"  n={stats['count']}   {spread}\n"
            )
    for name, counts in report["categories"].items():
        out.write(f"\n{name}\n")
        for value, count in counts.items():
            out.write(f"  {value:<30} {count}\n")
    if report["latest_negative_comments"]:
        out.write("\nLatest negative comments\n")
        for comment in report["latest_negative_comments"]:
            out.write(f"  {comment['time']}  {comment['user']}: {comment['comment']}\n")
    if "agreement" in report:
        out.write(format_agreement(report["agreement"]))
    if "groups" in report:
        out.write(f"\nBy {report['grouped_by']}\n")
        width = max([len(k) for k in report["groups"]] + [5])
        out.write(f"  {'group':<{width}}  requests  feedback  rate     positive\n")
        for key, group in report["groups"].items():
            out.write(
                f"  {key:<{width}}  {group['total_traces']:>8}  {group['traces_with_feedback']:>8}"
                f"  {_percent(group['feedback_rate']):>6}  {_percent(group['positive_rate']):>8}\n"
            )
    return out.getvalue()


def format_agreement(figures: dict[str, Any]) -> str:
    """The users-versus-judges section of the text report."""
    out = io.StringIO()
    out.write(
        f"\nUsers versus judges  ({figures['traces_with_both']} traces with both;"
        f" {figures['traces_with_tied_users']} with tied users left out)\n"
    )
    if not figures["judges"]:
        out.write("  no trace has both end-user votes and a judge's or scorer's feedback\n")
    for judge, stats in figures["judges"].items():
        kappa = stats["cohens_kappa"]
        rate = stats["agreement_rate"]
        confusion = stats["confusion"]
        out.write(
            f"  {judge:<40} agree {'-' if rate is None else _percent(rate):>6}"
            f"  kappa {'-' if kappa is None else f'{kappa:.2f}':>5}  n={stats['traces_compared']}"
            f"  users+/judge-: {confusion['users_positive']['judge_fail']}"
            f"  users-/judge+: {confusion['users_negative']['judge_pass']}\n"
        )
        for case in stats["disagreements"][:5]:
            why = f"  ({case['judge_rationale']})" if case["judge_rationale"] else ""
            out.write(
                f"      {case['time']}  {case['trace_id']}  users {case['users']}, judge {case['judge']!r}{why}\n"
            )
    return out.getvalue()


def format_csv(report: dict[str, Any]) -> str:
    """One row for the whole window, then one per group; rating means and counts as columns."""
    rows = [("(all)", report), *report.get("groups", {}).items()]
    dimensions = sorted({d for _, r in rows for d in r["ratings"]})
    columns = ["group", "total_traces", "traces_with_feedback", "feedback_rate", "positive_rate"]
    columns += ["positive_count", "negative_count", "thumbs_positive_rate"]
    columns += [f"rating_{d}_{stat}" for d in dimensions for stat in ("mean", "count")]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for key, figures in rows:
        ratings = figures["ratings"]
        row = [key] + [figures[c] for c in columns[1:8]]
        row += [ratings.get(d, {}).get(stat, "") for d in dimensions for stat in ("mean", "count")]
        writer.writerow(row)
    return out.getvalue()


def _window(args: argparse.Namespace) -> tuple[str, int | None, int | None]:
    """The experiment and time window the command line names (connecting to its tracking server)."""
    if args.tracking_uri:
        mlflow.set_tracking_uri(args.tracking_uri)
    experiment_id = _experiment_id(_connect(args.timeout), args.experiment, args.experiment_id)
    return experiment_id, parse_time(args.since) if args.since else None, parse_time(args.until) if args.until else None


def _done_reading() -> None:
    if sys.stderr.isatty():
        sys.stderr.write("\r\033[K")  # clear the progress line


def _writable(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise UserError(f"cannot write {path}: {folder} is not a folder this user can write to")


def _report(args: argparse.Namespace) -> int:
    # Everything the user named is checked before the (possibly long) read from the server.
    try:
        schema = FeedbackSchema.load(args.schema) if args.schema else None
    except (OSError, ValueError) as exc:
        raise UserError(f"--schema {args.schema}: {exc}") from None
    if args.html:
        _writable(args.html)
    experiment_id, since, until = _window(args)
    requests = list(search_requests(experiment_id, since, until, _progress(sys.stderr)))
    _done_reading()
    window = {k: None if ms is None else iso_time(ms) for k, ms in (("since", since), ("until", until))}
    report = build_report(requests, args.by, schema, experiment=args.experiment or experiment_id, window=window)
    if args.agreement:
        from .agreement import agreement

        report["agreement"] = agreement(requests, schema, args.judge_threshold)
    if args.html:
        from .report_html import write_html

        by_time = args.by if args.by in ("day", "hour") else "day"
        timeline = report["groups"] if args.by == by_time else build_report(requests, by_time, schema)["groups"]
        write_html(report, timeline, args.html, by_time)
    if args.format == "json":
        sys.stdout.write(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    else:
        sys.stdout.write(format_csv(report) if args.format == "csv" else format_table(report))
    return 0


def _export(args: argparse.Namespace) -> int:
    from .datasets import feedback_records, to_mlflow_dataset, write_jsonl

    if args.output != "-":
        _writable(args.output)
    experiment_id, since, until = _window(args)
    records = list(feedback_records(experiment_id, args.only, since, until, _progress(sys.stderr)))
    _done_reading()
    if args.output == "-":
        write_jsonl(records, sys.stdout)
    else:
        with open(args.output, "w", encoding="utf-8") as out:
            write_jsonl(records, out)
    message = f"{len(records)} records"
    if args.dataset:
        try:
            message += f"; MLflow evaluation dataset {to_mlflow_dataset(records, args.dataset, experiment_id)}"
        except RuntimeError as exc:
            raise UserError(str(exc)) from None
    print(f"mlflow-feedback: {message}", file=sys.stderr)
    return 0


def _options(args: argparse.Namespace) -> int:
    from ..config import options_table

    print(options_table(), end="")
    return 0


def parser() -> argparse.ArgumentParser:
    """The command line: ``mlflow-feedback report|export|options ...``."""
    top = argparse.ArgumentParser(prog="mlflow-feedback", description="Reports on end-user feedback in MLflow.")
    commands = top.add_subparsers(dest="command", required=True)
    report = commands.add_parser("report", help="feedback rate, positive rate, ratings and comments")
    export = commands.add_parser("export", help="traces with matching feedback as evaluation records (JSONL)")
    for command in (report, export):
        which = command.add_mutually_exclusive_group(required=True)
        which.add_argument("--experiment", help="experiment name")
        which.add_argument("--experiment-id", help="experiment ID")
        command.add_argument("--tracking-uri", help="tracking server (default: MLFLOW_TRACKING_URI)")
        command.add_argument("--since", help="start of the window: 24h, 7d, 30m ago, or an ISO date/time (UTC)")
        command.add_argument("--until", help="end of the window (exclusive), same forms; default now")
        command.add_argument(
            "--timeout", type=float, default=30.0, help="seconds to wait for the tracking server (default 30)"
        )
    report.add_argument("--by", choices=GROUPINGS, help="also report per day, hour, route, user or session")
    report.add_argument("--format", choices=("table", "json", "csv"), default="table")
    report.add_argument("--html", metavar="FILE", help="also write a self-contained HTML page with charts")
    report.add_argument("--schema", metavar="FILE", help="feedback schema (TOML or JSON): what counts as positive")
    report.add_argument(
        "--agreement",
        action="store_true",
        help="also compare end users with LLM judges and code scorers: agreement, Cohen's kappa, disagreements",
    )
    report.add_argument(
        "--judge-threshold",
        type=float,
        default=0.5,
        metavar="SCORE",
        help="a numeric judge score at or above this approves (default 0.5)",
    )
    report.set_defaults(run=_report)
    export.add_argument(
        "--only",
        default="negative",
        help="negative (default), positive, commented, corrected, rating-below:<0-1>, or any",
    )
    export.add_argument("--output", default="-", help="JSONL file (default: standard output)")
    export.add_argument("--dataset", metavar="NAME", help="also store as an MLflow evaluation dataset (full mlflow)")
    export.set_defaults(run=_export)
    options = commands.add_parser(
        "options", help="the middleware's arguments: defaults, MLFLOW_FEEDBACK_* variables, descriptions (Markdown)"
    )
    options.set_defaults(run=_options)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mlflow-feedback`` command."""
    args = parser().parse_args(argv)
    for value in (getattr(args, "since", None), getattr(args, "until", None)):  # validate before any network call
        if value:
            try:
                parse_time(value)
            except ValueError as exc:
                parser().error(str(exc))
    if args.command == "report" and args.agreement and args.format == "csv":
        parser().error("--agreement is shown in the table, json and --html formats, not csv")
    if args.command == "export":
        from .datasets import selector

        try:
            selector(args.only)
        except ValueError as exc:
            parser().error(str(exc))
    run: Any = args.run
    try:
        return int(run(args))
    except UserError as exc:
        print(f"mlflow-feedback: {exc}", file=sys.stderr)
        return 2
    except MlflowException as exc:  # the server refused a read: its message, not a traceback
        print(f"mlflow-feedback: the tracking server answered: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
