"""The default comment scrubber: what it takes out of feedback text, and what it leaves. No server."""

from __future__ import annotations

import pytest

from mlflow_feedback_middleware.intake.models import Assessment, scrub_assessments
from mlflow_feedback_middleware.intake.scrubbing import SCRUBBED_KEY, found_kinds, scrub_personal_data


@pytest.mark.parametrize(
    ("text", "cleaned"),
    [
        ("mail me at ann.lee+bot@example.co.uk please", "mail me at [email] please"),
        ("call +44 20 7946 0958 or (555) 123-4567", "call [phone] or [phone]"),
        ("card 4111 1111 1111 1111 was charged twice", "card [card] was charged twice"),
        ("my key sk-proj-abcdefghijklmnop1234 leaked", "my key [secret] leaked"),
        ("AKIAIOSFODNN7EXAMPLE and ghp_0123456789abcdefghijklmnopqrstuvwxyzAB", "[secret] and [secret]"),
    ],
)
def test_personal_data_and_secrets_are_replaced_by_their_kind(text: str, cleaned: str) -> None:
    assert scrub_personal_data(text) == cleaned


@pytest.mark.parametrize(
    "text",
    [
        "the answer on 2026-11-30 was wrong",  # a date
        "it listed 3 of 12 steps, version 3.17.2",  # counts and versions
        "order 1234 5678 9012 3456 is not a card",  # 16 digits failing the Luhn check... but a phone-like run
        "max_tokens=4096 is too low",
    ],
)
def test_ordinary_text_is_left_alone(text: str) -> None:
    kept = scrub_personal_data(text)
    assert "[email]" not in kept and "[card]" not in kept and "[secret]" not in kept
    if "order" not in text:
        assert kept == text and found_kinds(text) == []


def test_the_kinds_found_are_noted_never_the_values() -> None:
    votes = [
        Assessment("user_feedback", False, "wrong, write to bob@example.com", {"lang": "en"}),
        Assessment("correction", "use 4111-1111-1111-1111 instead"),
        Assessment("reason", "bob@example.com"),  # a declared choice: not free text, kept
    ]
    out = scrub_assessments(votes, scrub_personal_data, lambda name: name == "correction")
    assert out[0].rationale == "wrong, write to [email]"
    assert out[0].metadata == {"lang": "en", SCRUBBED_KEY: "email"}
    assert out[1].value == "use [card] instead" and out[1].metadata == {SCRUBBED_KEY: "card"}
    assert out[2] is votes[2]


def test_a_custom_scrubber_is_noted_as_such() -> None:
    [out] = scrub_assessments([Assessment("n", True, "secret plan")], lambda t: t.replace("plan", "***"), bool)
    assert out.rationale == "secret ***" and out.metadata == {SCRUBBED_KEY: "custom"}
