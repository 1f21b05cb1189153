"""The first path through: real supervisor, router and worker processes on generated and packaged GGUFs."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

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


def test_worker_killed_mid_stream_fails_fast_then_recovers(tiny_llama_gguf: Path) -> None:
    with run_server(model_config(tiny_llama_gguf, n_ctx=8192)) as server:
        client = server.client()
        (worker_pid,) = server.workers()
        stream = client.chat.completions.create(
            model="test-model",
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=6000,
            temperature=0,
            stream=True,
        )
        next(iter(stream))  # the stream is running
        killed_at = time.monotonic()
        os.kill(worker_pid, signal.SIGKILL)
        error_seen = None
        try:
            for chunk in stream:
                del chunk
        except openai.APIError as error:
            error_seen = error
        elapsed = time.monotonic() - killed_at
        assert elapsed < 2.0, f"the stream took {elapsed:.2f}s to fail"
        assert error_seen is not None
        assert "worker" in str(error_seen.message)
        # The supervisor restarts the worker; the next request succeeds.
        deadline = time.monotonic() + 60
        while True:
            try:
                reply = client.chat.completions.create(
                    model="test-model", messages=[{"role": "user", "content": "hi"}], max_tokens=4
                )
                break
            except openai.APIStatusError as error:
                assert error.status_code == 503
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert reply.usage is not None and reply.usage.completion_tokens == 4
        assert server.workers() and server.workers() != [worker_pid]


def test_non_streamed_request_fails_with_503_when_worker_dies(tiny_llama_gguf: Path) -> None:
    with run_server(model_config(tiny_llama_gguf, n_ctx=8192)) as server:
        (worker_pid,) = server.workers()
        threading.Timer(0.5, os.kill, (worker_pid, signal.SIGKILL)).start()
        started = time.monotonic()
        with server.http() as http:
            response = http.post(
                "/v1/completions", json={"prompt": "hello", "max_tokens": 6000, "ignore_eos": True}
            )
        assert response.status_code == 503, response.text
        assert time.monotonic() - started < 2.5
        assert response.json()["error"]["type"] == "worker_unavailable"


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
