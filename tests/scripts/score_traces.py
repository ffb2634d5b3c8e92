"""A code scorer over an experiment's traces through mlflow.genai.evaluate (full mlflow), which logs its
verdicts on the traces themselves (source CODE): tracking URI and experiment ID in argv.

Run by the tests in a fresh process; prints one JSON line."""

import json
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


traces = mlflow.search_traces(locations=[experiment_id])
result = mlflow.genai.evaluate(data=traces, scorers=[on_topic])
print(json.dumps({"rows": len(result.tables["eval_results"])}))
