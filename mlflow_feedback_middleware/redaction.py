"""Redaction of secrets in captured bodies, queries and WebSocket turns, before they reach a trace."""

from __future__ import annotations

import functools
import re
from typing import Any

REDACTED = "[REDACTED]"
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
# A "key: value" or "key=value" pair inside text (invalid or truncated JSON, text/plain, form-like strings).
_TEXT_PAIR = re.compile(
    r"""(?P<q>["']?)(?P<key>[A-Za-z_][A-Za-z0-9_.-]{0,63})(?P=q)\s*[:=]\s*"""
    r"""(?P<value>"(?:[^"\\]|\\.)*"?|'[^']*'?|[^\s&,;}\]"']+)"""
)


def normalise_field(name: str) -> str:
    """How field names are compared for redaction: snake_case, lower-case, with '-' the same as '_'."""
    return _CAMEL.sub("_", name).lower().replace("-", "_")


@functools.lru_cache(maxsize=4096)
def is_sensitive(key: str, fields: frozenset[str]) -> bool:
    """Whether a key names a secret: one of `fields` (normalised), or a name ending in one (openai_api_key,
    session_token), or starting with or containing one but "token" (password_confirm, aws_secret_access_key;
    not max_tokens or token_type)."""
    name = normalise_field(key)
    if name in fields:
        return True
    for field in fields:
        if name.endswith("_" + field):
            return True
        if field != "token" and (name.startswith(field + "_") or f"_{field}_" in name):
            return True
    return False


def redact_text(text: str, fields: frozenset[str]) -> str:
    """`text` with the value of every sensitive ``key: value`` / ``key=value`` pair in it replaced."""
    lower = text.lower()
    if not any(stem in lower for stem in _stems(fields)):
        return text  # the common case (an answer, a question): one pass, no pairs to look at

    def replace(match: re.Match[str]) -> str:
        if not is_sensitive(match["key"], fields):
            return match[0]
        value = match["value"]
        quote = value[0] if value[:1] in ("'", '"') else ""
        return match[0][: match.start("value") - match.start()] + f"{quote}{REDACTED}{quote}"

    return _TEXT_PAIR.sub(replace, text)


@functools.lru_cache(maxsize=64)
def _stems(fields: frozenset[str]) -> tuple[str, ...]:
    """Substrings every sensitive key's text contains (its field name, with '_' and '-' either way)."""
    parts = {part for field in fields for part in field.split("_") if len(part) >= 3}
    return tuple(sorted(parts))


def redact(value: Any, fields: frozenset[str]) -> Any:
    """`value` with the values of every sensitive key (see `is_sensitive`), at any depth, replaced; strings
    (text bodies, JSON that did not parse or was cut at the cap) are searched for ``key: value`` pairs."""
    if not fields:
        return value
    if isinstance(value, dict):
        return {
            k: REDACTED if isinstance(k, str) and is_sensitive(k, fields) else redact(v, fields)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact(v, fields) for v in value]
    if isinstance(value, str) and ("=" in value or ":" in value):
        return redact_text(value, fields)
    return value
