"""01 · The smallest app: one line of middleware, one route, votes at POST /feedback.

    MLFLOW_TRACKING_URI=http://127.0.0.1:5000 uvicorn 01_quickstart:app --port 8000
    curl -si -X POST localhost:8000/chat -H 'Content-Type: application/json' -d '{"message": "hi"}'
    curl -s -X POST "localhost:8000/feedback?trace_id=<x-mlflow-trace-id>" \
         -H 'Content-Type: application/json' -d '{"is_correct": true, "comment": "spot on"}'
"""

from fastapi import FastAPI

from mlflow_feedback_middleware import MlflowFeedbackMiddleware

app = FastAPI()
app.add_middleware(MlflowFeedbackMiddleware, experiment_name="quickstart")


@app.post("/chat")
async def chat(body: dict) -> dict:
    return {"answer": f"You said: {body.get('message', '')}"}
