"""`workers.simulate`: simulated workers behind the real supervisor and router, over HTTP.

The router templates and tokenizes with the tiny model's vocabulary; the simulated worker answers with
max_tokens (or its default) token ids of that vocabulary, queues beyond its slots, frees slots on cancel
and client disconnects (seen in /metrics), and fails a seeded fraction of requests.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.server import Server, model_config, run_server

SLOTS = 2
DEFAULT_TOKENS = 9
W = '{worker="0"}'


def simulate(**overrides: float) -> dict[str, object]:
    return {
        "simulate": {"ttft_ms": 20, "itl_ms": 5, "slots": SLOTS, "max_tokens": DEFAULT_TOKENS, **overrides},
        "heartbeat_interval_seconds": 0.05,
    }


@pytest.fixture(scope="module")
def server(tiny_llama_gguf: Path) -> Iterator[Server]:
    # n_ctx: room for the 4000-token request of the disconnect test (nothing is allocated: simulated).
    with run_server(model_config(tiny_llama_gguf, n_ctx=4096), workers=simulate()) as handle:
        yield handle


def idle(server: Server) -> bool:
    samples = server.metrics()
    names = (
        "llamafleet_worker_running_sequences",
        "llamafleet_worker_queued_requests",
        "llamafleet_worker_in_flight_requests",
    )
    return not any(samples.get(f"{name}{W}", 0.0) for name in names)


def wait_idle(server: Server, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not idle(server):
        assert time.monotonic() < deadline, f"worker still busy: {server.metrics()}"
        time.sleep(0.05)


def test_completion_answers_max_tokens_of_the_vocabulary(server: Server) -> None:
    client = server.client()
    answer = client.completions.create(model="test-model", prompt="Hello", max_tokens=7, logprobs=2)
    assert answer.usage is not None and answer.usage.completion_tokens == 7
    assert answer.choices[0].finish_reason == "length"
    assert answer.choices[0].text
    assert answer.choices[0].logprobs is not None and len(answer.choices[0].logprobs.tokens or []) == 7
    # The same request twice: the same answer (the simulator is deterministic).
    again = client.completions.create(model="test-model", prompt="Hello", max_tokens=7, logprobs=2)
    assert again.choices[0].text == answer.choices[0].text


def test_without_max_tokens_the_simulator_default_ends_the_answer(server: Server) -> None:
    stream = server.client().chat.completions.create(
        model="test-model", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    contents = []
    finish = None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            contents.append(chunk.choices[0].delta.content)
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    assert len(contents) == DEFAULT_TOKENS  # every simulated token is one printable piece
    assert finish == "stop"


def test_requests_beyond_the_slots_queue_and_all_finish(server: Server) -> None:
    # 100 tokens of 5 ms: the queue lasts about a second, long enough for the polled gauge to see it on a
    # loaded machine (with 20 tokens it lasted ~0.25 s and a CI run sampled it only 3 times, all 0).
    tokens = 100

    async def run() -> list[int]:
        async with httpx.AsyncClient(base_url=server.v1, timeout=30) as http:
            headers = {"Authorization": f"Bearer {server.api_key}"}
            body = {"model": "test-model", "prompt": "x", "max_tokens": tokens, "stream": True}

            async def one() -> int:
                events = 0
                async with http.stream("POST", "/completions", json=body, headers=headers) as response:
                    assert response.status_code == 200
                    async for line in response.aiter_lines():
                        events += line.startswith("data: {")
                return events

            return await asyncio.gather(*(one() for _ in range(3 * SLOTS)))

    queued_seen = []

    async def watch_and_run() -> list[int]:
        task = asyncio.ensure_future(run())
        while not task.done():
            queued_seen.append(server.metrics().get(f"llamafleet_worker_queued_requests{W}", 0.0))
            await asyncio.sleep(0.05)
        return await task

    counts = asyncio.run(watch_and_run())
    assert counts == [tokens] * (3 * SLOTS)
    assert max(queued_seen) > 0, "six requests on two slots never queued"
    wait_idle(server)


def test_client_disconnect_returns_the_slot(server: Server) -> None:
    # 20 s at 5 ms a token. (400 tokens, 2 s, left a bound of 1.5 s from the close to an idle heartbeat seen
    # in /metrics: a loaded machine can take that long to notice, cancel, beat and answer the scrape.)
    tokens = 4000
    body = f'{{"model": "test-model", "prompt": "x", "max_tokens": {tokens}, "stream": true}}'.encode()
    generated = f"llamafleet_worker_generated_tokens_total{W}"
    before = server.metrics().get(generated, 0.0)  # the test before ended idle: its heartbeat counts all
    host, port = server.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {server.api_key}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        received = b""
        while b"data: {" not in received:
            chunk = sock.recv(4096)
            assert chunk, "the stream ended before its first event"
            received += chunk
        server.wait_metric(f"llamafleet_worker_running_sequences{W}", 1)
    wait_idle(server)  # 10 s: well before the 4000 tokens would have run out
    samples = server.metrics()
    assert samples[f"llamafleet_worker_seq_ids_free{W}"] == SLOTS
    assert samples[generated] - before < tokens / 4, "the request ran on after the client left"


def test_embeddings_are_refused_clearly(server: Server) -> None:
    with server.http() as http:
        response = http.post("/v1/embeddings", json={"model": "test-model", "input": "x"})
    assert 400 <= response.status_code < 500 or response.status_code == 503
    assert "error" in response.json()


def test_failure_rate_fails_a_seeded_share_of_requests(tiny_llama_gguf: Path) -> None:
    model = model_config(tiny_llama_gguf, n_ctx=512)
    outcomes = []
    with run_server(model, workers=simulate(failure_rate=0.5, seed=7)) as handle, handle.http() as http:
        for _ in range(16):
            response = http.post(
                "/v1/completions", json={"model": "test-model", "prompt": "x", "max_tokens": 2}
            )
            outcomes.append(response.status_code)
            if response.status_code != 200:
                assert response.json()["error"]["type"] == "server_error"
        streamed = http.post(
            "/v1/completions", json={"model": "test-model", "prompt": "x", "max_tokens": 2, "stream": True}
        )
        wait_idle(handle)
    assert set(outcomes) == {200, 500}, outcomes
    assert streamed.status_code in (200, 500)
    failed = outcomes.count(500)
    assert 3 <= failed <= 13, outcomes
