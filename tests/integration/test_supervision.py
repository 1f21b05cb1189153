"""Fault drills on the process tree: a hung worker, a dead router, a worker that comes back, the drain.

Each test starts the real service and breaks a real process (SIGSTOP, SIGKILL, SIGTERM), then checks what a
client sees (an OpenAI error at once, never a hang or a cut body) and that the service heals by itself.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.server import Server, free_port, model_config, pid_alive, run_server, start_apart

LONG_CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 30000, "ignore_eos": True}


def wait_until(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def read_stream_until_end(server: Server, body: dict, started: threading.Event) -> list[str]:
    """Streams a chat completion and returns its SSE data lines (the last is [DONE] or an error)."""
    lines: list[str] = []
    with server.http(timeout=120) as http, http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                lines.append(line[6:])
                started.set()
    return lines


def start_long_stream(server: Server) -> tuple[threading.Thread, list[str]]:
    """A long chat stream read on a thread; returns once its first event arrived (it is running)."""
    started = threading.Event()
    lines: list[str] = []
    reader = threading.Thread(
        target=lambda: lines.extend(read_stream_until_end(server, {**LONG_CHAT, "stream": True}, started))
    )
    reader.start()
    assert started.wait(30)
    return reader, lines


def last_event(lines: list[str]) -> dict:
    """The stream's last JSON event (an error event is followed by [DONE], as OpenAI's streams end)."""
    events = [line for line in lines if line != "[DONE]"]
    return json.loads(events[-1])


def test_hung_worker_is_killed_and_replaced(tiny_llama_gguf: Path) -> None:
    with run_server(model_config(tiny_llama_gguf, n_ctx=32768)) as server:
        (worker_pid,) = server.workers()
        reader, lines = start_long_stream(server)
        stopped_at = time.monotonic()
        os.kill(worker_pid, signal.SIGSTOP)
        try:
            reader.join(30)
            failed_after = time.monotonic() - stopped_at
            print(f"stream failed {failed_after:.2f}s after SIGSTOP")
            assert not reader.is_alive()
            assert last_event(lines)["error"]["type"] == "worker_unavailable"
            assert "heartbeats" in last_event(lines)["error"]["message"]
            # The supervisor kills the stopped worker and starts another; the next request succeeds.
            wait_until(lambda: not pid_alive(worker_pid), 10, "the hung worker to be killed")
            wait_until(lambda: server.workers() not in ([], [worker_pid]), 30, "a replacement worker")
            server.wait_healthy(60)
            with server.http() as http:
                reply = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3})
            assert reply.status_code == 200, reply.text
            print(f"hung worker replaced: served again {time.monotonic() - stopped_at:.2f}s after SIGSTOP")
        finally:
            if pid_alive(worker_pid):
                os.kill(worker_pid, signal.SIGCONT)
        assert "stopped answering heartbeats; killing it" in server.log()


def test_dead_router_is_restarted_and_workers_keep_their_cache(tiny_llama_gguf: Path) -> None:
    with run_server(model_config(tiny_llama_gguf, n_ctx=32768)) as server:
        (worker_pid,) = server.workers()
        router_pid = server.router_pid()
        assert router_pid is not None
        prompt = "a shared system prompt that is long enough to be worth caching " * 4
        body = {"prompt": prompt, "max_tokens": 2, "temperature": 0}
        with server.http() as http:
            first = http.post("/v1/completions", json=body)
        assert first.status_code == 200
        # A long stream in flight when the router dies: its client is gone, the worker must drop it.
        started = threading.Event()

        def doomed_stream() -> None:
            with pytest.raises(httpx.HTTPError):
                read_stream_until_end(server, {**LONG_CHAT, "stream": True}, started)

        reader = threading.Thread(target=doomed_stream)
        reader.start()
        assert started.wait(30)
        killed_at = time.monotonic()
        os.kill(router_pid, signal.SIGKILL)
        reader.join(30)
        wait_until(lambda: server.router_pid() not in (None, router_pid), 30, "a new router")
        server.wait_healthy(60)
        print(f"router killed: serving again after {time.monotonic() - killed_at:.2f}s")
        assert server.workers() == [worker_pid], "the worker must survive a router restart"
        with server.http() as http:
            again = http.post("/v1/completions", json=body)
        assert again.status_code == 200, again.text
        assert again.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]
        cached = again.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached > 0, "the worker's prefix cache should survive the router restart"
        # The abandoned stream was dropped by the worker when the new router said hello.
        server.wait_metric('llamafleet_worker_up{worker="0"}', 1)
        wait_until(
            lambda: server.metrics().get('llamafleet_worker_running_sequences{worker="0"}') == 0,
            10,
            "the abandoned stream to be dropped",
        )
        assert "dropped 1 requests the router no longer waits for" in server.log()


def test_revived_worker_drops_requests_the_router_gave_up(tmp_path: Path, tiny_llama_gguf: Path) -> None:
    """Without a supervisor (router and worker run apart), a worker that hung and comes back is not left
    generating for clients that were already told it failed."""
    port = free_port()
    config = {
        "server": {"port": port},
        "model": model_config(tiny_llama_gguf, n_ctx=32768),
        "workers": {
            "requests_endpoint": f"ipc://{tmp_path}/req.sock",
            "results_endpoint": f"ipc://{tmp_path}/res.sock",
        },
    }
    worker, router = start_apart(config, tmp_path)
    base = f"http://127.0.0.1:{port}"

    def metric(name: str) -> float | None:
        for line in httpx.get(f"{base}/metrics", timeout=5).text.splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        return None

    def healthy() -> bool:
        try:
            return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(healthy, 60, "router and worker")
        result: dict[str, httpx.Response] = {}
        thread = threading.Thread(
            target=lambda: result.update(
                reply=httpx.post(f"{base}/v1/chat/completions", json=LONG_CHAT, timeout=60)
            )
        )
        thread.start()
        wait_until(
            lambda: (metric('llamafleet_worker_generated_tokens_total{worker="0"}') or 0) > 10, 30, "decoding"
        )
        os.kill(worker.pid, signal.SIGSTOP)
        thread.join(30)
        assert result["reply"].status_code == 503
        os.kill(worker.pid, signal.SIGCONT)
        wait_until(healthy, 30, "the worker to be taken back")
        wait_until(
            lambda: metric('llamafleet_worker_running_sequences{worker="0"}') == 0, 10, "the request dropped"
        )
        generated = metric('llamafleet_worker_generated_tokens_total{worker="0"}') or 0
        assert generated < 25000, f"the abandoned request ran on ({generated} tokens)"
        reply = httpx.post(f"{base}/v1/completions", json={"prompt": "x", "max_tokens": 3}, timeout=30)
        assert reply.status_code == 200
    finally:
        with_stop = [p for p in (router, worker) if p.poll() is None]
        for process in with_stop:
            os.kill(process.pid, signal.SIGCONT)
            process.send_signal(signal.SIGTERM)
        for process in with_stop:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.mark.parametrize("drain_seconds", [0, 1])
def test_streams_cut_by_the_drain_timeout_end_with_an_error_event(
    tiny_llama_gguf: Path, drain_seconds: int
) -> None:
    """drain_timeout_seconds: 0 means "do not wait", not "wait forever"; a stream still running when the
    drain ends gets a final SSE error event instead of a broken chunked body."""
    with run_server(
        model_config(tiny_llama_gguf, n_ctx=32768), server={"drain_timeout_seconds": drain_seconds}
    ) as server:
        reader, lines = start_long_stream(server)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        reader.join(30)
        took = time.monotonic() - signalled
        print(f"drain {drain_seconds}s: the stream ended {took:.2f}s after SIGTERM")
        assert not reader.is_alive()
        assert server.process.wait(30) == 0
        assert last_event(lines).get("error", {}).get("type") == "service_unavailable", lines[-3:]
        assert took < drain_seconds + 10
