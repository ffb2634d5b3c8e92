"""03 · Signed feedback tokens: only the client that got an answer can rate it, as the user it was given to.

Each answer carries ``X-MLflow-Feedback-Token``; the feedback route requires it back (header or body) and
refuses a vote for another trace or from another user. Share one secret between the replicas of a service.

    MLFLOW_FEEDBACK_SECRET=$(python -c 'import secrets; print(secrets.token_hex(32))') \
    MLFLOW_TRACKING_URI=http://127.0.0.1:5000 uvicorn 03_signed_feedback:app --port 8000
    curl -si -X POST localhost:8000/chat -H 'X-User-ID: ann' -H 'Content-Type: application/json' -d '{"message": "hi"}'
    curl -s -X POST localhost:8000/feedback -H 'Content-Type: application/json' \
         -H 'X-MLflow-Feedback-Token: <the token>' -d '{"is_correct": false, "comment": "wrong"}'
"""

import os
import secrets

from fastapi import FastAPI

from mlflow_feedback_middleware import MlflowFeedbackMiddleware

app = FastAPI()
app.add_middleware(
    MlflowFeedbackMiddleware,
    experiment_name="signed-feedback",
    # From the environment in production; a fresh one here only so the example runs as it is.
    feedback_secret=os.environ.get("MLFLOW_FEEDBACK_SECRET") or secrets.token_hex(32),
)


@app.post("/chat")
async def chat(body: dict) -> dict:
    return {"answer": f"You said: {body.get('message', '')}"}
