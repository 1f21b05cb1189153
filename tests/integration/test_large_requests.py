"""Large requests must not freeze the router: bodies over server.max_request_bytes are refused with a 413
before they are read, WebSocket messages over it close the socket, and big but allowed requests are
prepared off the event loop, so `/healthz` keeps answering throughout.

Latencies are printed (run with -s) and asserted only against a generous hang bound.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.integration.server import Server, model_config, run_server

LIMIT = 4 << 20
HANG_BOUND = 2.0  # seconds; the bar is 0.1 s, measured and printed


@pytest.fixture(scope="module")
def server(tiny_llama_gguf: Path) -> Iterator[Server]:
    with run_server(model_config(tiny_llama_gguf, n_ctx=2048), server={"max_request_bytes": LIMIT}) as handle:
        yield handle


class HealthProbe:
    """Polls /healthz in a thread while a test works; keeps the slowest answer."""

    def __init__(self, server: Server) -> None:
        self.url = f"{server.base_url}/healthz"
        self.worst = 0.0
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as http:
            while not self._stop.is_set():
                started = time.monotonic()
                assert http.get(self.url).status_code == 200
                self.worst = max(self.worst, time.monotonic() - started)
                self.count += 1
                time.sleep(0.01)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _headers(server: Server, path: str, extra: str) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {server.api_key}\r\n"
        f"Content-Type: application/json\r\n{extra}\r\n"
    ).encode()


def _read_response(sock: socket.socket) -> tuple[int, dict[str, Any]]:
    data = b""
    while b"\r\n\r\n" not in data:
        part = sock.recv(65536)
        assert part, "connection closed without a response"
        data += part
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(
            line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
        )
    )
    while len(body) < length:
        part = sock.recv(65536)
        if not part:
            break
        body += part
    return int(head.split()[1]), json.loads(body[:length])


def _send_until_answered(sock: socket.socket, chunks: Iterator[bytes]) -> None:
    """Sends chunks until the server answers (or stops reading): an early 413 must not wait for the rest."""
    sock.settimeout(30)
    for chunk in chunks:
        try:
            sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            return
        sock.setblocking(False)
        try:
            if sock.recv(1, socket.MSG_PEEK):
                return
        except BlockingIOError:
            pass
        finally:
            sock.settimeout(30)


def test_a_declared_50mb_body_is_refused_at_once(server: Server) -> None:
    size = 50 << 20
    with (
        HealthProbe(server) as probe,
        socket.create_connection(("127.0.0.1", int(server.base_url.rsplit(":", 1)[1]))) as sock,
    ):
        started = time.monotonic()
        sock.sendall(_headers(server, "/v1/chat/completions", f"Content-Length: {size}\r\n"))
        _send_until_answered(sock, (b"x" * (1 << 20) for _ in range(50)))
        status, body = _read_response(sock)
        elapsed = time.monotonic() - started
    print(f"declared 50 MB: 413 after {elapsed * 1000:.0f} ms; /healthz worst {probe.worst * 1000:.1f} ms")
    assert status == 413
    assert body["error"]["code"] == "request_too_large"
    assert "max_request_bytes" in body["error"]["message"]
    assert elapsed < HANG_BOUND and probe.worst < HANG_BOUND


def test_a_chunked_50mb_body_is_cut_off_at_the_limit(server: Server) -> None:
    piece = b"x" * (1 << 20)
    chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    with (
        HealthProbe(server) as probe,
        socket.create_connection(("127.0.0.1", int(server.base_url.rsplit(":", 1)[1]))) as sock,
    ):
        started = time.monotonic()
        sock.sendall(_headers(server, "/v1/completions", "Transfer-Encoding: chunked\r\n"))
        _send_until_answered(sock, (chunk for _ in range(50)))
        status, body = _read_response(sock)
        elapsed = time.monotonic() - started
    print(f"chunked 50 MB: 413 after {elapsed * 1000:.0f} ms; /healthz worst {probe.worst * 1000:.1f} ms")
    assert status == 413
    assert "max_request_bytes" in body["error"]["message"]
    assert elapsed < HANG_BOUND and probe.worst < HANG_BOUND


def test_a_body_under_the_limit_is_served(server: Server) -> None:
    with server.http() as http:
        reply = http.post(
            "/v1/completions",
            json={"prompt": "hello", "max_tokens": 2, "user": "u" * (LIMIT // 2)},
        )
    assert reply.status_code == 200, reply.text


def test_a_websocket_message_over_the_limit_closes_the_socket(server: Server) -> None:
    url = server.base_url.replace("http://", "ws://") + "/v1/responses"
    with connect(url, additional_headers={"Authorization": f"Bearer {server.api_key}"}, max_size=None) as ws:
        ws.send(json.dumps({"type": "response.create", "input": "x" * (LIMIT + 1)}))
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=30)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    with server.http() as http:
        assert http.get("/healthz").status_code == 200


def _schema(fields: int, note: int = 0) -> dict[str, Any]:
    """An object schema of `fields` members; `note` bytes of description each bulk it up cheaply
    (llama.cpp refuses grammars of much over a thousand such members)."""
    member = {
        "type": "object",
        "description": "n" * note,
        "properties": {
            "a": {"type": "string"},
            "b": {"type": "integer"},
            "c": {"enum": ["x", "y"]},
        },
    }
    return {"type": "object", "properties": {f"field_{i}": member for i in range(fields)}}


def _post(server: Server, path: str, body: dict[str, Any]) -> httpx.Response:
    with server.http(timeout=120) as http:
        return http.post(path, json=body)


def test_large_prompts_are_tokenized_off_the_event_loop(server: Server) -> None:
    prompt = "word " * ((LIMIT - 4096) // 5)  # ~4 MB: allowed, tokenized, then too long for the context
    with HealthProbe(server) as probe, ThreadPoolExecutor(6) as pool:
        started = time.monotonic()
        replies = list(pool.map(lambda _: _post(server, "/v1/completions", {"prompt": prompt}), range(6)))
        elapsed = time.monotonic() - started
    print(
        f"6 x 4 MB prompts: answered in {elapsed * 1000:.0f} ms; /healthz worst {probe.worst * 1000:.1f} ms"
    )
    for reply in replies:
        assert reply.status_code == 400, reply.text
        assert reply.json()["error"]["code"] == "context_length_exceeded"
    assert probe.worst < HANG_BOUND


def test_a_large_allowed_schema_is_built_off_the_event_loop(server: Server) -> None:
    schema = _schema(800, note=180)  # about 250 KB of JSON, just under the schema limit
    body = {
        "prompt": "{",
        "max_tokens": 8,  # room for the shortest valid document (`{}` and the end token), as required
        "response_format": {"type": "json_schema", "json_schema": {"name": "big", "schema": schema}},
    }
    with HealthProbe(server) as probe, ThreadPoolExecutor(3) as pool:
        started = time.monotonic()
        replies = list(pool.map(lambda _: _post(server, "/v1/completions", body), range(3)))
        elapsed = time.monotonic() - started
    print(
        f"3 x 250 KB schemas: answered in {elapsed * 1000:.0f} ms; /healthz worst {probe.worst * 1000:.1f} ms"
    )
    for reply in replies:
        assert reply.status_code == 200, reply.text
    assert probe.worst < HANG_BOUND


@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        (
            "/v1/completions",
            {
                "prompt": "{",
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": _schema(3000)},
                },
            },
            "response_format.json_schema.schema",
        ),
        (
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "hi"}],
                "tools": [{"type": "function", "function": {"name": "f", "parameters": _schema(3000)}}],
                "tool_choice": "required",
            },
            "tools",
        ),
        (
            "/v1/completions",
            {"prompt": "{", "grammar": "root ::= " + " | ".join(['"a"'] * 300_000)},
            "grammar",
        ),
    ],
    ids=["json_schema", "tools", "grammar"],
)
def test_oversized_schemas_and_grammars_are_400_naming_the_field(
    server: Server, path: str, extra: dict[str, Any], param: str
) -> None:
    reply = _post(server, path, {"max_tokens": 1, **extra})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param
    assert error["code"] in ("schema_too_large", "grammar_too_large")
    assert len(server.log()) < 200_000  # nothing logged the whole schema or grammar
