"""The README's quick start, as a newcomer runs it: the package's wheel installed in a fresh virtual environment,
the README's `app.py` under uvicorn, a question and a vote over HTTP, and the vote read back from MLflow. The
suite's tracking server stands in for the `mlflow server` the README starts."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx

from .support import ROOT, MlflowServer, answers, get_trace, launch, wait_until


def readme_app() -> str:
    """The README's `app.py`, exactly as it stands there."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    [app] = [block for block in blocks if block.startswith("# app.py\n")]
    return app


def test_the_readme_quick_start_works_from_the_wheel(mlflow_server: MlflowServer, tmp_path: Path) -> None:
    def run(*command: str | Path) -> None:
        done = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=900, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]

    run(sys.executable, "-m", "build", "--wheel", "--outdir", tmp_path / "dist", ROOT)
    [wheel] = (tmp_path / "dist").glob("mlflow_feedback_middleware-*.whl")
    run(sys.executable, "-m", "venv", tmp_path / "venv")
    python = tmp_path / "venv" / "bin" / "python"
    run(python, "-m", "pip", "install", "--disable-pip-version-check", "-q", wheel, "fastapi", "uvicorn")
    (tmp_path / "app.py").write_text(readme_app())

    command = [str(python), "-m", "uvicorn", "app:app", "--host", "127.0.0.1", "--port"]
    env = {"PATH": "/usr/bin:/bin", "MLFLOW_TRACKING_URI": mlflow_server.url}
    process, port = launch(
        lambda port: [*command, str(port)],
        tmp_path / "app.log",
        lambda port: answers(f"http://127.0.0.1:{port}", "/docs"),
        timeout=120,
        cwd=tmp_path,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        answer = httpx.post(f"{url}/chat", json={"message": "hi"}, timeout=30)
        assert answer.status_code == 200 and answer.json() == {"answer": "You said: hi"}
        trace_id = answer.headers["x-mlflow-trace-id"]
        vote = httpx.post(
            f"{url}/feedback?trace_id={trace_id}", json={"is_correct": True, "comment": "spot on"}, timeout=60
        )
        # 202 while MLflow is still exporting the trace, as the README says; 200 if it was quick.
        assert (vote.status_code, vote.json()["status"]) in ((200, "success"), (202, "accepted")), vote.text
    finally:
        process.terminate()
        process.wait(timeout=30)

    def voted() -> list[object]:
        return [a for a in get_trace(trace_id).info.assessments if a.source.source_type == "HUMAN"]

    [assessment] = wait_until(voted, 60, "the vote is in MLflow")
    assert (assessment.name, assessment.value, assessment.rationale) == ("user_feedback", True, "spot on")
    log = (tmp_path / "app.log").read_text()
    # The start-up lines the README describes, with level and logger name.
    assert "INFO mlflow_feedback_middleware: tracing requests to experiment 'quickstart'" in log, log
    assert "WARNING mlflow_feedback_middleware: the feedback route /feedback is unauthenticated" in log
