"""04 · A feedback schema: what votes this service takes (a thumbs field, a 1-5 rating, a reason from a list), checked
at the route (422 naming the field otherwise) and used by the reports to tell good news from bad.

    MLFLOW_TRACKING_URI=http://127.0.0.1:5000 uvicorn 04_feedback_schema:app --port 8000
    curl -s localhost:8000/feedback/schema
    curl -s -X POST "localhost:8000/feedback?trace_id=<id>" -H 'Content-Type: application/json' \
         -d '{"ratings": {"accuracy": 4}, "name": "reason", "value": "outdated"}'
"""

from fastapi import FastAPI

from mlflow_feedback_middleware import Binary, Categorical, Choice, FeedbackSchema, MlflowFeedbackMiddleware, Scale

REASONS = {
    "helpful": Choice(polarity="positive"),
    "outdated": Choice(polarity="negative"),
    "wrong": Choice(polarity="negative"),
}
SCHEMA = FeedbackSchema(Binary("user_feedback"), Scale("accuracy", min=1, max=5), Categorical("reason", REASONS))

app = FastAPI()
app.add_middleware(MlflowFeedbackMiddleware, experiment_name="schema", feedback_schema=SCHEMA)


@app.post("/chat")
async def chat(body: dict) -> dict:
    return {"answer": f"You said: {body.get('message', '')}"}
