"""The example app's page in real headless Chromium (Debian's), driven by Playwright: ask, stream, click 👍 and
👎 with a comment, go offline and back, double-click; then check the assessments in MLflow."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mlflow_feedback_middleware.insight.report import build_report, search_requests
from mlflow_feedback_middleware.intake.models import SIGNAL_KEY, is_retraction

from .support import CHROMIUM_FLAGS, ROOT, MlflowServer, chromium_or_skip, get_trace, serve_demo, wait_until


@pytest.fixture
def demo_app(mlflow_server: MlflowServer, experiment_name: str, tmp_path: Path) -> Iterator[str]:
    """examples/chat_app.py under uvicorn, on the test server, as `make demo` serves it."""
    with serve_demo(sys.executable, mlflow_server.url, experiment_name, tmp_path) as url:
        yield url


@pytest.fixture
def browser() -> Iterator[Any]:
    chromium = chromium_or_skip()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_FLAGS)
        try:
            yield launched
        finally:
            launched.close()


def ask(page: Any, question: str, stream: bool) -> Any:
    """Type a question, send it, and wait until its answer's feedback buttons are enabled; the turn."""
    page.set_checked("#stream", stream)
    page.fill("#message", question)
    page.click("#ask button[type=submit]")
    # Turns are prepended: pin this one by its question, not by position.
    turn = page.locator(".turn", has=page.locator(".question", has_text=question))
    turn.wait_for()
    turn.locator("button[aria-label='Good answer']:not([disabled])").wait_for(timeout=30_000)
    return turn


def trace_id_of(turn: Any) -> str:
    return str(turn.locator(".ids").inner_text().split()[1])


def human_votes(trace_id: str, count: int, timeout: float = 30) -> list[Any]:
    deadline = time.monotonic() + timeout
    while True:
        votes = [a for a in get_trace(trace_id).info.assessments if a.source.source_type == "HUMAN"]
        if len(votes) >= count or time.monotonic() > deadline:
            return votes
        time.sleep(0.3)


def test_the_demo_page_collects_feedback_in_chromium(demo_app: str, browser: Any) -> None:
    context = browser.new_context()
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    missing: list[str] = []  # e.g. a favicon the page asks for and the app does not serve
    page.on("response", lambda response: response.status == 404 and missing.append(response.url))
    page.goto(demo_app)

    streamed = ask(page, "tell me about mlflow", stream=True)
    assert "MLflow records each request" in streamed.locator(".answer").inner_text()
    streamed.locator("button[aria-label='Good answer']").click()
    streamed.locator(".mlflow-feedback-status", has_text="Thanks").wait_for()
    assert streamed.locator("button[aria-label='Good answer']").get_attribute("aria-pressed") == "true"
    assert streamed.locator("button[aria-label='Good answer']").inner_text() == "Helpful"  # a word, not an emoji
    streamed.locator("button[aria-label='Bad answer']").click()  # the visitor changes their mind
    streamed.locator("button[aria-label='Bad answer'][aria-pressed=true]").wait_for()
    link = streamed.locator(".trace-link").get_attribute("href") or ""
    assert "/#/experiments/" in link and link.endswith(trace_id_of(streamed)), link

    answered = ask(page, "how does feedback work", stream=False)
    answered.locator(".mlflow-feedback-comment").fill("too vague")
    answered.locator("button[aria-label='Bad answer']").click()
    answered.locator(".mlflow-feedback-status", has_text="Thanks").wait_for()

    offline = ask(page, "offline question", stream=False)
    context.set_offline(True)
    offline.locator("button[aria-label='Good answer']").click()
    offline.locator(".mlflow-feedback-status", has_text="Offline").wait_for()
    context.set_offline(False)  # the browser's "online" event sends what waited
    offline.locator(".mlflow-feedback-status", has_text="Thanks").wait_for(timeout=30_000)
    assert offline.locator("button[aria-label='Good answer']").get_attribute("aria-pressed") == "true"

    withdrawn = ask(page, "never mind", stream=False)
    withdrawn.locator("button[aria-label='Good answer']").click()
    withdrawn.locator(".mlflow-feedback-status", has_text="Thanks").wait_for()
    withdrawn.locator("button[aria-label='Good answer']").click()  # pressed again: the vote is taken back
    withdrawn.locator(".mlflow-feedback-status", has_text="withdrawn").wait_for()
    assert withdrawn.locator("button[aria-pressed=true]").count() == 0

    doubled = ask(page, "double click", stream=True)
    doubled.locator("button[aria-label='Good answer']").dblclick()
    doubled.locator(".mlflow-feedback-status", has_text="Thanks").wait_for()

    artifacts = ROOT / "tests" / "artifacts"
    artifacts.mkdir(exist_ok=True)
    page.screenshot(path=str(artifacts / "demo-page.png"), full_page=True)
    assert errors == [] and missing == []

    wait_until(lambda: httpx.get(demo_app + "/feedback/health").json()["outbox"]["pending"] == 0, 60, "drained")
    streamed_votes = human_votes(trace_id_of(streamed), 2)
    # One vote, the visitor's last: the page sends a stable anonymous visitor ID, so a flip overrides the vote
    # (MLflow keeps the first, invalid).
    assert [(v.name, v.value) for v in streamed_votes if v.valid] == [("user_feedback", False)], streamed_votes
    assert [v.value for v in streamed_votes if not v.valid] == [True]
    assert streamed_votes[0].source.source_id.startswith("visitor-")
    withdrawn_votes = sorted(human_votes(trace_id_of(withdrawn), 2), key=lambda v: v.create_time_ms)
    assert [(v.value, v.valid, is_retraction(v.metadata)) for v in withdrawn_votes] == [
        (True, False, False),
        (None, True, True),
    ]
    answered_votes = human_votes(trace_id_of(answered), 1)
    assert [(v.value, v.rationale) for v in answered_votes] == [(False, "too vague")]
    assert [v.value for v in human_votes(trace_id_of(offline), 1)] == [True]
    assert len(human_votes(trace_id_of(doubled), 1)) == 1  # two clicks, one vote, and no second one queued
    context.close()


