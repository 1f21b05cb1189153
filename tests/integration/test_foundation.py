"""The first path through: real supervisor, router and worker processes on generated and packaged GGUFs."""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from bench.gauges import wait_idle
from tests.fixtures.model_fixtures import TinyLlamaFactory
from tests.fixtures.tiny_models import FIRST_BYTE_ID, TEXT_PIECES
from tests.integration.server import Server, model_config, run_server


def test_models_and_health(tiny_server: Server) -> None:
    client = tiny_server.client()
    models = client.models.list()
    assert [m.id for m in models.data] == ["test-model"]
    health = httpx.get(f"{tiny_server.base_url}/healthz", timeout=5).json()
    assert health["status"] == "ok" and health["workers_up"] == 1


def test_chat_stream_equals_non_stream(tiny_server: Server) -> None:
    client = tiny_server.client()
    messages = [{"role": "user", "content": "hello world"}]
    full = client.chat.completions.create(model="test-model", messages=messages, max_tokens=24, temperature=0)
    assert full.choices[0].finish_reason == "length"
    assert full.usage is not None and full.usage.completion_tokens == 24
    chunks = list(
        client.chat.completions.create(
            model="test-model", messages=messages, max_tokens=24, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_completion_with_token_prompt(tiny_server: Server) -> None:
    client = tiny_server.client()
    by_text = client.completions.create(model="test-model", prompt="hello", max_tokens=8, temperature=0)
    assert by_text.usage is not None and by_text.usage.completion_tokens == 8
    assert by_text.choices[0].finish_reason == "length"
    # The same prompt as token ids (BOS + "▁hello" in the tiny vocab) gives the same greedy text.
    hello = FIRST_BYTE_ID + 256 + TEXT_PIECES.index("▁hello")
    with tiny_server.http() as http:
        tokens = http.post("/v1/completions", json={"prompt": [1, hello], "max_tokens": 8, "temperature": 0})
    assert tokens.status_code == 200, tokens.text
    assert tokens.json()["usage"]["prompt_tokens"] == 2
    assert tokens.json()["choices"][0]["text"] == by_text.choices[0].text


@pytest.mark.parametrize(
    ("body", "status", "param_hint"),
    [
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature"),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 0}, 400, "n"),
        ({"messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}, 400, "top_p"),
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
        ({"messages": [{"role": "user", "content": "hi"}], "model": "nope"}, 404, "model"),
        (
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000},
            400,
            "max_tokens",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]},
            400,
            "stop",
        ),
    ],
)
def test_bad_chat_requests_are_4xx(tiny_server: Server, body: dict, status: int, param_hint: str) -> None:
    with tiny_server.http() as http:
        response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    assert param_hint in (error.get("param") or "") + error["message"]


def test_bad_completion_requests_are_400(tiny_server: Server) -> None:
    with tiny_server.http() as http:
        out_of_range = http.post("/v1/completions", json={"prompt": [1, 10**6], "max_tokens": 2})
        not_json = http.post(
            "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
        )
        suffix = http.post("/v1/completions", json={"prompt": "a", "suffix": "b"})
    assert out_of_range.status_code == 400 and "out of range" in out_of_range.json()["error"]["message"]
    assert not_json.status_code == 400 and "JSON" in not_json.json()["error"]["message"]
    assert suffix.status_code == 400 and "suffix" in suffix.json()["error"]["message"]


def test_api_key_is_required(tiny_server: Server) -> None:
    response = httpx.get(f"{tiny_server.v1}/models", timeout=5)
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=tiny_server.v1, api_key="wrong", max_retries=0).models.list()


def _read_until_error(
    server: Server, body: dict[str, Any], started: threading.Event, out: dict[str, Any]
) -> None:
    """One long request in a thread: records when its error arrived (monotonic) and what it was."""
    with server.http() as http:
        if body.get("stream"):
            with http.stream("POST", "/v1/chat/completions", json=body) as response:
                for line in response.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    started.set()
                    if line == "data: [DONE]":
                        break
                    chunk = json.loads(line[len("data: ") :])
                    if "error" in chunk:
                        out["at"], out["error"], out["status"] = time.monotonic(), chunk["error"], 200
        else:
            started.set()
            response = http.post("/v1/completions", json=body)
            out["at"], out["status"] = time.monotonic(), response.status_code
            out["error"] = response.json().get("error")
            out["retry_after"] = response.headers.get("retry-after")


