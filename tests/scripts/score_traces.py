"""A code scorer over an experiment's traces through mlflow.genai.evaluate (full mlflow), which logs its
verdicts on the traces themselves (source CODE): tracking URI and experiment ID in argv.

`evaluate` only warns when it cannot store a verdict (a busy sqlite server: "database is locked"), so the traces
left without one are evaluated again, once, and the JSON says how many were.

Run by the tests in a fresh process; prints one JSON line."""

import json
import logging
import sys

import mlflow
from mlflow.genai.scorers import scorer

uri, experiment_id = sys.argv[1:3]
mlflow.set_tracking_uri(uri)
mlflow.set_experiment(experiment_id=experiment_id)


@scorer
def on_topic(inputs) -> str:
    """Approves the answers to questions whose number is not a multiple of 3 (what the test expects)."""
    return "no" if int(inputs["body"]["message"].split()[-1]) % 3 == 0 else "yes"


class Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage()[:500])


def unscored():
    traces = mlflow.search_traces(locations=[experiment_id], return_type="list")
    return [t for t in traces if not any(a.name == "on_topic" for a in t.info.assessments)]


warnings = Warnings()
logging.getLogger("mlflow").addHandler(warnings)
traces = mlflow.search_traces(locations=[experiment_id])
result = mlflow.genai.evaluate(data=traces, scorers=[on_topic])
missed = unscored()
if missed:
    mlflow.genai.evaluate(data=missed, scorers=[on_topic])
print(
    json.dumps(
        {
            "rows": len(result.tables["eval_results"]),
            "evaluated_again": len(missed),
            "unscored": len(unscored()),
            "warnings": warnings.messages,
        }
    )
)
