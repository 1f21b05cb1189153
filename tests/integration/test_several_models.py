"""Several models behind one router (`models` in the config): a worker pool each, routed by `model`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from shared.config import load_config
from tests.fixtures.model_fixtures import TinyLlamaFactory
from tests.integration.server import REPO, Server, model_config, run_server

PROMPT = [{"role": "user", "content": "Tell me a story"}]


@pytest.fixture(scope="module")
def two_models(tiny_llama_factory: TinyLlamaFactory) -> Iterator[Server]:
    first = model_config(tiny_llama_factory(seed=0), alias="tiny-a")
    second = model_config(tiny_llama_factory(seed=7), alias="tiny-b")
    models = [{**first, "workers": {"count": 1}}, {**second, "workers": {"count": 2}}]
    with run_server(None, models=models) as server:
        yield server


def _chat(server: Server, model: str) -> str:
    answer = server.client().chat.completions.create(
        model=model,
        messages=PROMPT,  # type: ignore[arg-type]
        max_tokens=12,
        temperature=0,
    )
    assert answer.model == model
    return answer.choices[0].message.content or ""


def _pool_pids(server: Server, alias: str) -> list[int]:
    out = subprocess.run(
        ["ps", "-ww", "-o", "pid=,args=", "--ppid", str(server.process.pid)], capture_output=True, text=True
    )
    return [int(line.split()[0]) for line in out.stdout.splitlines() if f"--model {alias}" in line]


def test_models_lists_every_model(two_models: Server) -> None:
    ids = [model.id for model in two_models.client().models.list().data]
    assert ids == ["tiny-a", "tiny-b"]


def test_requests_route_by_model(two_models: Server) -> None:
    a, b = _chat(two_models, "tiny-a"), _chat(two_models, "tiny-b")
    assert a and b and a != b  # two different models answered
    assert _chat(two_models, "tiny-a") == a and _chat(two_models, "tiny-b") == b  # greedy: the same again
    # Worker counters reach the router with heartbeats: wait for one that counts these requests.
    deadline = time.monotonic() + 15
    while True:
        metrics = two_models.metrics()
        generated_a = metrics['llamafleet_worker_generated_tokens_total{worker="tiny-a/0"}']
        generated_b = sum(
            metrics[f'llamafleet_worker_generated_tokens_total{{worker="tiny-b/{i}"}}'] for i in (0, 1)
        )
        if (generated_a > 0 and generated_b > 0) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert generated_a > 0 and generated_b > 0
    # The completions endpoint and a streamed chat go by `model` too.
    completion = two_models.client().completions.create(
        model="tiny-b", prompt="abc", max_tokens=4, temperature=0
    )
    assert completion.model == "tiny-b"
    stream = two_models.client().chat.completions.create(
        model="tiny-b",
        messages=PROMPT,  # type: ignore[arg-type]
        max_tokens=12,
        temperature=0,
        stream=True,
    )
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == b


def test_unknown_model_is_a_404(two_models: Server) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        _chat(two_models, "tiny-c")
    assert caught.value.code == "model_not_found"
    assert "'tiny-a', 'tiny-b'" in str(caught.value)
    with two_models.http() as http:
        answer = http.post("/tokenize", json={"model": "tiny-c", "content": "x"})
    assert answer.status_code == 404


def test_healthz_reports_each_pool(two_models: Server) -> None:
    body = httpx.get(f"{two_models.base_url}/healthz", timeout=5).json()
    assert body["status"] == "ok"
    counts = {name: (pool["workers_up"], pool["workers"]) for name, pool in body["models"].items()}
    assert counts == {"tiny-a": (1, 1), "tiny-b": (2, 2)}
    assert sorted(body["models"]["tiny-b"]["placement"]) == ["0", "1"]
    assert (body["workers_up"], body["workers"]) == (3, 3)


def test_a_dead_worker_is_restarted_in_its_own_pool(two_models: Server) -> None:
    """The supervisor numbers workers pool after pool; a kill must reach the right pool and come back."""
    (victim,) = _pool_pids(two_models, "tiny-a")
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while True:
        pids = _pool_pids(two_models, "tiny-a")
        health = httpx.get(f"{two_models.base_url}/healthz", timeout=5)
        if pids and victim not in pids and health.status_code == 200:
            break
        assert time.monotonic() < deadline, health.text
        time.sleep(0.2)
    assert len(_pool_pids(two_models, "tiny-b")) == 2
    assert _chat(two_models, "tiny-a")
    assert "worker tiny-a/0 exited" in two_models.log()


def test_ready_line_names_the_url_and_models(two_models: Server) -> None:
    port = two_models.config["server"]["port"]
    assert f"ready: http://127.0.0.1:{port}/v1 serving tiny-a, tiny-b (3 workers)" in two_models.log()
    assert (
        f"router listening on http://127.0.0.1:{port}/v1 for tiny-a, tiny-b; workers connect to"
        in two_models.log()
    )


def test_config_example_loads(tmp_path: Path) -> None:
    config = load_config(REPO / "configs" / "two-models.json")
    pools = config.pools()
    assert [pool.model.served_name for pool in pools] == ["smollm2-135m-instruct", "all-minilm-l6-v2"]
    assert pools[0].requests_endpoint() != pools[1].requests_endpoint()


def test_worker_of_a_models_config_needs_model(tmp_path: Path) -> None:
    data: dict[str, Any] = json.loads((REPO / "configs" / "two-models.json").read_text())
    path = tmp_path / "c.json"
    path.write_text(json.dumps(data))
    done = subprocess.run(
        [sys.executable, "-m", "shared.cli", "worker", "-C", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "pass --model with one of 'smollm2-135m-instruct', 'all-minilm-l6-v2'" in done.stderr


def test_responses_over_http_and_websocket_route_by_model(two_models: Server) -> None:
    """One WebSocket may talk to both models: each response.create goes to the model it names."""
    from websockets.sync.client import connect

    texts = {}
    for model in ("tiny-a", "tiny-b"):
        answer = two_models.client().responses.create(
            model=model, input="Tell me a story", max_output_tokens=8, temperature=0
        )
        assert answer.model == model
        texts[model] = answer.output_text
    assert texts["tiny-a"] != texts["tiny-b"]
    url = two_models.base_url.replace("http://", "ws://") + "/v1/responses"
    with connect(url, additional_headers={"Authorization": f"Bearer {two_models.api_key}"}) as ws:
        for model in ("tiny-b", "tiny-a", "tiny-c"):
            request = {
                "type": "response.create",
                "model": model,
                "input": "Tell me a story",
                "max_output_tokens": 8,
                "temperature": 0,
            }
            ws.send(json.dumps(request))
            while True:
                event = json.loads(ws.recv(timeout=60))
                if event["type"] in ("response.completed", "response.incomplete", "response.failed", "error"):
                    break
            if model == "tiny-c":
                assert event["type"] == "error" and event["error"]["code"] == "model_not_found", event
            else:
                response = event["response"]
                assert response["model"] == model
                assert "".join(p["text"] for p in response["output"][0]["content"]) == texts[model]
