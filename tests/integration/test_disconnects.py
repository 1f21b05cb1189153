"""A client that goes away frees its sequence and reservation at once, at every stage of its request.

Queued behind a full batch, prefilling a long prompt, decoding, and in the middle of a forced tool call;
streamed and not, chat and completions. Each test opens a raw connection, waits (through /metrics) until
the request reached its stage, closes the socket and then waits until the worker's gauges are idle again:
no running or queued request, no reserved KV cell, nothing in flight in the router. The request asked for
thousands of tokens (a minute of SmolLM2 on one thread), so a broken cancellation fails the hang bound.
Figures (seconds from close to idle, tokens generated after close) are printed; run with -s to see them.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.server import Server, model_config, run_server

FREED_WITHIN = 5.0  # seconds: a generous hang bound; generating the request out takes over a minute
MAX_TOKENS = 4000
STEP_SLACK = 30  # engine steps (~3 ms each here: 12 came in 38 ms once); running out takes thousands
W = '{worker="0"}'


@pytest.fixture(scope="module")
def server(smollm2_gguf: Path) -> Iterator[Server]:
    model = model_config(smollm2_gguf, n_seq_max=1, n_ctx=8192, n_batch=128, n_ubatch=128)
    with run_server(model, workers={"heartbeat_interval_seconds": 0.05}) as handle:
        yield handle


def metric(server: Server, name: str) -> float:
    return server.metrics().get(f"{name}{W}", 0.0)


def busy(server: Server) -> dict[str, float]:
    samples = server.metrics()
    names = (
        "llamafleet_worker_running_sequences",
        "llamafleet_worker_queued_requests",
        "llamafleet_worker_kv_cells_reserved",
        "llamafleet_worker_in_flight_requests",
    )
    return {name: samples.get(f"{name}{W}", 0.0) for name in names if samples.get(f"{name}{W}", 0.0)}


def wait_for(check: Any, what: str, timeout: float = 30.0) -> float:
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, f"timed out waiting for {what}"
        time.sleep(0.02)
    return time.monotonic() - started


def open_request(server: Server, path: str, body: dict[str, Any]) -> socket.socket:
    """Sends a POST on a raw socket and leaves the answer unread, so the test decides when to hang up."""
    host, port = server.base_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    payload = json.dumps(body).encode()
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {server.api_key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    return sock


def hang_up(server: Server, sock: socket.socket, stage: str) -> None:
    """Closes the connection, then waits until the worker holds nothing for it; prints the figures."""
    tokens = metric(server, "llamafleet_worker_generated_tokens_total")
    steps = metric(server, "llamafleet_worker_steps_total")
    sock.close()
    elapsed = wait_for(lambda: not busy(server), "the request to be freed", FREED_WITHIN)
    after = metric(server, "llamafleet_worker_generated_tokens_total") - tokens
    steps = metric(server, "llamafleet_worker_steps_total") - steps
    print(
        f"{stage}: freed {elapsed * 1000:.0f} ms after the close, {steps:.0f} engine steps later; "
        f"{after:.0f} tokens generated meanwhile"
    )
    # The step under way at the close, then a few more: decode steps take ~15 ms here, about what the
    # disconnect takes to reach the worker, and the stats lag a heartbeat (50 ms) behind.
    assert steps <= STEP_SLACK
    assert after < MAX_TOKENS / 4


def body_for(path: str, stream: bool, salt: str, prompt_words: int = 8, **extra: Any) -> dict[str, Any]:
    text = f"{salt} " + " ".join(["Tell me a very long story about the sea."] * (prompt_words // 8))
    common = {"max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0, "stream": stream, **extra}
    if path == "/v1/completions":
        return {"prompt": text, **common}
    return {"messages": [{"role": "user", "content": text}], **common}


PATHS = ["/v1/completions", "/v1/chat/completions"]
STREAMS = pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
ENDPOINTS = pytest.mark.parametrize("path", PATHS, ids=["completions", "chat"])


@ENDPOINTS
@STREAMS
def test_disconnect_while_decoding(server: Server, path: str, stream: bool) -> None:
    start = metric(server, "llamafleet_worker_generated_tokens_total")
    sock = open_request(server, path, body_for(path, stream, f"decode-{path}-{stream}"))
    wait_for(
        lambda: metric(server, "llamafleet_worker_generated_tokens_total") >= start + 8,
        "decoding to start",
    )
    hang_up(server, sock, f"decoding {path} stream={stream}")


@ENDPOINTS
@STREAMS
def test_disconnect_while_prefilling(server: Server, path: str, stream: bool) -> None:
    start = metric(server, "llamafleet_worker_generated_tokens_total")
    steps = metric(server, "llamafleet_worker_steps_total")
    body = body_for(path, stream, f"prefill-{path}-{stream}", prompt_words=2400)
    sock = open_request(server, path, body)
    # Two prefill chunks of 128 tokens done, not a token sampled yet (the prompt is ~3000 tokens).
    wait_for(lambda: metric(server, "llamafleet_worker_steps_total") >= steps + 2, "prefill to start")
    assert metric(server, "llamafleet_worker_generated_tokens_total") == start, "prefill already ended"
    hang_up(server, sock, f"prefilling {path} stream={stream}")
    assert metric(server, "llamafleet_worker_generated_tokens_total") == start


@ENDPOINTS
@STREAMS
def test_disconnect_while_queued(server: Server, path: str, stream: bool) -> None:
    first = open_request(server, path, body_for(path, True, f"queue-first-{path}-{stream}"))
    wait_for(lambda: metric(server, "llamafleet_worker_running_sequences") == 1, "the first to run")
    queued = open_request(server, path, body_for(path, stream, f"queued-{path}-{stream}"))
    wait_for(lambda: metric(server, "llamafleet_worker_queued_requests") == 1, "the second to queue")
    queued.close()
    elapsed = wait_for(
        lambda: metric(server, "llamafleet_worker_queued_requests") == 0, "the queued one to go", FREED_WITHIN
    )
    print(f"queued {path} stream={stream}: dropped {elapsed * 1000:.0f} ms after the close")
    assert metric(server, "llamafleet_worker_running_sequences") == 1  # the first runs on
    assert metric(server, "llamafleet_worker_in_flight_requests") == 1
    hang_up(server, first, "queue occupier")


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "write_story",
            "parameters": {
                "type": "object",
                "properties": {"story": {"type": "string", "minLength": 1000}},
                "required": ["story"],
            },
        },
    }
]


@STREAMS
def test_disconnect_in_the_middle_of_a_tool_call(server: Server, stream: bool) -> None:
    path = "/v1/chat/completions"
    body = body_for(path, stream, f"tool-{stream}", tools=TOOLS, tool_choice="required")
    body.pop("ignore_eos")
    start = metric(server, "llamafleet_worker_generated_tokens_total")
    sock = open_request(server, path, body)
    if stream:  # read until the call's arguments are streaming
        seen = b""
        while b'"arguments"' not in seen:
            part = sock.recv(65536)
            assert part, f"the stream ended before a tool call: {seen[-2000:]!r}"
            seen += part
    wait_for(
        lambda: metric(server, "llamafleet_worker_generated_tokens_total") >= start + 16,
        "the tool call to be under way",
    )
    assert metric(server, "llamafleet_worker_running_sequences") == 1, "the tool call already ended"
    hang_up(server, sock, f"tool call stream={stream}")


@STREAMS
def test_disconnect_from_a_response_while_decoding(server: Server, stream: bool) -> None:
    start = metric(server, "llamafleet_worker_generated_tokens_total")
    body = {  # greedy past the end token like the others: a sampled story could end before the check below
        "input": f"responses-{stream} Tell me a story.",
        "max_output_tokens": MAX_TOKENS,
        "stream": stream,
        "temperature": 0,
        "ignore_eos": True,
    }
    sock = open_request(server, "/v1/responses", body)
    wait_for(
        lambda: metric(server, "llamafleet_worker_generated_tokens_total") >= start + 8,
        "decoding to start",
    )
    assert metric(server, "llamafleet_worker_running_sequences") == 1, "the response already ended"
    hang_up(server, sock, f"decoding /v1/responses stream={stream}")


def test_disconnects_leave_no_traceback_and_count_as_499(server: Server) -> None:
    """Runs last in the module: every disconnect above was a normal event, not an error in the log, and
    the abandoned non-streaming answers are counted as 499 (client closed) rather than 500."""
    log = server.log()
    assert "Traceback" not in log, log[log.find("Traceback") - 200 :][:3000]
    closed = sum(
        value
        for name, value in server.metrics().items()
        if name.startswith("llamafleet_requests_total") and 'status="499"' in name
    )
    assert closed >= 1
