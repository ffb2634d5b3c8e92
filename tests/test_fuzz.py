"""Hostile input on the feedback routes: property- and schema-based fuzzing over path, query, headers and body.

Raw ASGI calls, so header values can carry what HTTP clients refuse to send (CR/LF, NUL, invalid UTF-8).
Every answer must be a 4xx or a success within the time limit, never a 5xx, no injected header may
appear in a response, and no assessment may land in MLflow but from a request that was answered
200/202. The budget is fixed (``FUZZ_EXAMPLES``, default 250 per test) and the run derandomized, so CI
runs the same corpus every time.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlflow_feedback_middleware import FeedbackRequest
from mlflow_feedback_middleware.delivery.writer import FEEDBACK_ID_KEY

from .apps import build_app
from .support import get_trace, http_scope, outbox_drained

# The strategies' reprs are large (the corpus holds 50 kB strings); hypothesis warns when it prints them.
pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")

SECRET = "fuzzing-secret-0123456789abcdef"
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "250"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)

NASTY_TEXT = [
    "",
    " ",
    "\r\nX-Injected: yes",
    "a\nb",
    "\x00",
    "💥👍👎",
    "ǅ\u202e\u200b",
    "x" * 5000,
    "NaN",
    "Infinity",
    "-1e999",
    "tr-" + "0" * 32,
    "' OR 1=1 --",
    "`tags`.x = 'y'",
    "../../etc/passwd",
    "%0d%0aX-Injected:%20yes",
    "fb-" + "0" * 32,
    # Shapes of the second security review: traversal into the tracking server's API, IDs that make it err,
    # client-chosen request IDs, re-spelled tokens.
    "tr-1/../../../../2.0/mlflow/experiments/get",
    "trace:/c.s/p1",
    "trace:/c.s/" + "a" * 32,
    "trace:/../" + "a" * 32,
    "544",
    "v1.e30.AA==",
    "v1.e30\ud800.AA",
]
NASTY_BODIES = [
    b"[" * 50_000,  # a nesting bomb
    b'{"value": ' + b"[" * 5_000 + b"]" * 5_000 + b', "name": "deep"}',
    b'{"is_correct": NaN}',
    b'{"ratings": {"accuracy": Infinity}}',
    b'{"ratings": {"accuracy": 1e999}}',
    b'{"name": "n", "value": 1' + b"0" * 5_000 + b"}",  # beyond Python's int-parsing limit
    b'{"is_correct": true, "comment": "\\ud800"}',  # a lone surrogate
    b"\xff\xfe\x00garbage",
    b'{"is_correct": true}' * 3,
    b"null",
    b"[]",
    b'"text"',
    b'{"is_correct": true, "feedback_token": {"$ne": null}}',
    b'{"is_correct": true, "user_id": "\\r\\nX-Injected: yes"}',
    b'{"metadata": {"k": {"nested": [1, 2]}}, "is_correct": true}',
    b"is_correct=false&comment=csrf",  # a cross-site form body
    b'{"is_correct": true, "feedback_token": "v1.\ud800.x"}',
    b'{"is_correct": true, "client_request_id": "544"}',
]

CONTENT_TYPES = [b"application/json", b"text/plain", b"", b"application/x-www-form-urlencoded", b"multipart/form-data"]
texts = st.one_of(st.sampled_from(NASTY_TEXT), st.text(max_size=200))
NASTY_HEADER_VALUES = [b"\xb2", b"-1", b"1e3", b"9" * 40, b" 12", b"\xff\xfe", b"a\r\nX-Injected: yes", b"\x00"]
header_values = st.one_of(
    st.sampled_from(NASTY_HEADER_VALUES),
    texts.map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.binary(max_size=100),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | texts,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(texts, children, max_size=4),
    max_leaves=12,
)
FIELDS = [*FeedbackRequest.model_fields, "feedback_token", "user_id"]
loose_bodies = st.fixed_dictionaries({}, optional={f: json_values for f in FIELDS}) | st.dictionaries(
    texts, json_values
)


def from_schema(schema: dict[str, Any], defs: dict[str, Any] | None = None) -> Any:
    """Values valid against a JSON schema, for the subset pydantic emits for `FeedbackRequest`."""
    defs = schema.get("$defs", defs or {})
    if "$ref" in schema:
        return from_schema(defs[schema["$ref"].rsplit("/", 1)[1]], defs)
    if "anyOf" in schema:
        return st.one_of([from_schema(option, defs) for option in schema["anyOf"]])
    kind = schema.get("type")
    if kind == "string":
        if "pattern" in schema:
            return st.from_regex(schema["pattern"], fullmatch=True)
        return st.text(max_size=min(schema.get("maxLength", 200), 200))
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {}), defs), max_size=min(schema.get("maxItems", 5), 5))
    if kind == "object" and "properties" in schema:
        return st.fixed_dictionaries({}, optional={k: from_schema(v, defs) for k, v in schema["properties"].items()})
    if kind == "object":
        pattern, values = next(iter(schema.get("patternProperties", {}).items()), ("", None))
        keys = st.from_regex(pattern, fullmatch=True) if pattern else st.text(max_size=20)
        values = from_schema(values or schema.get("additionalProperties", {"type": "string"}), defs)
        return st.dictionaries(keys, values, max_size=4)
    simple = {
        "boolean": st.booleans(),
        "integer": st.integers(),
        "number": st.floats(allow_nan=False, allow_infinity=False),
        "null": st.none(),
    }
    return simple.get(kind, st.none())


schema_bodies = from_schema(FeedbackRequest.model_json_schema())


def _encode(body: Any) -> bytes:
    return json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")


# Mostly plausible feedback, so that many requests get past the first checks and into MLflow.
plausible_bodies = st.tuples(
    st.fixed_dictionaries({"is_correct": st.booleans()})
    | st.fixed_dictionaries(
        {"ratings": from_schema(FeedbackRequest.model_json_schema()["properties"]["ratings"]["anyOf"][0])}
    ),
    schema_bodies,
).map(lambda parts: {**parts[1], **parts[0]})
bodies = st.one_of(
    plausible_bodies.map(_encode),
    plausible_bodies.map(_encode),
    schema_bodies.map(_encode),
    loose_bodies.map(_encode),
    st.sampled_from(NASTY_BODIES),
    st.binary(max_size=500),
)


class Target:
    """The app under fuzz, a real trace it issued (with its token), and what it accepted."""

    def __init__(self, app: Any, loop: asyncio.AbstractEventLoop, trace_id: str, token: str | None) -> None:
        self.app, self.loop, self.trace_id, self.token = app, loop, trace_id, token
        self.accepted: set[str] = set()

    def call(self, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> Any:
        return self.loop.run_until_complete(
            asyncio.wait_for(asgi_call(self.app, method, path, query, headers, body), 60)
        )


async def asgi_call(
    app: Any, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]], body: bytes
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    chunks = [body[i : i + 700] for i in range(0, len(body), 700)] or [b""]
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await asyncio.sleep(3600)  # a disconnect never comes while the app is still answering
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = http_scope(method, path, query, headers)
    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], start.get("headers", []), b"".join(m.get("body", b"") for m in sent[1:])


def _target(loop: asyncio.AbstractEventLoop, **kwargs: Any) -> Target:
    app = build_app(rate_limit=None, **kwargs)
    status, headers, _ = loop.run_until_complete(
        asgi_call(app, "POST", "/chat", b"", [(b"content-type", b"application/json")], b'{"message": "fuzz me"}')
    )
    assert status == 200
    found = dict(headers)
    trace_id = found[b"x-mlflow-trace-id"].decode()
    get_trace(trace_id)
    token = found.get(b"x-mlflow-feedback-token")
    return Target(app, loop, trace_id, token.decode() if token else None)


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture
def signed(loop: asyncio.AbstractEventLoop, experiment_name: str) -> Iterator[Target]:
    target = _target(loop, experiment_name=experiment_name, feedback_secret=SECRET)
    yield target
    assert_only_accepted_requests_wrote(target)


@pytest.fixture
def open_route(loop: asyncio.AbstractEventLoop, experiment_name: str) -> Iterator[Target]:
    # No secret: any well-formed ID reaches MLflow; a zero wait gets made-up IDs their 404 at once.
    target = _target(loop, experiment_name=experiment_name, feedback_wait_seconds=0)
    yield target
    assert_only_accepted_requests_wrote(target)


def assert_only_accepted_requests_wrote(target: Target) -> None:
    outbox_drained(target.app)  # anything accepted has been written (or failed) by now
    written = {
        (a.metadata or {}).get(FEEDBACK_ID_KEY, "").partition("/")[0]
        for a in get_trace(target.trace_id).info.assessments
        if a.source.source_type == "HUMAN"
    }
    assert written <= target.accepted, f"written by rejected requests: {written - target.accepted}"
    # A fuzz run that never got past validation would prove nothing about the write path.
    assert len(target.accepted) >= 3, f"only {len(target.accepted)} fuzzed requests were accepted"


def check_answer(
    target: Target, method: str, path: str, status: int, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    health = method == "GET" and path == "/feedback/health"
    assert status < 500 or (health and status == 503), (status, body[:500])  # 503: health says "degraded"
    for name, value in headers:
        assert b"\r" not in value and b"\n" not in value and b"injected" not in name.lower(), (name, value)
    payload = json.loads(body)  # every answer is JSON
    if method == "GET" and status == 200:
        assert health or payload["feedback_id"], payload
    elif status in (200, 202):
        assert payload["status"] in ("success", "accepted"), payload
        target.accepted.add(payload["feedback_id"])
    else:
        assert payload["status"] == "error" and payload["message"], payload


def fuzz_request(target: Target, draw: Any, with_token: bool) -> None:
    """One request with drawn parts; half of them carry the real trace ID and, if any, its token."""
    real = with_token and draw(st.booleans())
    query: dict[str, str] = draw(
        st.dictionaries(st.sampled_from(["trace_id", "client_request_id", "user_id", "x"]), texts, max_size=3)
    )
    if real:
        query["trace_id"] = target.trace_id
    headers = [(b"content-type", draw(st.sampled_from(CONTENT_TYPES)))]
    for name in draw(
        st.lists(
            st.sampled_from(
                [b"x-user-id", b"x-mlflow-feedback-token", b"idempotency-key", b"content-length", b"x-request-id"]
            ),
            max_size=4,
        )
    ):
        headers.append((name, draw(header_values)))
    if real and target.token:
        headers.append((b"x-mlflow-feedback-token", target.token.encode()))
    other_paths = st.sampled_from(["/feedback/health", "/feedback/x", "/feedback/fb-" + "0" * 32])
    route = draw(st.integers(0, 9))  # mostly the POST route, where the logic is
    path = "/feedback" if route < 7 else draw(other_paths if route < 9 else texts.map(lambda t: "/feedback/" + t))
    method = "POST" if route < 6 else draw(st.sampled_from(["GET", "POST", "PUT", "OPTIONS"]))
    query_string = "&".join(
        f"{quote(k)}={quote(v, safe='', errors='surrogatepass')}" for k, v in query.items()
    ).encode()
    status, response_headers, body = target.call(method, path, query_string, headers, draw(bodies))
    check_answer(target, method, path, status, response_headers, body)


@FUZZ
@given(data=st.data())
def test_fuzzing_the_signed_route_never_errs_and_only_accepted_requests_write(signed: Target, data: Any) -> None:
    fuzz_request(signed, data.draw, with_token=True)


@FUZZ
@given(data=st.data())
def test_fuzzing_the_open_route_never_errs_and_only_accepted_requests_write(open_route: Target, data: Any) -> None:
    fuzz_request(open_route, data.draw, with_token=True)
