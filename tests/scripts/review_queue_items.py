"""A review queue's items and label schemas, read with the full mlflow package: tracking URI, experiment ID and
queue name in argv.

Run by the tests in a fresh process; prints one JSON line."""

import json
import sys

import mlflow
from mlflow.genai import label_schemas, review_queues

uri, experiment_id, name = sys.argv[1:4]
mlflow.set_tracking_uri(uri)
queue = review_queues.get_review_queue(name=name, experiment_id=experiment_id)
items = review_queues.list_review_queue_items(queue.queue_id)
labels = [label_schemas.get_label_schema(schema_id=schema_id) for schema_id in queue.schema_ids]
print(
    json.dumps(
        {
            "items": sorted(item.item_id for item in items),
            "labels": {label.name: type(label.input).__name__ for label in labels},
        }
    )
)