def test_worker_killed_with_requests_in_flight_fails_fast_then_recovers(
    tiny_llama_factory: TinyLlamaFactory,
) -> None:
    """kill -9 of the worker under three streams and a non-streaming request: each fails within 2 s with an
    OpenAI error, requests during the restart get 503 (with Retry-After) or are served, then all is well."""
    # Room for four generations of 7000 tokens: seconds of work, never done before the kill.
    long_context = tiny_llama_factory(n_ctx_train=32768)
    with run_server(model_config(long_context, n_ctx=32768)) as server:
        (worker_pid,) = server.workers()
        long = {"max_tokens": 7000, "ignore_eos": True, "temperature": 0}
        bodies = [
            {**long, "messages": [{"role": "user", "content": f"hello {i}"}], "stream": True}
            for i in range(3)
        ]
        bodies.append({**long, "prompt": "hello"})
        results: list[dict[str, Any]] = [{} for _ in bodies]
        started = [threading.Event() for _ in bodies]
        threads = [
            threading.Thread(target=_read_until_error, args=(server, body, flag, out))
            for body, flag, out in zip(bodies, started, results, strict=True)
        ]
        for thread in threads:
            thread.start()
        assert all(flag.wait(30) for flag in started)
        server.wait_metric('llamafleet_worker_running_sequences{worker="0"}', 4, timeout=10)
        killed_at = time.monotonic()
        os.kill(worker_pid, signal.SIGKILL)
        for thread in threads:
            thread.join(30)
        delays = [round(out.get("at", math.inf) - killed_at, 3) for out in results]
        print(f"\nkill -9 with 4 requests in flight: errors after {delays} s")
        assert max(delays) < 2.0, f"errors took {delays} s after the kill: {results}"
        for out in results[:3]:  # the streams: a final SSE error event
            assert out["error"]["type"] == "worker_unavailable" and "worker" in out["error"]["message"]
        whole = results[3]  # the non-streaming request: a 503 with OpenAI's error JSON
        assert whole["status"] == 503 and whole["error"]["type"] == "worker_unavailable", whole
        # Requests that arrive while the supervisor restarts the worker: 503 or served, never anything else.
        client = server.client()
        during: list[int] = []
        retry_afters: list[str | None] = []
        deadline = time.monotonic() + 60
        with server.http() as http:
            while True:
                reply = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4})
                during.append(reply.status_code)
                if reply.status_code == 200:
                    break
                assert reply.status_code == 503, reply.text
                assert reply.json()["error"]["type"] == "worker_unavailable"
                retry_afters.append(reply.headers.get("retry-after"))
                assert time.monotonic() < deadline, "the worker was not restarted in 60 s"
                time.sleep(0.05)
        restarted_after = time.monotonic() - killed_at
        print(f"restart: {len(during) - 1} x 503 then 200 after {restarted_after:.2f} s")
        # Once healthy, the first request succeeds (and so does the next). Greedy and past the end of
        # generation: sampled at the default temperature the tiny model once drew it as its second token.
        reply = client.chat.completions.create(
            model="test-model",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=4,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert reply.usage is not None and reply.usage.completion_tokens == 4
        assert server.workers() and server.workers() != [worker_pid]
        assert not wait_idle(server.base_url, 4)
        # Last, as it lands separately: 503s say when to come back.
        missing = [v for v in [*retry_afters, whole["retry_after"]] if not (v or "").isdigit()]
        assert not missing, f"{len(missing)} of {len(retry_afters) + 1} 503s without a Retry-After header"


@pytest.mark.slow
def test_packaged_smollm2_streamed_chat(smollm2_gguf: Path) -> None:
    model = model_config(smollm2_gguf, alias="smollm2", threads=2, threads_batch=2)
    with run_server(model) as server:
        client = server.client()
        stream = client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text.strip()
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 24
        assert chunks[-1].usage.prompt_tokens > 10
