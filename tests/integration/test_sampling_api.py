"""The completions / chat sampling API through real processes on the tiny generated model (F32, exact)."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.fixtures.model_fixtures import TinyLlamaFactory
from tests.fixtures.tiny_models import FIRST_BYTE_ID, TEXT_PIECES
from tests.integration.server import Server, model_config, run_server

CHAT = [{"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def server(tiny_llama_gguf: Path) -> Iterator[Server]:
    # Flash attention off: on the CPU its F16 accumulation makes logits depend on where KV cells sit
    # (prefix-cache hits, batch neighbours), enough to change a seeded sample now and then.
    with run_server(model_config(tiny_llama_gguf, n_seq_max=8, n_ctx=4096, flash_attn=False)) as running:
        yield running


def wait_for_metric(server: Server, name: str, expected: float, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        value = server.metrics().get(name)
        if value == expected:
            return
        assert time.monotonic() < deadline, f"{name} is {value}, expected {expected}"
        time.sleep(0.1)


def idle(server: Server) -> None:
    """Every sequence id free, no KV cell held: nothing leaked."""
    wait_for_metric(server, 'llamafleet_worker_running_sequences{worker="0"}', 0)
    wait_for_metric(server, 'llamafleet_worker_kv_cells_used{worker="0"}', 0)
    wait_for_metric(server, 'llamafleet_worker_seq_ids_free{worker="0"}', 8)
    wait_for_metric(server, 'llamafleet_worker_kv_cells_reserved{worker="0"}', 0)


def greedy(client: openai.OpenAI, prompt: str, max_tokens: int = 20, **kwargs: object) -> str:
    out = client.completions.create(
        model="test-model", prompt=prompt, max_tokens=max_tokens, temperature=0, **kwargs
    )
    return out.choices[0].text


def test_sixteen_concurrent_streams_finish_with_right_counts(server: Server) -> None:
    client = server.client()

    def run(i: int) -> tuple[int, str, int]:
        chunks = list(
            client.chat.completions.create(
                model="test-model",
                messages=[{"role": "user", "content": f"request {i}"}],
                max_tokens=10 + i,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        usage = chunks[-1].usage
        assert usage is not None
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finish == ["length"]
        return (
            i,
            "".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
            usage.completion_tokens,
        )

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(run, range(16)))
    for i, _, completion_tokens in results:
        assert completion_tokens == 10 + i
    # Batched greedy output equals the same request alone (exact on an F32 model).
    alone = client.chat.completions.create(
        model="test-model", messages=[{"role": "user", "content": "request 5"}], max_tokens=15, temperature=0
    )
    assert alone.choices[0].message.content == results[5][1]
    idle(server)


def test_greedy_is_deterministic_and_stream_matches(server: Server) -> None:
    client = server.client()
    first = greedy(client, "the quick brown fox", 30)
    assert first == greedy(client, "the quick brown fox", 30)
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="test-model", prompt="the quick brown fox", max_tokens=30, temperature=0, stream=True
        )
    )
    assert streamed == first


def test_seeded_sampling_reproducible_beside_other_requests(server: Server) -> None:
    client = server.client()

    def seeded() -> str:
        out = client.completions.create(
            model="test-model",
            prompt="once upon",
            max_tokens=24,
            temperature=1.0,
            seed=1234,
            extra_body={"top_k": 40},
        )
        return out.choices[0].text

    alone = seeded()
    stop = threading.Event()

    def noise() -> None:
        while not stop.is_set():
            client.completions.create(model="test-model", prompt="noise", max_tokens=8, temperature=0.9)

    threads = [threading.Thread(target=noise) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        busy = [seeded() for _ in range(3)]
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert busy == [alone] * 3
    other_seed = client.completions.create(
        model="test-model",
        prompt="once upon",
        max_tokens=24,
        temperature=1.0,
        seed=99,
        extra_body={"top_k": 40},
    )
    assert other_seed.choices[0].text != alone


def test_stop_string_across_tokens_never_leaks(server: Server) -> None:
    client = server.client()
    full = greedy(client, "hello", 40)
    # A stop string that starts inside the output and spans several tokens (byte tokens: ~1 char each).
    assert len(full) > 12
    stop = full[5:9]
    expected = full[: full.index(stop)]
    out = client.completions.create(
        model="test-model", prompt="hello", max_tokens=40, temperature=0, stop=[stop]
    )
    assert out.choices[0].text == expected
    assert out.choices[0].finish_reason == "stop"
    chunks = list(
        client.completions.create(
            model="test-model", prompt="hello", max_tokens=40, temperature=0, stop=[stop], stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"
    idle(server)


def test_include_usage_and_n2(server: Server) -> None:
    client = server.client()
    chunks = list(
        client.chat.completions.create(
            model="test-model",
            messages=CHAT,
            max_tokens=12,
            temperature=0.8,
            seed=7,
            n=2,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 24
    assert all(c.usage is None for c in chunks[:-1])
    texts = {0: "", 1: ""}
    for chunk in chunks[:-1]:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts[0] and texts[1] and texts[0] != texts[1]
    both = client.chat.completions.create(
        model="test-model", messages=CHAT, max_tokens=12, temperature=0, n=2
    )
    assert [c.index for c in both.choices] == [0, 1]
    assert both.choices[0].message.content == both.choices[1].message.content
    assert both.usage is not None and both.usage.completion_tokens == 24
    idle(server)


def test_completion_logprobs(server: Server) -> None:
    client = server.client()
    out = client.completions.create(
        model="test-model", prompt="hello", max_tokens=6, temperature=0, logprobs=3
    )
    logprobs = out.choices[0].logprobs
    assert logprobs is not None
    assert len(logprobs.tokens or []) == 6 and len(logprobs.token_logprobs or []) == 6
    assert logprobs.text_offset is not None and logprobs.text_offset[0] == 0
    for chosen, top in zip(logprobs.token_logprobs or [], logprobs.top_logprobs or [], strict=True):
        assert chosen <= 0 and len(top) == 3
        assert max(top.values()) == pytest.approx(chosen)  # greedy picks the best


def test_chat_logprobs(server: Server) -> None:
    client = server.client()
    out = client.chat.completions.create(
        model="test-model", messages=CHAT, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2
    )
    content = out.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 5
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)


def test_logit_bias_forces_a_token(server: Server) -> None:
    client = server.client()
    hello = FIRST_BYTE_ID + 256 + TEXT_PIECES.index("▁hello")
    out = client.completions.create(
        model="test-model", prompt="hello", max_tokens=5, temperature=0, logit_bias={str(hello): 100}
    )
    assert out.choices[0].text == " hello" * 5


# Output tokens of a request the client gives up on: several seconds of the tiny model's work, more than
# idle() waits, so a cancellation that never reaches the worker fails the test either way (the request
# would also end with far more tokens than the bound below).
CANCELLED_MAX_TOKENS = 30000


@pytest.fixture(scope="module")
def long_server(tiny_llama_factory: TinyLlamaFactory) -> Iterator[Server]:
    """The tiny llama with a context long enough for CANCELLED_MAX_TOKENS output tokens."""
    long_context = tiny_llama_factory(n_ctx_train=32768)
    with run_server(model_config(long_context, n_seq_max=8, n_ctx=32768, flash_attn=False)) as running:
        yield running


def generated_tokens(server: Server) -> float:
    return server.metrics().get('llamafleet_worker_generated_tokens_total{worker="0"}', 0.0)


def assert_cut_short(server: Server, before: float) -> None:
    """Idle again, and the request stopped long before its max_tokens: it was cancelled, not run out."""
    idle(server)
    generated = generated_tokens(server) - before
    print(f"{generated:.0f} of {CANCELLED_MAX_TOKENS} tokens generated before the cancel took effect")
    assert generated < CANCELLED_MAX_TOKENS / 4, f"{generated:.0f} tokens generated: never cancelled"


def test_cancelled_stream_frees_its_sequence(long_server: Server) -> None:
    server = long_server
    idle(server)
    before = generated_tokens(server)
    body = {"prompt": "hello", "max_tokens": CANCELLED_MAX_TOKENS, "stream": True, "ignore_eos": True}
    with server.http() as http, http.stream("POST", "/v1/completions", json=body) as response:
        assert next(line for line in response.iter_lines() if line).startswith("data: ")  # generating
    assert_cut_short(server, before)


def test_abandoned_non_streamed_request_frees_its_sequence(long_server: Server) -> None:
    server = long_server
    idle(server)
    before = generated_tokens(server)
    body = {"prompt": "hello", "max_tokens": CANCELLED_MAX_TOKENS, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout), server.http(timeout=0.3) as http:
        http.post("/v1/completions", json=body)
    assert_cut_short(server, before)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": "a", "presence_penalty": 3}),
        ("/v1/completions", {"prompt": "a", "frequency_penalty": -2.5}),
        ("/v1/completions", {"prompt": "a", "logprobs": 21}),
        ("/v1/completions", {"prompt": "a", "max_tokens": 0}),
        ("/v1/completions", {"prompt": "a", "n": 9}),
        ("/v1/completions", {"prompt": "a", "logit_bias": {"5": 101}}),
        ("/v1/completions", {"prompt": "a", "logit_bias": {"999999": 1}}),
        ("/v1/completions", {"prompt": "a", "top_k": -1}),
        ("/v1/completions", {"prompt": "a", "top_k": 2**40}),
        ("/v1/completions", {"prompt": "a", "seed": 2**70}),
        ("/v1/chat/completions", {"messages": CHAT, "repeat_last_n": 2**64}),
        ("/v1/completions", {"prompt": "a", "min_p": 2}),
        ("/v1/completions", {"prompt": []}),
        ("/v1/completions", {"prompt": "a", "temperature": 2.5}),
        ("/v1/completions", {"prompt": "a", "echo": True, "logprobs": 1}),
        ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}),
        ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": 0}),
        ("/v1/chat/completions", {"messages": [{"role": "user"}], "stop": ""}),
        ("/v1/chat/completions", {"messages": "hello"}),
        ("/v1/chat/completions", {"messages": CHAT, "tool_choice": "required"}),
    ],
)
def test_bad_values_are_400(server: Server, path: str, body: dict) -> None:
    with server.http() as http:
        response = http.post(path, json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_queue_overflow_answers_429(smollm2_gguf: Path) -> None:
    # SmolLM2 (not the tiny model, which would finish 4000 tokens before the next request arrives).
    model = model_config(smollm2_gguf, n_seq_max=1, n_ctx=8192)
    with run_server(model, server={"max_queued_requests": 1}) as server, server.http() as http:
        # Chat streams send their first (role) chunk at once, even while queued.
        long_body = {"messages": CHAT, "max_tokens": 4000, "ignore_eos": True, "stream": True}
        with http.stream("POST", "/v1/chat/completions", json=long_body) as first:
            first_lines = first.iter_lines()  # keep it: a dropped iterator closes the response
            next(first_lines)
            with http.stream("POST", "/v1/chat/completions", json=long_body) as queued:
                assert queued.status_code == 200
                third = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
                assert third.status_code == 429, third.text
                assert third.json()["error"]["type"] == "rate_limit_error"


def test_injected_failures_fail_one_request_only(tiny_llama_gguf: Path) -> None:
    env = {"LLAMAFLEET_INJECT_FAULTS": "decode=boom,sampler=badsampler,start=bugstart,sample=bugsample"}
    with run_server(model_config(tiny_llama_gguf), env=env) as server, server.http() as http:
        workers_before = server.workers()
        # ignore_eos: the exact count below must not depend on the batch neighbours (flash attention is
        # on here, so greedy logits shift with the batch the failing requests happen to share).
        body = {"prompt": "hello", "max_tokens": 200, "temperature": 0, "ignore_eos": True}
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            healthy = pool.submit(http.post, "/v1/completions", json=body)
            failing = {
                rid: pool.submit(http.post, "/v1/completions", json=body, headers={"x-request-id": rid})
                for rid in ("boom", "badsampler", "bugstart", "bugsample")
            }
        assert healthy.result().status_code == 200
        assert healthy.result().json()["usage"]["completion_tokens"] == 200
        statuses = {rid: future.result().status_code for rid, future in failing.items()}
        assert statuses == {"boom": 500, "badsampler": 400, "bugstart": 500, "bugsample": 500}
        for rid in ("boom", "bugstart", "bugsample"):
            assert failing[rid].result().json()["error"]["type"] == "server_error"
        after = http.post("/v1/completions", json={"prompt": "hello", "max_tokens": 3})
        assert after.status_code == 200
        server.wait_metric('llamafleet_worker_requests_failed_total{worker="0"}', 4)
        # The same worker process served everything: no failure took it down.
        assert server.workers() == workers_before
        assert "restarting" not in server.log()


def test_config_max_output_tokens_caps_requests(tiny_llama_gguf: Path) -> None:
    with run_server(model_config(tiny_llama_gguf, max_output_tokens=5)) as server:
        client = server.client()
        capped = client.completions.create(model="test-model", prompt="hello", max_tokens=50, temperature=0)
        chat = client.chat.completions.create(model="test-model", messages=CHAT, temperature=0)
    assert capped.usage is not None and capped.usage.completion_tokens == 5
    assert capped.choices[0].finish_reason == "length"
    assert chat.usage is not None and chat.usage.completion_tokens == 5


def test_unparsable_grammar_is_400_even_when_streaming(server: Server) -> None:
    with server.http() as http:
        for body in (
            {"messages": CHAT, "grammar": "root ::= (", "stream": True},
            {"messages": CHAT, "grammar": "root ::= (", "stream": False},
        ):
            response = http.post("/v1/chat/completions", json=body)
            assert response.status_code == 400, response.text
            assert response.json()["error"]["param"] == "grammar"
        ok = http.post(
            "/v1/completions", json={"prompt": "a", "grammar": 'root ::= "yes" | "no"', "max_tokens": 4}
        )
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] in ("yes", "no")
