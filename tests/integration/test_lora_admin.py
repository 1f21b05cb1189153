"""POST /v1/load_lora_adapter and /v1/unload_lora_adapter through real processes: loading while requests
run, unloading that waits for the adapter's requests, path checks, and the API key."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.server import Server, run_server
from tests.integration.test_lora import adapters, lora_model, text

__all__ = ["adapters"]  # the module-scoped fixture, shared with test_lora


@pytest.fixture(scope="module")
def server(tiny_llama_gguf: Path, adapters: dict[str, Path]) -> Iterator[Server]:
    with run_server(lora_model(tiny_llama_gguf, adapters)) as handle:
        yield handle


def post(server: Server, path: str, body: dict[str, Any], key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key if key is not None else server.api_key}"}
    return httpx.post(f"{server.base_url}{path}", json=body, headers=headers, timeout=60)


def stream_tokens(
    server: Server, model: str, max_tokens: int, started: threading.Event
) -> tuple[str, str, float]:
    """A streamed completion's text, finish reason and when (time.monotonic) its finishing chunk arrived;
    sets `started` at the first chunk."""
    body = {
        "model": model,
        "prompt": "stream",
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    parts: list[str] = []
    finish, finished_at = "", 0.0
    with server.http() as http, http.stream("POST", "/v1/completions", json=body) as reply:
        assert reply.status_code == 200
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            parts.append(choice["text"])
            if choice.get("finish_reason"):
                finish, finished_at = choice["finish_reason"], time.monotonic()
            started.set()
    return "".join(parts), finish, finished_at


def test_load_while_serving_then_unload_waits_for_running_requests(
    server: Server, adapters: dict[str, Path]
) -> None:
    base_alone = text(server, prompt="stream", max_tokens=300)
    started = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        base_stream = pool.submit(stream_tokens, server, "test-model", 300, started)
        assert started.wait(30)
        reply = post(
            server, "/v1/load_lora_adapter", {"lora_name": "style-c", "lora_path": str(adapters["c"])}
        )
        assert reply.status_code == 200, reply.text
        assert base_stream.result()[0] == base_alone  # loading did not disturb a running request
    with server.http() as http:
        models = {card["id"]: card for card in http.get("/v1/models").json()["data"]}
    assert models["style-c"]["parent"] == "test-model"
    with_c = text(server, "style-c", prompt="stream", max_tokens=300)
    assert with_c != base_alone

    started = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        running = pool.submit(stream_tokens, server, "style-c", 1500, started)
        assert started.wait(30)
        sent_at = time.monotonic()
        unload = pool.submit(post, server, "/v1/unload_lora_adapter", {"lora_name": "style-c"})
        unloaded = unload.result()
        unloaded_at = time.monotonic()
        streamed, finish, finished_at = running.result()
    # The unload answered only after the adapter's request ended. The two replies come on two connections,
    # so the stream's last chunk may be read a moment after the unload's answer (a bare `running.done()`
    # here failed once in CI). An unload that did not wait answers within milliseconds of being sent, while
    # the 1500-token stream runs on for ~0.6 s: so the unload's answer must come in the second half of the
    # time from sending it to the stream's end, whatever the machine's speed.
    late = finished_at - unloaded_at
    assert late <= 0.5 * (finished_at - sent_at), (late, finished_at - sent_at)
    assert unloaded.status_code == 200, unloaded.text
    assert finish == "length" and streamed.startswith(with_c)
    with server.http() as http:
        gone = http.post("/v1/completions", json={"model": "style-c", "prompt": "x", "max_tokens": 2})
        assert gone.status_code == 404
        assert "style-c" not in {card["id"] for card in http.get("/v1/models").json()["data"]}
    assert text(server, prompt="stream", max_tokens=300) == base_alone
    # Loaded again under the same name, it gives the same output as before.
    reply = post(server, "/v1/load_lora_adapter", {"lora_name": "style-c", "lora_path": str(adapters["c"])})
    assert reply.status_code == 200, reply.text
    assert text(server, "style-c", prompt="stream", max_tokens=300) == with_c


@pytest.mark.parametrize(
    ("name", "which", "status"),
    [
        ("dup", "a-again", 400),  # a name already loaded (style-a, from the config)
        ("test-model", "c", 400),  # the base model's name
        ("missing", "missing", 400),
        ("corrupt", "corrupt", 400),
        ("foreign", "foreign", 400),  # an adapter for another architecture
        ("outside", "outside", 400),  # not under model.lora_runtime_dir
        ("escape", "escape", 400),  # ../ out of it
        ("bad name!", "c", 400),
    ],
)
def test_bad_loads_are_400_and_the_worker_keeps_serving(
    server: Server, adapters: dict[str, Path], name: str, which: str, status: int
) -> None:
    paths = {
        "c": str(adapters["c"]),
        "missing": str(adapters["runtime"] / "missing.gguf"),
        "corrupt": str(adapters["corrupt"]),
        "foreign": str(adapters["foreign"]),
        "outside": str(adapters["outside"]),
        "escape": str(adapters["runtime"] / ".." / "outside.gguf"),
        "a-again": str(adapters["c"]),
    }
    lora_name = "style-a" if which == "a-again" else name
    reply = post(server, "/v1/load_lora_adapter", {"lora_name": lora_name, "lora_path": paths[which]})
    assert reply.status_code == status, reply.text
    assert reply.json()["error"]["message"]
    assert text(server, prompt="still serving", max_tokens=4)


def test_unload_unknown_is_404_and_admin_needs_the_key(server: Server, adapters: dict[str, Path]) -> None:
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "nothing"}).status_code == 404
    reply = post(
        server, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(adapters["c"])}, key="no"
    )
    assert reply.status_code == 401


def test_endpoints_are_off_without_a_runtime_dir(tiny_llama_gguf: Path, adapters: dict[str, Path]) -> None:
    model = lora_model(tiny_llama_gguf, adapters)
    del model["lora_runtime_dir"]
    with run_server(model) as plain:
        reply = post(plain, "/v1/load_lora_adapter", {"lora_name": "c", "lora_path": str(adapters["c"])})
        assert reply.status_code == 404
        assert post(plain, "/v1/unload_lora_adapter", {"lora_name": "style-a"}).status_code == 404


def test_router_sends_adapter_requests_to_the_worker_running_that_adapter(
    tiny_llama_gguf: Path, adapters: dict[str, Path]
) -> None:
    with run_server(lora_model(tiny_llama_gguf, adapters), workers={"count": 2}) as two:
        started = threading.Event()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            running = pool.submit(stream_tokens, two, "style-a", 1500, started)
            assert started.wait(30)
            text(two, "style-a", prompt="follow me", max_tokens=4)  # least-loaded would pick the idle worker
            assert not running.done()
            running.result()
        names = [f'llamafleet_worker_lora_requests_total{{adapter="style-a",worker="{i}"}}' for i in (0, 1)]
        deadline = time.monotonic() + 10
        while True:  # heartbeats carry the counters
            metrics = two.metrics()
            counts = sorted(metrics.get(name, 0.0) for name in names)
            if sum(counts) >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert counts == [0.0, 2.0], counts
