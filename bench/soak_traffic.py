"""The soak's request kinds: one async function each, sending a realistic request and judging the answer.

Each returns `(status, problem)`: the status label counted in the report ("200", "400", "429",
"cancelled") and, when the answer is not what that kind intends (a 5xx, a wrong shape, an error event, a
hang), a one-line problem. Intended 4xx (bad requests) and 429s are not problems; everything else is.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException

Outcome = tuple[str, str | None]

TIMEOUT = 120.0  # any single answer slower than this is a hang

PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "List three prime numbers.",
    "Tell me a short story about a robot who learns to paint.",
    "What is 17 times 23?",
    "Translate 'good morning' into Spanish.",
    "Give me a tip for writing clean code.",
)
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30}},
            "required": ["city"],
        },
    },
}


@dataclass
class Context:
    http: httpx.AsyncClient
    ws_url: str
    api_key: str
    model: str
    rng: random.Random
    penalties: bool = False

    def sampling(self) -> dict[str, Any]:
        """Greedy or seeded sampling, sometimes with top_p / top_k (and penalties when asked)."""
        if self.rng.random() < 0.5:
            return {"temperature": 0}
        fields: dict[str, Any] = {"temperature": 0.8, "seed": self.rng.randrange(1 << 30)}
        if self.rng.random() < 0.5:
            fields["top_p"] = 0.9
        if self.rng.random() < 0.3:
            fields["top_k"] = 40
        if self.penalties and self.rng.random() < 0.5:
            fields["frequency_penalty"] = 0.5
            fields["presence_penalty"] = 0.3
        return fields

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.rng.choice(PROMPTS)}]


def _status_problem(response: httpx.Response) -> Outcome | None:
    """The outcome of a non-200 answer (429 is allowed), or None for a 200."""
    if response.status_code == 200:
        return None
    if response.status_code == 429 and _is_error_json(response):
        return "429", None
    return str(response.status_code), f"unexpected {response.status_code}: {response.text[:200]}"


def _is_error_json(response: httpx.Response) -> bool:
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(error, dict) and bool(error.get("message")) and bool(error.get("type"))


async def _post(ctx: Context, path: str, body: dict[str, Any]) -> tuple[httpx.Response, Any]:
    response = await ctx.http.post(path, json=body)
    return response, (response.json() if response.status_code == 200 else None)


async def _sse(ctx: Context, path: str, body: dict[str, Any]) -> tuple[httpx.Response, list[Any]]:
    """Posts a streaming request and reads its events (JSON objects, then the string "[DONE]" if sent)."""
    events: list[Any] = []
    async with ctx.http.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return response, events
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                data = line[len("data: ") :]
                events.append(data if data == "[DONE]" else json.loads(data))
    return response, events


def _stream_problem(events: list[Any]) -> str | None:
    if not events or events[-1] != "[DONE]":
        return "stream did not end with [DONE]"
    errors = [e for e in events[:-1] if "error" in e]
    if errors:
        return f"error event: {errors[0]['error']}"
    finishes = [
        c.get("finish_reason") for e in events[:-1] for c in e.get("choices", []) if c.get("finish_reason")
    ]
    return None if finishes else "no finish_reason in the stream"


async def chat(ctx: Context) -> Outcome:
    body = {"messages": ctx.messages(), "max_tokens": ctx.rng.randint(8, 64), **ctx.sampling()}
    response, reply = await _post(ctx, "/v1/chat/completions", body)
    if (outcome := _status_problem(response)) is not None:
        return outcome
    choice = reply["choices"][0]
    if choice["finish_reason"] not in ("stop", "length") or not isinstance(choice["message"]["content"], str):
        return "200", f"odd chat answer: {choice}"
    return "200", None


async def chat_stream(ctx: Context) -> Outcome:
    body = {
        "messages": ctx.messages(),
        "max_tokens": ctx.rng.randint(8, 64),
        "stream": True,
        "stream_options": {"include_usage": True},
        **ctx.sampling(),
    }
    response, events = await _sse(ctx, "/v1/chat/completions", body)
    if (outcome := _status_problem(response)) is not None:
        return outcome
    if (problem := _stream_problem(events)) is not None:
        return "200", problem
    return "200", None if events[-2].get("usage") else "no usage chunk"


async def completion(ctx: Context) -> Outcome:
    n = ctx.rng.choice((1, 1, 2))
    body = {"prompt": ctx.rng.choice(PROMPTS), "max_tokens": ctx.rng.randint(8, 48), "n": n, **ctx.sampling()}
    if ctx.rng.random() < 0.5:
        response, events = await _sse(ctx, "/v1/completions", {**body, "stream": True})
        if (outcome := _status_problem(response)) is not None:
            return outcome
        return "200", _stream_problem(events)
    response, reply = await _post(ctx, "/v1/completions", body)
    if (outcome := _status_problem(response)) is not None:
        return outcome
    return "200", None if len(reply["choices"]) == n else f"{len(reply['choices'])} choices for n={n}"


async def structured(ctx: Context) -> Outcome:
    body = {
        "messages": [{"role": "user", "content": "Invent a person; answer in JSON with name and age."}],
        "max_tokens": 64,
        "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
        **ctx.sampling(),
    }
    response, reply = await _post(ctx, "/v1/chat/completions", body)
    if (outcome := _status_problem(response)) is not None:
        return outcome
    choice = reply["choices"][0]
    if choice["finish_reason"] == "length":
        return "200", None  # cut by max_tokens: valid so far, nothing more to check
    try:
        person = json.loads(choice["message"]["content"])
    except ValueError:
        return "200", f"structured output is not JSON: {choice['message']['content']!r}"
    valid = isinstance(person, dict) and set(person) == {"name", "age"} and isinstance(person["age"], int)
    return "200", None if valid else f"structured output breaks its schema: {person!r}"


async def tools(ctx: Context) -> Outcome:
    body = {
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "tools": [WEATHER_TOOL],
        "tool_choice": "required",
        "max_tokens": 64,
        **ctx.sampling(),
    }
    response, reply = await _post(ctx, "/v1/chat/completions", body)
    if (outcome := _status_problem(response)) is not None:
        return outcome
    choice = reply["choices"][0]
    if choice["finish_reason"] == "length":
        return "200", None
    calls = choice["message"].get("tool_calls") or []
    try:
        ok = bool(calls) and all(
            c["function"]["name"] == "get_weather" and "city" in json.loads(c["function"]["arguments"])
            for c in calls
        )
    except (ValueError, KeyError, TypeError):
        ok = False
    return "200", None if ok and choice[
        "finish_reason"
    ] == "tool_calls" else f"bad tool call answer: {choice}"


async def embeddings(ctx: Context) -> Outcome:
    texts = ctx.rng.sample(PROMPTS, ctx.rng.randint(1, 4))
    response, reply = await _post(ctx, "/v1/embeddings", {"input": texts})
    if (outcome := _status_problem(response)) is not None:
        return outcome
    vectors = [item["embedding"] for item in reply["data"]]
    ok = len(vectors) == len(texts) and len({len(v) for v in vectors}) == 1 and len(vectors[0]) > 0
    return "200", None if ok else "embeddings of the wrong count or size"


async def responses_http(ctx: Context) -> Outcome:
    body = {
        "input": ctx.rng.choice(PROMPTS),
        "instructions": "Answer briefly.",
        "max_output_tokens": ctx.rng.randint(8, 48),
        **ctx.sampling(),
    }
    if ctx.rng.random() < 0.5:
        response, events = await _sse(ctx, "/v1/responses", {**body, "stream": True})
        if (outcome := _status_problem(response)) is not None:
            return outcome
        last = events[-1].get("type") if events and isinstance(events[-1], dict) else None
        return "200", None if last in (
            "response.completed",
            "response.incomplete",
        ) else f"stream ended {last}"
    response, reply = await _post(ctx, "/v1/responses", body)
    if (outcome := _status_problem(response)) is not None:
        return outcome
    return "200", None if reply["status"] in ("completed", "incomplete") else f"status {reply['status']}"


async def responses_ws(ctx: Context) -> Outcome:
    """A conversation of 2-4 turns over one socket, each continuing the last by previous_response_id;
    sometimes the client hangs up in the middle of a turn (a cancellation)."""
    turns = ctx.rng.randint(2, 4)
    hang_up_at = ctx.rng.randrange(turns) if ctx.rng.random() < 0.3 else -1
    headers = {"Authorization": f"Bearer {ctx.api_key}"}
    previous: str | None = None
    try:
        async with connect(ctx.ws_url, additional_headers=headers, open_timeout=TIMEOUT) as ws:
            for turn in range(turns):
                message: dict[str, Any] = {
                    "type": "response.create",
                    "model": ctx.model,
                    "input": ctx.rng.choice(PROMPTS),
                    "max_output_tokens": ctx.rng.randint(8, 32),
                    **ctx.sampling(),
                }
                if previous:
                    message["previous_response_id"] = previous
                await ws.send(json.dumps(message))
                while True:
                    event = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
                    if turn == hang_up_at and event["type"] == "response.output_text.delta":
                        return "cancelled", None  # leaving the block closes the socket mid-response
                    if event["type"] in ("response.completed", "response.incomplete"):
                        previous = event["response"]["id"]
                        break
                    if event["type"] in ("response.failed", "error"):
                        status = str(event.get("status", "error"))
                        return (status, None) if status == "429" else (status, f"turn {turn}: {event}")
    except (WebSocketException, OSError) as error:
        return "ws_error", f"WebSocket failed: {error!r}"
    return "200", None


async def cancel_stream(ctx: Context) -> Outcome:
    """A streaming chat the client drops after a few chunks (the server must free the sequence)."""
    body = {
        "messages": ctx.messages(),
        "max_tokens": 400,
        "stream": True,
        "ignore_eos": True,
        **ctx.sampling(),
    }
    keep = ctx.rng.randint(1, 30)
    async with ctx.http.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return _status_problem(response) or ("200", None)
        seen = 0
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                if "error" in line:
                    return "200", f"error event before the hang-up: {line[:200]}"
                seen += 1
                if seen >= keep:
                    break
    return "cancelled", None


async def cancel_whole(ctx: Context) -> Outcome:
    """A non-streaming completion the client abandons before the answer (timeout; connection closed)."""
    body = {"prompt": ctx.rng.choice(PROMPTS), "max_tokens": 400, "ignore_eos": True, **ctx.sampling()}
    try:
        response = await asyncio.wait_for(
            ctx.http.post("/v1/completions", json=body), ctx.rng.uniform(0.05, 1.0)
        )
    except asyncio.TimeoutError:
        return "cancelled", None
    return _status_problem(response) or ("200", None)


BAD_REQUESTS: tuple[tuple[str, Any], ...] = (
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": -1}),
    ("/v1/chat/completions", {"messages": []}),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "model": "no-such-model"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 0}),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema"}},
    ),
    ("/v1/completions", {"prompt": [1, 10**9], "max_tokens": 2}),
    ("/v1/completions", {"prompt": "a", "logit_bias": {"999999999": 1}}),
    ("/v1/completions", "{not json"),
    ("/v1/embeddings", {"input": []}),
    ("/v1/responses", {"input": "hi", "previous_response_id": "resp_nope"}),
    ("/v1/no-such-route", {}),
)


async def bad_request(ctx: Context) -> Outcome:
    """A request that must be refused with a 4xx in OpenAI's error JSON."""
    path, body = ctx.rng.choice(BAD_REQUESTS)
    if isinstance(body, str):
        response = await ctx.http.post(path, content=body, headers={"content-type": "application/json"})
    else:
        response = await ctx.http.post(path, json=body)
    status = str(response.status_code)
    if 400 <= response.status_code < 500 and _is_error_json(response):
        return status, None
    return status, f"{path} {str(body)[:80]}: {response.status_code} {response.text[:200]}"


Kind = Callable[[Context], Awaitable[Outcome]]
# name -> (function, weight)
KINDS: dict[str, tuple[Kind, int]] = {
    "chat": (chat, 3),
    "chat_stream": (chat_stream, 3),
    "completion": (completion, 2),
    "structured": (structured, 1),
    "tools": (tools, 1),
    "embeddings": (embeddings, 2),
    "responses": (responses_http, 1),
    "responses_ws": (responses_ws, 1),
    "cancel_stream": (cancel_stream, 1),
    "cancel_whole": (cancel_whole, 1),
    "bad_request": (bad_request, 1),
}


async def run_kind(name: str, ctx: Context) -> Outcome:
    """Runs one request of `name`; an exception or a hang is a problem, never a crash of the harness."""
    try:
        return await asyncio.wait_for(KINDS[name][0](ctx), TIMEOUT + 10)
    except asyncio.TimeoutError:
        return "hang", f"no answer in {TIMEOUT:.0f} s"
    except (httpx.HTTPError, ValueError, KeyError, TypeError, IndexError) as error:
        return "exception", f"{type(error).__name__}: {error}"
