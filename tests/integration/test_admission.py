"""Admission counts sequences (prompts x n), not HTTP calls.

SmolLM2 with two sequences and `max_queued_requests: 4`: the budget is 6 sequences. A call that alone needs
more can never succeed (400 naming the field); one that fits but not now is a 429, on every endpoint.
(SmolLM2, not the tiny model, so a 4000-token stream is still running when the next request arrives.)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect

from tests.integration.server import Server, model_config, run_server

CHAT = [{"role": "user", "content": "Tell me a long story."}]
LONG = {"max_tokens": 4000, "ignore_eos": True, "stream": True, "temperature": 0}


@pytest.fixture(scope="module")
def server(smollm2_gguf: Path) -> Iterator[Server]:
    model = model_config(smollm2_gguf, n_seq_max=2, n_ctx=8192, embedding_pooling="mean")
    with run_server(model, server={"max_queued_requests": 4}) as handle:
        yield handle


def test_a_call_larger_than_the_whole_budget_is_400(server: Server) -> None:
    with server.http() as http:
        reply = http.post("/v1/completions", json={"prompt": ["a", "b", "c", "d"], "n": 2, "max_tokens": 1})
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert error["param"] == "n" and error["code"] == "too_many_sequences"
        assert "8 sequences" in error["message"]
        prompts = http.post("/v1/completions", json={"prompt": ["a"] * 7, "max_tokens": 1})
        assert prompts.status_code == 400 and prompts.json()["error"]["param"] == "prompt"
        fits = http.post("/v1/completions", json={"prompt": ["a"] * 3, "n": 2, "max_tokens": 1})
        assert fits.status_code == 200, fits.text
        assert len(fits.json()["choices"]) == 6


def wait_idle(server: Server, timeout: float = 10.0) -> None:
    """No sequence running (a heartbeat's gauge) and nothing in flight at the router (live). The heartbeat
    alone can predate requests that finished within its interval, so a 0 there does not mean the router
    has let go of the closed streams yet; its own gauge is what admission counts."""
    names = (
        'llamafleet_worker_running_sequences{worker="0"}',
        'llamafleet_worker_in_flight_requests{worker="0"}',
    )
    server.wait_metrics(
        lambda m: all(m.get(name) == 0 for name in names),
        lambda m: {name: m.get(name) for name in names},
        timeout,
    )


def _first_line(lines: Iterator[str]) -> None:
    assert next(line for line in lines if line.startswith("data:"))


def test_sequences_not_calls_fill_the_queue(server: Server) -> None:
    # 2 sequences running, then a call of 2 prompts x n=2: 6 of 6 taken by two HTTP calls.
    chat = {"messages": CHAT, "n": 2, **LONG}
    with (
        server.http() as http,
        server.http() as other,
        http.stream("POST", "/v1/chat/completions", json=chat) as first,
    ):
        first_lines = first.iter_lines()
        _first_line(first_lines)
        body = {"prompt": ["once", "upon"], "n": 2, **LONG}
        with other.stream("POST", "/v1/completions", json=body) as second:
            assert second.status_code == 200
            for path, request in (
                ("/v1/completions", {"prompt": "x", "max_tokens": 2}),
                ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 2}),
                ("/v1/responses", {"input": "hi", "max_output_tokens": 2}),
                ("/v1/embeddings", {"input": ["a", "b"]}),
            ):
                refused = httpx.post(
                    f"{server.base_url}{path}",
                    json=request,
                    headers={"Authorization": f"Bearer {server.api_key}"},
                    timeout=30,
                )
                assert refused.status_code == 429, (path, refused.text)
                assert refused.json()["error"]["code"] == "queue_full"
            url = server.base_url.replace("http://", "ws://") + "/v1/responses"
            auth = {"Authorization": f"Bearer {server.api_key}"}
            with connect(url, additional_headers=auth) as ws:
                ws.send(json.dumps({"type": "response.create", "input": "hi", "max_output_tokens": 2}))
                event = json.loads(ws.recv(timeout=30))
            assert event["type"] == "error", event
            assert event["status"] == 429, event
    # Both streams closed: their sequences are free again.
    wait_idle(server)
    with server.http() as http:
        assert http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
