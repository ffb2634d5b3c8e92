"""The real client SDKs LLM apps' users run, against a provider with the middleware at its defaults.

Each asserts the exact content the SDK yields, that no event was added to what the provider sent, that the
trace ID can be read where the README says, and that the trace reads like chat in MLflow.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
from httpx_sse import connect_sse
from langchain_openai import ChatOpenAI

from .llm_provider import ANSWER, WORDS, build_provider
from .support import ROOT, MlflowServer, UvicornThread, get_trace, root_span

TRACE_HEADER = "x-mlflow-trace-id"
MESSAGES = [{"role": "user", "content": "Say hello"}]
NODE_DIR = ROOT / "tests" / "node"


@pytest.fixture(scope="module")
def provider(mlflow_server: MlflowServer) -> Iterator[str]:
    """The provider under a real uvicorn, with the middleware at its defaults (bar the experiment)."""
    with UvicornThread(build_provider(experiment_name=f"test-clients-{uuid.uuid4().hex[:8]}")) as server:
        yield server.url


@pytest.fixture
def openai_sync(provider: str) -> Iterator[openai.OpenAI]:
    """An openai client for the provider, closed after the test (its connections are the test's own)."""
    with openai.OpenAI(base_url=provider + "/v1", api_key="sk-test", max_retries=0) as client:
        yield client


def test_openai_chat_stream_readme_loop_yields_exactly_the_answer(openai_sync: openai.OpenAI) -> None:
    client = openai_sync
    stream = client.chat.completions.create(model="m", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    pieces = []
    for chunk in stream:  # the loop from openai-python's README
        pieces.append(chunk.choices[0].delta.content or "")
    assert "".join(pieces) == ANSWER
    assert len(pieces) == len(WORDS) + 2  # role chunk, words, finish chunk: nothing added


@pytest.mark.anyio
async def test_openai_async_chat_stream_yields_exactly_the_answer(provider: str) -> None:
    # Closed here, on this test's loop: an unclosed async client is closed by the garbage collector later,
    # on whatever loop is running then, and fails there.
    async with openai.AsyncOpenAI(base_url=provider + "/v1", api_key="sk-test", max_retries=0) as client:
        stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
        pieces = [chunk.choices[0].delta.content or "" async for chunk in stream]
    assert "".join(pieces) == ANSWER


def test_openai_stream_helper_and_raw_response_give_the_answer_and_the_trace_id(openai_sync: openai.OpenAI) -> None:
    client = openai_sync
    with client.chat.completions.stream(model="m", messages=MESSAGES) as stream:  # type: ignore[arg-type]
        kinds = {event.type for event in stream}
        final = stream.get_final_completion()
    assert final.choices[0].message.content == ANSWER
    assert "error" not in kinds
    with client.chat.completions.with_streaming_response.create(
        model="m",
        messages=MESSAGES,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
    ) as response:
        trace_id = response.headers[TRACE_HEADER]
        assert "".join(c.choices[0].delta.content or "" for c in response.parse() if c.choices) == ANSWER
    # The app's own x-request-id (the provider's, here) is never overwritten: the SDK's _request_id keeps
    # its meaning wherever the app sets it.
    assert response.headers["x-request-id"] == "req_provider"

    trace = get_trace(trace_id)
    root = root_span(trace)
    assert root.inputs["messages"] == MESSAGES  # the request's messages, not an HTTP envelope
    assert root.outputs["object"] == "chat.completion"
    assert root.outputs["choices"][0]["message"] == {"role": "assistant", "content": ANSWER}
    assert root.outputs["choices"][0]["finish_reason"] == "stop"
    assert root.outputs["usage"]["total_tokens"] == 14
    assert root.attributes["http.response.wire_format"] == "openai-chat-completions"


def test_openai_non_streamed_completion_and_its_trace(openai_sync: openai.OpenAI) -> None:
    raw = openai_sync.chat.completions.with_raw_response.create(model="m", messages=MESSAGES)  # type: ignore[arg-type]
    completion = raw.parse()
    assert completion.choices[0].message.content == ANSWER
    root = root_span(get_trace(raw.headers[TRACE_HEADER]))
    assert root.outputs["choices"][0]["message"]["content"] == ANSWER
    assert root.inputs["model"] == "m"


def test_openai_responses_stream_has_only_the_providers_events(openai_sync: openai.OpenAI) -> None:
    client = openai_sync
    events = list(client.responses.create(model="m", input="Say hello", stream=True))
    kinds = [event.type for event in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert all(kind.startswith("response.") for kind in kinds), kinds
    with client.responses.stream(model="m", input="Say hello") as stream:
        text = "".join(event.delta for event in stream if event.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert text == ANSWER and final.output_text == ANSWER


@pytest.fixture
def anthropic_sync(provider: str) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=provider, api_key="sk-ant-test", max_retries=0) as client:
        yield client


def test_anthropic_stream_has_only_the_providers_events(anthropic_sync: anthropic.Anthropic) -> None:
    client = anthropic_sync
    events = list(client.messages.create(model="c", max_tokens=64, messages=MESSAGES, stream=True))  # type: ignore[arg-type]
    kinds = [event.type for event in events]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert kinds.count("message_start") == 1 and "done" not in kinds
    with client.messages.stream(model="c", max_tokens=64, messages=MESSAGES) as stream:  # type: ignore[arg-type]
        text = "".join(stream.text_stream)
        message = stream.get_final_message()
    assert text == ANSWER and message.stop_reason == "end_turn"
    raw = client.messages.with_raw_response.create(model="c", max_tokens=64, messages=MESSAGES)  # type: ignore[arg-type]
    assert raw.parse().content[0].text == ANSWER  # type: ignore[union-attr]
    root = root_span(get_trace(raw.headers[TRACE_HEADER]))
    assert root.outputs["content"] == [{"type": "text", "text": ANSWER}]


def test_langchain_openai_streams_the_answer_and_exposes_the_trace_id(provider: str) -> None:
    model = ChatOpenAI(base_url=provider + "/v1", api_key="sk-test", model="m", max_retries=0)  # type: ignore[arg-type]
    assert "".join(str(chunk.content) for chunk in model.stream("Say hello")) == ANSWER
    with_headers = ChatOpenAI(
        base_url=provider + "/v1",
        api_key="sk-test",  # type: ignore[arg-type]
        model="m",
        max_retries=0,
        include_response_headers=True,
    )
    message = with_headers.invoke("Say hello")
    assert message.content == ANSWER
    assert message.response_metadata["headers"][TRACE_HEADER].startswith("tr-")


def test_httpx_sse_reads_the_named_trace_event_of_the_apps_own_stream(provider: str) -> None:
    with httpx.Client(base_url=provider) as client, connect_sse(client, "POST", "/seed/stream", json={}) as source:
        events = list(source.iter_sse())
        trace_id = source.response.headers[TRACE_HEADER]
    assert [json.loads(e.data)["content"] for e in events[:-1]] == WORDS
    assert events[-1].event == "mlflow_trace"
    assert json.loads(events[-1].data)["trace_id"] == trace_id


def test_agent_server_opt_in_puts_the_trace_id_in_band(provider: str) -> None:
    """MLflow AgentServer's convention, exactly: a standalone data event before [DONE], metadata.trace_id."""
    ask = {"x-mlflow-return-trace-id": "true"}
    body = {"model": "m", "messages": MESSAGES, "stream": True}
    with httpx.Client(base_url=provider) as client:
        with connect_sse(client, "POST", "/v1/chat/completions", json=body, headers=ask) as source:
            data = [event.data for event in source.iter_sse()]
            trace_id = source.response.headers[TRACE_HEADER]
        assert data[-1] == "[DONE]"
        assert json.loads(data[-2]) == {"trace_id": trace_id}
        assert all("choices" in json.loads(d) for d in data[:-2])
        plain = client.post("/v1/chat/completions", json={**body, "stream": False}, headers=ask)
        assert plain.json()["metadata"] == {"trace_id": plain.headers[TRACE_HEADER]}
        assert int(plain.headers["content-length"]) == len(plain.content)
        assert plain.json()["choices"][0]["message"]["content"] == ANSWER
        # Without the header, nothing in-band: the JSON is the provider's own.
        assert "metadata" not in client.post("/v1/chat/completions", json={**body, "stream": False}).json()


def _node_or_skip() -> str:
    node = shutil.which("node")
    ready = (NODE_DIR / "node_modules" / ".ready").exists()
    if node is None or not ready:
        assert not os.environ.get("REQUIRE_NODE"), "node and tests/node/node_modules are required here"
        pytest.skip("node or the npm client packages are missing (make tests/node/node_modules/.ready)")
    return node


def test_node_clients_openai_sdk_and_vercel_ai_sdk(provider: str) -> None:
    """openai (npm) chat stream, its stream helper, Responses finalResponse, and the Vercel AI SDK's streamText
    (fullStream and toUIMessageStream) against the same provider."""
    node = _node_or_skip()
    result = subprocess.run(
        [node, str(Path(NODE_DIR / "clients.mjs")), provider],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=NODE_DIR,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["chat_stream_text"] == ANSWER
    assert report["chat_stream_helper_text"] == ANSWER
    assert report["responses_final_text"] == ANSWER
    assert report["ai_sdk_text"] == ANSWER
    assert report["ai_sdk_error_parts"] == []
    assert report["ui_message_error_chunks"] == []
    assert report["trace_id_from_with_response"].startswith("tr-")
