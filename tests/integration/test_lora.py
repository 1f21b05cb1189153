"""LoRA adapters through real processes on the tiny F32 llama: named adapters chosen by `model`, exact return
to the base model, concurrency across adapter sets, prefix-cache isolation, metrics, and bad input."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.tiny_lora import write_corrupt_lora, write_foreign_lora, write_lora
from tests.integration.server import Server, model_config, run_server

PROMPT = "the quick brown fox jumps over the lazy dog and then it runs far away into the woods"


@pytest.fixture(scope="module")
def adapters(tiny_llama_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("loras")
    runtime = folder / "runtime"
    return {
        "a": write_lora(folder / "a.gguf", tiny_llama_gguf, seed=1),
        "b": write_lora(folder / "b.gguf", tiny_llama_gguf, seed=2),
        "c": write_lora(runtime / "c.gguf", tiny_llama_gguf, seed=3),
        "corrupt": write_corrupt_lora(runtime / "corrupt.gguf", tiny_llama_gguf),
        "foreign": write_foreign_lora(runtime / "foreign.gguf", tiny_llama_gguf),
        "outside": write_lora(folder / "outside.gguf", tiny_llama_gguf, seed=4),
        "runtime": runtime,
    }


def lora_model(tiny: Path, adapters: dict[str, Path], **overrides: Any) -> dict[str, Any]:
    """Flash attention off: exact equality of logits across KV placements (see test_prefix_cache)."""
    return model_config(
        tiny,
        flash_attn=False,
        loras=[
            {"path": str(adapters["a"]), "name": "style-a"},
            {"path": str(adapters["b"]), "name": "style-b", "scale": 0.5},
        ],
        lora_runtime_dir=str(adapters["runtime"]),
        **overrides,
    )


@pytest.fixture(scope="module")
def server(tiny_llama_gguf: Path, adapters: dict[str, Path]) -> Iterator[Server]:
    with run_server(lora_model(tiny_llama_gguf, adapters, embedding_pooling="last")) as handle:
        yield handle


def complete(
    server: Server, model: str = "test-model", prompt: str = PROMPT, max_tokens: int = 24, **extra: Any
) -> dict[str, Any]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    with server.http() as http:
        reply = http.post("/v1/completions", json={**body, **extra})
    assert reply.status_code == 200, reply.text
    return reply.json()  # type: ignore[no-any-return]


def text(server: Server, model: str = "test-model", **extra: Any) -> str:
    return str(complete(server, model, **extra)["choices"][0]["text"])


def test_models_lists_adapters_with_parent(server: Server) -> None:
    with server.http() as http:
        data = http.get("/v1/models").json()["data"]
    cards = {card["id"]: card for card in data}
    assert set(cards) == {"test-model", "style-a", "style-b"}
    assert cards["style-a"]["parent"] == "test-model"
    assert cards["style-b"]["parent"] == "test-model"
    assert "parent" not in cards["test-model"]


def test_adapter_changes_output_and_base_returns_exactly(server: Server) -> None:
    base = text(server, prompt="hello there, how are")
    with_a = text(server, "style-a", prompt="hello there, how are")
    with_b = text(server, "style-b", prompt="hello there, how are")
    assert with_a != base
    assert with_b not in (base, with_a)
    assert text(server, prompt="hello there, how are") == base
    assert text(server, "style-a", prompt="hello there, how are") == with_a


def test_scale_zero_is_the_base_model_and_scale_matters(server: Server) -> None:
    base = text(server, prompt="scales and weights")
    assert text(server, "style-a", prompt="scales and weights", lora_scale=0.0) == base
    default = text(server, "style-a", prompt="scales and weights")
    assert text(server, "style-a", prompt="scales and weights", lora_scale=1.0) == default
    assert text(server, "style-a", prompt="scales and weights", lora_scale=2.5) != default


def test_base_and_adapter_requests_run_concurrently_exactly_as_alone(server: Server) -> None:
    cases = [("test-model", "one two three"), ("style-a", "one two three"), ("style-b", "four five six")]
    alone = {case: text(server, case[0], prompt=case[1], max_tokens=40) for case in cases}
    jobs = cases * 3
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        futures = {pool.submit(text, server, m, prompt=p, max_tokens=40): (m, p) for m, p in jobs}
        for future, case in futures.items():
            assert future.result() == alone[case], case


def test_prefix_cache_never_serves_another_adapter_set(server: Server) -> None:
    prompt = PROMPT + " once upon a time"

    def run(model: str) -> tuple[str, int]:
        reply = complete(server, model, prompt=prompt)
        return reply["choices"][0]["text"], reply["usage"]["prompt_tokens_details"]["cached_tokens"]

    first_a, cached = run("style-a")
    assert cached == 0
    base, cached = run("test-model")
    assert cached == 0  # the prompt's KV under style-a is no use to the base model
    other, cached = run("style-b")
    assert cached == 0
    again_a, cached = run("style-a")
    assert cached > 0 and again_a == first_a  # a hit within the same adapter set
    again_base, cached = run("test-model")
    assert cached > 0 and again_base == base
    assert len({first_a, base, other}) == 3


def test_chat_responses_and_structured_output_with_an_adapter(server: Server) -> None:
    client = server.client()
    messages = [{"role": "user", "content": "Say something"}]

    def chat(model: str) -> str:
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0)
        assert reply.model
        return reply.choices[0].message.content or ""

    base, adapted = chat("test-model"), chat("style-a")
    assert adapted != base
    response = client.responses.create(
        model="style-a", input="Say something", max_output_tokens=16, temperature=0
    )
    assert response.output_text == adapted
    streamed = client.chat.completions.create(
        model="style-a", messages=messages, max_tokens=16, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == adapted
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}},
        "required": ["n"],
        "additionalProperties": False,
    }
    structured = client.chat.completions.create(
        model="style-b",
        messages=messages,
        max_tokens=40,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    )
    import json

    assert set(json.loads(structured.choices[0].message.content or "")) == {"n"}


def test_responses_websocket_with_an_adapter(server: Server) -> None:
    import json

    from websockets.sync.client import connect

    url = server.base_url.replace("http", "ws") + "/v1/responses"
    headers = {"Authorization": f"Bearer {server.api_key}"}
    outputs = []
    with connect(url, additional_headers=headers) as socket:
        for model in ("style-a", "test-model"):
            socket.send(
                json.dumps(
                    {
                        "type": "response.create",
                        "model": model,
                        "input": "Say something",
                        "max_output_tokens": 16,
                        "temperature": 0,
                    }
                )
            )
            while True:
                event = json.loads(socket.recv())
                if event["type"] in ("response.completed", "response.incomplete", "error"):
                    break
            assert event["type"] != "error", event
            outputs.append(
                "".join(
                    part["text"]
                    for item in event["response"]["output"]
                    if item["type"] == "message"
                    for part in item["content"]
                )
            )
    client = server.client()
    chat = client.chat.completions.create(
        model="style-a", messages=[{"role": "user", "content": "Say something"}], max_tokens=16, temperature=0
    )
    assert outputs[0] == chat.choices[0].message.content
    assert outputs[1] != outputs[0]


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "no-such-adapter"}, 404, "model"),
        ({"model": "style-a", "lora_scale": -1}, 400, "lora_scale"),
        ({"model": "style-a", "lora_scale": 5.0}, 400, "lora_scale"),  # over model.lora_max_scale (4)
        ({"model": "style-a", "lora_scale": 1e9}, 400, "lora_scale"),
        ({"model": "test-model", "lora_scale": 1.0}, 400, "lora_scale"),
    ],
)
def test_bad_adapter_requests(server: Server, body: dict[str, Any], status: int, param: str) -> None:
    with server.http() as http:
        reply = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, **body})
    assert reply.status_code == status, reply.text
    assert reply.json()["error"]["param"] == param
    assert text(server, prompt="still serving", max_tokens=4)


def test_metrics_count_requests_tokens_switches_and_loaded_adapters(server: Server) -> None:
    # At least what these two requests add (5 tokens each, ignore_eos; a switch back to the base set).
    wanted = {
        'llamafleet_worker_lora_requests_total{adapter="style-a",worker="0"}': 1,
        'llamafleet_worker_lora_generated_tokens_total{adapter="style-a",worker="0"}': 5,
        'llamafleet_worker_lora_generated_tokens_total{adapter="",worker="0"}': 5,
        'llamafleet_worker_lora_adapter_switches_total{worker="0"}': 1,
    }
    before = server.metrics()
    text(server, "style-a", prompt="metrics", max_tokens=5)
    text(server, prompt="metrics", max_tokens=5)

    # Worker counters come with heartbeats (every 0.25 s): a scrape right after the answers often predates
    # them, so wait for the heartbeat that counts them.
    def added(samples: dict[str, float]) -> dict[str, float]:
        return {name: samples.get(name, 0.0) - before.get(name, 0.0) for name in wanted}

    metrics = server.wait_metrics(
        lambda m: all(added(m)[name] >= least for name, least in wanted.items()), added, timeout=10
    )
    assert metrics['llamafleet_worker_lora_adapters_loaded{worker="0"}'] == 2


def test_embeddings_refuse_an_adapter_name(server: Server) -> None:
    with server.http() as http:
        assert http.post("/v1/embeddings", json={"model": "test-model", "input": "hello"}).status_code == 200
        reply = http.post("/v1/embeddings", json={"model": "style-a", "input": "hello"})
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "model"
