"""`mlflow-feedback export --dataset` under the full mlflow package (the CLI's arguments in argv).

Run by the tests in a fresh process; prints one JSON line."""

import json
import sys

from mlflow.genai.datasets import get_dataset

from mlflow_feedback_middleware.insight.cli import main

main(["export", *sys.argv[1:]])
df = get_dataset(name=sys.argv[-1]).to_df()
print(json.dumps({"records": len(df), "with_expectations": int(df["expectations"].notna().sum())}))