def signals_on(trace_id: str, count: int) -> list[tuple[str, Any]]:
    """The implicit signals stored on a trace, once there are `count` of them."""
    deadline = time.monotonic() + 30
    while True:
        found = [
            (a.name, a.value)
            for a in get_trace(trace_id).info.assessments
            if a.source.source_type == "HUMAN" and SIGNAL_KEY in (a.metadata or {})
        ]
        if len(found) >= count or time.monotonic() > deadline:
            return sorted(found)
        time.sleep(0.3)


def test_the_demo_page_reports_what_users_do_in_chromium(demo_app: str, browser: Any, experiment_name: str) -> None:
    """Copy an answer (twice), regenerate one, edit and resend a question, stop a stream, leave one answer
    unrated and leave the page: each is one signal on its answer, and the report counts them against the
    traced requests."""
    context = browser.new_context()
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(demo_app)

    copied = ask(page, "tell me about mlflow", stream=False)
    for _ in range(2):  # copied twice: one signal
        copied.locator(".answer").click(click_count=3)  # select the answer's text
        page.keyboard.press("Control+C")
    copied.locator("button[aria-label='Good answer']").click()
    copied.locator(".mlflow-feedback-status", has_text="Thanks").wait_for()

    regenerated = ask(page, "how does feedback work", stream=False)
    regenerated_id = trace_id_of(regenerated)  # before a second turn asks the same question
    regenerated.locator(".regenerate").click()
    again = page.locator(".turn", has=page.locator(".question", has_text="how does feedback work")).first
    again.locator("button[aria-label='Good answer']:not([disabled])").wait_for()
    again.locator("button[aria-label='Bad answer']").click()  # the new answer gets a vote, so it is not "left"
    again.locator(".mlflow-feedback-status", has_text="Thanks").wait_for()

    edited = ask(page, "what is a trace", stream=False)
    edited.locator(".edit").click()
    page.fill("#message", "what is an MLflow trace")
    page.click("#ask button[type=submit]")
    rewritten = page.locator(".turn", has=page.locator(".question", has_text="what is an MLflow trace"))
    rewritten.locator("button[aria-label='Good answer']:not([disabled])").wait_for()

    page.set_checked("#stream", True)
    long_question = "please explain " + " ".join(f"point{i}" for i in range(80))
    page.fill("#message", long_question)
    page.click("#ask button[type=submit]")
    stopped = page.locator(".turn", has=page.locator(".question", has_text="point79"))
    stopped.locator(".stop:not([hidden])").wait_for()
    stopped.locator(".answer", has_text="You").wait_for()  # the first tokens are in
    stopped.locator(".stop").click()
    stopped.locator(".answer", has_text="[stopped]").wait_for()

    trace_ids = {
        name: trace_id_of(turn) for name, turn in (("copied", copied), ("edited", edited), ("stopped", stopped))
    }
    trace_ids["regenerated"] = regenerated_id
    trace_ids["rewritten"] = trace_id_of(rewritten)  # answered, not reacted to: "left" when the page goes
    assert errors == []
    page.goto("about:blank")  # leave the page: unreacted answers are reported with keepalive requests
    context.close()

    assert signals_on(trace_ids["copied"], 1) == [("copied_answer", True)]
    assert signals_on(trace_ids["regenerated"], 1) == [("regenerated", True)]
    assert signals_on(trace_ids["edited"], 1) == [("edited_question", True)]
    assert signals_on(trace_ids["stopped"], 1) == [("stopped_stream", True)]
    assert signals_on(trace_ids["rewritten"], 1) == [("left_without_reacting", True)]
    wait_until(lambda: httpx.get(demo_app + "/feedback/health").json()["outbox"]["pending"] == 0, 60, "drained")
    assert signals_on(trace_ids["copied"], 2) == [("copied_answer", True)]  # and never a second one

    experiment_id = get_trace(trace_ids["copied"]).info.experiment_id
    report = build_report(search_requests(experiment_id))
    traced = report["total_traces"]
    assert traced == 6  # six answers: the regenerated one's second answer included
    assert report["signals"] == {
        name: {"count": 1, "rate": pytest.approx(100 / traced)}
        for name in ("copied_answer", "edited_question", "left_without_reacting", "regenerated", "stopped_stream")
    }
    assert (report["traces_with_feedback"], report["positive_count"], report["negative_count"]) == (2, 1, 1)


def test_the_client_is_served_as_a_module(demo_app: str) -> None:
    response = httpx.get(demo_app + "/feedback/client.js")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/javascript")
    for name in (
        "export function idsFromResponse",
        "export function retractFeedback",
        "export async function readEventStream",
        "export class FeedbackControl",
    ):
        assert name in response.text
