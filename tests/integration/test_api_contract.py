"""The API's promises beyond generation: a truthful /openapi.json, bounded metrics labels, clear 400s for
text that is not Unicode, Retry-After on 429 and 503, and OpenAI-shaped error events in streams.

One server (the tiny model, one sequence, no queue, llama_decode failing for request ids starting with
`boom`) serves the module; the worker-kill test starts its own.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

from tests.integration.server import Server, model_config, run_server

POST_ROUTES = {
    "/v1/completions": "Completion",
    "/v1/chat/completions": "ChatCompletion",
    "/v1/responses": "ResponseObject",
    "/v1/embeddings": "EmbeddingList",
}
CHAT = [{"role": "user", "content": "hello"}]
FUNCTION = {"type": "function", "name": "f", "parameters": {"type": "object", "properties": {}}}


@pytest.fixture(scope="module")
def server(tiny_llama_gguf: Path) -> Iterator[Server]:
    model = model_config(tiny_llama_gguf, n_seq_max=1, n_ctx=8192)
    env = {"LLAMAFLEET_INJECT_FAULTS": "decode=boom"}
    with run_server(model, server={"max_queued_requests": 0}, env=env) as running:
        yield running


def sse_data(text: str) -> list[Any]:
    """The `data:` payloads of an SSE body, JSON-decoded ([DONE] stays a string)."""
    lines = [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]
    return [line if line == "[DONE]" else json.loads(line) for line in lines]


# --- the OpenAPI document ------------------------------------------------------------------------------


def _ref(media: dict[str, Any]) -> str:
    return str(media["schema"]["$ref"]).rsplit("/", 1)[-1]


def test_openapi_document_declares_what_the_routes_answer(server: Server) -> None:
    with server.http() as http:
        document = http.get("/openapi.json").json()
    assert '"422"' not in json.dumps(document)  # validation errors are 400s here
    schemas = document["components"]["schemas"]
    assert "HTTPValidationError" not in schemas
    assert set(schemas["ErrorDetail"]["properties"]) == {"message", "type", "param", "code"}
    paths = document["paths"]
    for path, success in POST_ROUTES.items():
        answers = paths[path]["post"]["responses"]
        assert {"200", "400", "401", "404", "413", "429", "500", "503"} <= set(answers), path
        assert _ref(answers["200"]["content"]["application/json"]) == success
        for status in ("400", "401", "404", "413", "429", "500", "503"):
            assert _ref(answers[status]["content"]["application/json"]) == "ErrorBody", (path, status)
        for status in ("429", "503"):
            assert "Retry-After" in answers[status]["headers"], (path, status)
        assert paths[path]["post"]["security"] == [{"bearer": []}]
    chunks = {
        "/v1/completions": "Completion",
        "/v1/chat/completions": "ChatCompletionChunk",
        "/v1/responses": "ResponseStreamEvent",
    }
    for path, chunk in chunks.items():
        event = paths[path]["post"]["responses"]["200"]["content"]["text/event-stream"]["schema"]
        payload = event["properties"]["data"]["anyOf"][1]["contentSchema"]["anyOf"]
        assert {"$ref": f"#/components/schemas/{chunk}"} in payload
        assert chunk in schemas
    assert _ref(paths["/v1/models"]["get"]["responses"]["200"]["content"]["application/json"]) == "ModelList"
    health = paths["/healthz"]["get"]["responses"]
    assert {_ref(health[s]["content"]["application/json"]) for s in ("200", "503")} == {"Health"}
    assert "security" not in paths["/healthz"]["get"]
    assert "text/plain" in paths["/metrics"]["get"]["responses"]["200"]["content"]
    # The WebSocket: noted on its path, and a plain GET there is documented as 426.
    assert paths["/v1/responses"]["x-websocket"]["protocol"] == "websocket"
    assert "426" in paths["/v1/responses"]["get"]["responses"]


def test_plain_get_on_the_websocket_path_answers_426(server: Server) -> None:
    with server.http() as http:
        response = http.get("/v1/responses")
    assert response.status_code == 426
    assert response.headers["upgrade"] == "websocket"
    assert response.json()["error"]["code"] == "upgrade_required"


# --- metrics labels ------------------------------------------------------------------------------------


def _request_series(server: Server) -> set[str]:
    return {name for name in server.metrics() if name.startswith("llamafleet_request")}


def test_unknown_paths_add_no_metrics_series(server: Server) -> None:
    with server.http() as http:
        assert http.get("/v1/models").status_code == 200
        assert http.get(f"/v1/x{uuid.uuid4().hex}").status_code == 404  # the `unmatched` series exists
        _request_series(server)  # the first scrape adds /metrics' own series
        before = _request_series(server)
        for _ in range(25):
            assert http.get(f"/v1/x{uuid.uuid4().hex}").status_code == 404
            assert http.post(f"/{uuid.uuid4().hex}/y", json={}).status_code == 404
        after = _request_series(server)
    assert after == before, sorted(after - before)[:5]
    assert 'llamafleet_requests_total{endpoint="unmatched",status="404"}' in after
    assert 'llamafleet_requests_total{endpoint="/v1/models",status="200"}' in after


# --- lone surrogates -----------------------------------------------------------------------------------

LONE = "a\\ud800b"  # as it appears in the JSON text


@pytest.mark.parametrize(
    ("path", "raw", "param"),
    [
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "%s"}]}', "messages.0.content"),
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": [{"type": "text", "text": "%s"}]}]}',
            "messages.0.content.0.text",
        ),
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": "hi"}], "stream": true, '
            '"tools": [{"type": "function", "function": {"name": "f", "description": "%s"}}]}',
            "tools.0.function.description",
        ),
        ("/v1/completions", '{"prompt": "%s", "max_tokens": 2}', "prompt"),
        ("/v1/completions", '{"prompt": "x", "stop": ["%s"], "max_tokens": 2}', "stop.0"),
        ("/v1/embeddings", '{"input": ["ok", "%s"]}', "input.1"),
        ("/v1/responses", '{"input": "%s"}', "input"),
        ("/v1/responses", '{"input": "hi", "stream": true, "metadata": {"k": "%s"}}', "metadata.k"),
        ("/v1/completions", '{"prompt": "x", "%s": 1}', LONE),
    ],
    ids=[
        "chat",
        "chat-part",
        "tool-description",
        "prompt",
        "stop",
        "embeddings",
        "responses",
        "metadata",
        "key",
    ],
)
def test_lone_surrogate_is_a_400_naming_the_field(server: Server, path: str, raw: str, param: str) -> None:
    with server.http() as http:
        response = http.post(path, content=raw % LONE, headers={"content-type": "application/json"})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == param and "surrogate" in error["message"]
        assert http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {"messages": CHAT, "tool_choice": "required"}, "tool_choice"),
        (
            "/v1/chat/completions",
            {"messages": CHAT, "response_format": {"type": "json_schema"}},
            "response_format.json_schema",
        ),
        ("/v1/chat/completions", {"messages": CHAT, "stop": ""}, "stop"),
        ("/v1/completions", {"prompt": "x", "best_of": 3}, "best_of"),
        ("/v1/completions", {"prompt": "x", "suffix": "y"}, "suffix"),
        ("/v1/completions", {"prompt": "x", "n": 2, "echo": True, "stream": True}, "echo"),
        (
            "/v1/responses",
            {"input": "x", "tools": [FUNCTION], "tool_choice": {"type": "function", "name": "g"}},
            "tool_choice",
        ),
        ("/v1/responses", {"input": "x", "temperature": 5}, "temperature"),
        ("/v1/responses", {"input": "x", "tools": [{**FUNCTION, "name": "bad name!"}]}, "tools.0.name"),
        (
            "/v1/responses",
            {"input": "x", "text": {"format": {"type": "json_schema", "name": 5, "schema": {}}}},
            "text.format.name",
        ),
        ("/v1/chat/completions", {"messages": CHAT, "stop": 5}, "stop"),  # not pydantic's "stop.str"
        ("/tokenize", {}, "content"),
        ("/tokenize", {"content": "x", "prompt": "y"}, "prompt"),
    ],
)
def test_checks_across_fields_name_the_field(server: Server, path: str, body: dict, param: str) -> None:
    with server.http() as http:
        response = http.post(path, json={"max_tokens": 2, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and not error["message"].startswith("Value error"), error


def test_null_for_an_optional_field_is_its_default(server: Server) -> None:
    """OpenAI takes null for "integer or null" fields; clients that serialize every field send them."""
    reply = server.client().chat.completions.create(
        model="test-model", messages=CHAT, max_tokens=4, temperature=0, n=None, logprobs=None, seed=None
    )
    assert len(reply.choices) == 1 and reply.choices[0].logprobs is None
    assert reply.usage is not None and reply.usage.completion_tokens >= 1
    nulls = {"stream": None, "n": None, "echo": None, "ignore_eos": None, "speculative": None}
    with server.http() as http:
        completion = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 3, **nulls})
        assert completion.status_code == 200, completion.text
        assert completion.headers["content-type"].startswith("application/json")  # not a stream
        assert len(completion.json()["choices"]) == 1
        body = {"input": "hi", "max_output_tokens": 3, "stream": None, "parallel_tool_calls": None}
        response = http.post("/v1/responses", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["object"] == "response" and response.json()["parallel_tool_calls"] is True
        tokenized = http.post("/tokenize", json={"content": "x", "with_pieces": None, "add_special": None})
        assert tokenized.status_code == 200 and tokenized.json()["count"] >= 1, tokenized.text

        # Nulls inside an assistant turn's tool call render as the defaults: the same prompt as spelled out.
        def turn(call_type: str | None, arguments: str | None) -> list[dict[str, Any]]:
            call = {"id": "c1", "type": call_type, "function": {"name": "f", "arguments": arguments}}
            return [*CHAT, {"role": "assistant", "content": None, "tool_calls": [call]}, *CHAT]

        counted = [
            http.post(
                "/v1/chat/completions", json={"messages": turn(*pair), "max_tokens": 2, "temperature": 0}
            )
            for pair in ((None, None), ("function", ""))
        ]
        assert all(answer.status_code == 200 for answer in counted), [a.text for a in counted]
        first, second = (answer.json() for answer in counted)
        assert first["usage"]["prompt_tokens"] == second["usage"]["prompt_tokens"]
        assert first["choices"][0]["message"] == second["choices"][0]["message"]  # greedy: the same prompt
        streamed = http.post(
            "/v1/chat/completions",
            json={
                "messages": CHAT,
                "max_tokens": 3,
                "stream": True,
                "stream_options": {"include_usage": None},
            },
        )
        chunks = [c for c in sse_data(streamed.text) if c != "[DONE]"]
        assert chunks and not any(c.get("usage") for c in chunks)  # include_usage: null is false
        refused = http.post("/v1/chat/completions", json={"messages": None, "max_tokens": 2})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "messages"


def test_lone_surrogate_over_the_websocket_is_an_error_event(server: Server) -> None:
    url = server.base_url.replace("http://", "ws://") + "/v1/responses"
    with connect(url, additional_headers={"Authorization": f"Bearer {server.api_key}"}) as ws:
        ws.send('{"type": "response.create", "stream_id": "' + LONE + '", "input": "hi"}')
        event = json.loads(ws.recv(timeout=10))
        assert event["type"] == "error" and event["status"] == 400
        assert event["error"]["param"] == "stream_id"
        ws.send(json.dumps({"type": "response.create", "input": "hi", "max_output_tokens": 2}))
        while not (event := json.loads(ws.recv(timeout=30)))["type"].startswith(("response.in", "error")):
            pass
        assert event["type"] == "response.in_progress"  # the next message is served


# --- Retry-After and stream errors -------------------------------------------------------------------


def test_queue_full_429_says_when_to_retry(server: Server) -> None:
    long_chat = {"messages": CHAT, "max_tokens": 8000, "ignore_eos": True, "stream": True}
    with server.http() as http, http.stream("POST", "/v1/chat/completions", json=long_chat) as running:
        assert running.status_code == 200
        lines = running.iter_lines()
        while '"content":""' in (line := next(lines)) or not line:  # a generated token: the sequence is taken
            pass
        refused = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert refused.status_code == 429, refused.text
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "queue_full"
    deadline = time.monotonic() + 10  # the abandoned stream is cancelled; later tests need the sequence
    while server.metrics().get('llamafleet_worker_in_flight_requests{worker="0"}') != 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 20, "stream": True}),
        ("/v1/completions", {"prompt": "hello", "max_tokens": 20, "stream": True}),
    ],
    ids=["chat", "completions"],
)
def test_stream_error_event_has_the_openai_error_shape(server: Server, path: str, body: dict) -> None:
    with server.http() as http:
        whole = http.post(path, json={**body, "stream": False}, headers={"x-request-id": "boom"})
        streamed = http.post(path, json=body, headers={"x-request-id": "boom"})
    assert whole.status_code == 500
    events = sse_data(streamed.text)
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert set(error) == {"message", "type", "param", "code"}
    # The same error as the non-streamed answer: no HTTP status disguised as a code.
    assert error["type"] == whole.json()["error"]["type"] == "server_error"
    assert error["code"] == whole.json()["error"]["code"]
    assert error["code"] is None


def test_killed_worker_gives_worker_unavailable_events_and_retry_after(tiny_llama_gguf: Path) -> None:
    with run_server(model_config(tiny_llama_gguf, n_ctx=8192)) as server, server.http() as http:
        (worker_pid,) = server.workers()
        body = {"messages": CHAT, "max_tokens": 6000, "ignore_eos": True, "stream": True}
        with http.stream("POST", "/v1/chat/completions", json=body) as stream:
            lines = stream.iter_lines()
            next(lines)
            os.kill(worker_pid, signal.SIGKILL)
            events = sse_data("\n".join(lines))
        error = events[-2]["error"]
        assert error["code"] == "worker_unavailable" and error["type"] == "worker_unavailable"
        # Until the supervisor's replacement is up: 503 with Retry-After, on requests and /healthz.
        refused = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        health = http.get("/healthz")
        assert refused.status_code == 503 and health.status_code == 503, (refused.text, health.text)
        assert refused.headers["retry-after"] == health.headers["retry-after"] == "2"
        assert refused.json()["error"]["code"] == "worker_unavailable"
        deadline = time.monotonic() + 60
        while http.get("/healthz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert httpx.codes.is_success(
            http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code
        )
