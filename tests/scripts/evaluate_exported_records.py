"""The exported records through mlflow.genai.evaluate (full mlflow): tracking URI, experiment ID, JSONL path in argv.

Run by the tests in a fresh process; prints one JSON line."""

import json
import sys

import mlflow
from mlflow.genai.scorers import scorer

uri, experiment_id, path = sys.argv[1:4]
mlflow.set_tracking_uri(uri)
mlflow.set_experiment(experiment_id=experiment_id)
with open(path) as lines:
    records = [json.loads(line) for line in lines]
data = [{k: r[k] for k in ("inputs", "outputs", "expectations") if r.get(k) is not None} for r in records]


@scorer
def repeats_the_question(inputs, outputs) -> bool:
    return inputs["message"] in outputs["response"]


@scorer
def as_corrected(outputs, expectations) -> bool:
    return outputs["response"] == expectations["expected_response"]


result = mlflow.genai.evaluate(data=data, scorers=[repeats_the_question, as_corrected])
print(json.dumps({"metrics": result.metrics, "rows": len(result.tables["eval_results"])}))
