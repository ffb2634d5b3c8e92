"""Comment hygiene: personal data and secrets taken out of feedback text before it is stored.

End users paste what they should not into a comment box: their email or phone number, a card number, an API key.
The default scrubber replaces each with a marker naming its kind (``[email]``, ``[phone]``, ``[card]``,
``[secret]``), so nothing scrubbed reaches MLflow, the reports or the exports; which kinds were found is recorded
in the assessment's metadata (`SCRUBBED_KEY`), never what they were.
"""

from __future__ import annotations

import re
from collections.abc import Callable

SCRUBBED_KEY = "mlflow_feedback.scrubbed"

# A scrubber takes a text and returns it cleaned; `scrub_personal_data` is the default.
Scrubber = Callable[[str], str]

_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63})*\.[A-Za-z]{2,24}\b")
# Keys with a known shape: OpenAI/Anthropic-style, AWS access key IDs, GitHub, Slack, Google API keys, JWTs, PEM.
_SECRET = re.compile(
    r"\b(?:sk-(?:ant-|proj-)?[A-Za-z0-9_-]{16,}|AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{30,}"
    r"|xox[abposr]-[A-Za-z0-9-]{10,}|AIza[0-9A-Za-z_-]{35}"
    r"|eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,})"
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)"
)
# 13-19 digits, spaces or dashes between groups: a card number when its Luhn checksum holds.
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
# International (+...) or grouped national numbers of 8-15 digits; dates and plain counts are left alone.
_PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,4}(?!\w)")


def _luhn(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char)
        if index % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def found_kinds(text: str) -> list[str]:
    """The kinds of personal data or secrets the default scrubber would take out of `text`."""
    return scrub_and_name(text)[1]


def _card_marker(match: re.Match[str]) -> str:
    return "[card]" if _luhn(re.sub(r"\D", "", match.group())) else match.group()


def _is_phone(candidate: str) -> bool:
    digits = re.sub(r"\D", "", candidate)
    return 8 <= len(digits) <= 15 and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", candidate.strip())


def scrub_personal_data(text: str) -> str:
    """`text` with email addresses, phone numbers, card numbers (Luhn-checked) and API-key shapes replaced by
    ``[email]``, ``[phone]``, ``[card]`` and ``[secret]``. Secrets go first: a key may contain digits."""
    return scrub_and_name(text)[0]


def scrub_and_name(text: str) -> tuple[str, list[str]]:
    """What `scrub_personal_data` makes of `text`, and the kinds it replaced (secret, email, card, phone)."""
    kinds = []
    for kind, pattern, replace in _PASSES:
        cleaned = pattern.sub(replace, text)
        if cleaned != text:
            kinds.append(kind)
        text = cleaned
    return text, kinds


def _phone_marker(match: re.Match[str]) -> str:
    return "[phone]" if _is_phone(match.group()) else match.group()


_PASSES = (
    ("secret", _SECRET, "[secret]"),
    ("email", _EMAIL, "[email]"),
    ("card", _CARD, _card_marker),
    ("phone", _PHONE, _phone_marker),
)
