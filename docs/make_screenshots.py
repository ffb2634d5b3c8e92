"""Regenerate the pictures in docs/images/ (`make screenshots`): the demo page with rated answers, an HTML report of
those votes, and the MLflow UI showing one answer's trace with its vote.

It starts a throwaway `mlflow server` (sqlite, in a temporary folder), the demo app on it, and drives Debian's
headless Chromium through the page as a visitor would: ask, rate, comment. Nothing touches examples/mlflow.db.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support import CHROMIUM_FLAGS, answers, chromium_or_skip, launch  # noqa: E402

IMAGES = ROOT / "docs" / "images"
MLFLOW_VENV = ROOT / ".venv-mlflow" / "bin"
QUESTIONS = [
    ("tell me about mlflow", "Good answer", ""),
    ("how does feedback work", "Bad answer", "too vague: which route?"),
    ("what is a trace", "Good answer", ""),
]


def main() -> None:
    IMAGES.mkdir(parents=True, exist_ok=True)
    chromium = chromium_or_skip()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="mlflow-feedback-shots-") as folder:
        work = Path(folder)
        server, server_port = launch(
            lambda port: [
                str(MLFLOW_VENV / "mlflow"),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--backend-store-uri",
                f"sqlite:///{work / 'mlflow.db'}",
                "--default-artifact-root",
                str(work / "a"),
            ],
            work / "server.log",
            lambda port: answers(f"http://127.0.0.1:{port}"),
            cwd=work,
        )
        ui = f"http://127.0.0.1:{server_port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "OTEL_"))}
        env |= {"MLFLOW_TRACKING_URI": ui, "MLFLOW_UI_URL": ui, "MLFLOW_FEEDBACK_OUTBOX": str(work / "outbox.db")}
        demo, demo_port = launch(
            lambda port: [str(MLFLOW_VENV / "python"), "-m", "uvicorn", "chat_app:app", "--port", str(port)],
            work / "demo.log",
            lambda port: answers(f"http://127.0.0.1:{port}", "/feedback/health"),
            cwd=ROOT / "examples",
            env=env | {"PORT": "8000"},
        )
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
                page = browser.new_page(viewport={"width": 1100, "height": 900})
                page.goto(f"http://127.0.0.1:{demo_port}/")
                for question, vote, comment in QUESTIONS:
                    page.fill("#message", question)
                    page.click("#ask button[type=submit]")
                    turn = page.locator(".turn", has=page.locator(".question", has_text=question))
                    turn.locator(f"button[aria-label='{vote}']:not([disabled])").wait_for(timeout=30_000)
                    if comment:
                        turn.locator(".mlflow-feedback-comment").fill(comment)
                    turn.locator(f"button[aria-label='{vote}']").click()
                    turn.locator(".mlflow-feedback-status", has_text="Thanks").wait_for(timeout=30_000)
                page.screenshot(path=str(IMAGES / "demo-page.png"))
                link = page.locator(".turn", has_text="how does feedback work").locator(".trace-link")
                trace_url = link.get_attribute("href") or ui
                _drained(f"http://127.0.0.1:{demo_port}")

                report = work / "report.html"
                subprocess.run(
                    [
                        str(MLFLOW_VENV / "mlflow-feedback"),
                        "report",
                        "--experiment",
                        "feedback-demo",
                        "--html",
                        str(report),
                    ],
                    env=env,
                    check=True,
                    capture_output=True,
                )
                page.goto(report.as_uri())
                page.screenshot(path=str(IMAGES / "report.png"), full_page=True)

                page.set_viewport_size({"width": 1400, "height": 900})
                # MLflow 3.17+ opens its Assistant panel over the trace on a first visit; this visitor has seen it
                page.add_init_script("localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true')")
                page.goto(trace_url)
                page.get_by_text("POST /chat").first.wait_for(timeout=60_000)
                time.sleep(2)  # the UI animates its panels in; a picture, not a test
                _try(lambda: page.locator("button", has_text="Assess").first.click(timeout=5_000))  # the votes
                _try(lambda: page.get_by_text("user_feedback").first.wait_for(timeout=10_000))
                time.sleep(1)
                page.screenshot(path=str(IMAGES / "mlflow-ui-trace.png"))
                browser.close()
        finally:
            for process in (demo, server):
                process.terminate()
                process.wait(timeout=30)
    print(f"wrote {', '.join(p.name for p in sorted(IMAGES.glob('*.png')))} in {IMAGES}")


def _try(step: Any) -> None:
    """A step that makes the picture better where this MLflow version's UI has the element; skipped where not."""
    try:
        step()
    except Exception as exc:
        print(f"screenshot step skipped: {exc}".splitlines()[0])


def _drained(url: str) -> None:
    """Wait until every vote the demo accepted is in MLflow."""
    deadline = time.monotonic() + 60
    while httpx.get(f"{url}/feedback/health").json()["outbox"]["pending"] and time.monotonic() < deadline:
        time.sleep(0.5)


if __name__ == "__main__":
    main()
