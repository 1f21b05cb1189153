"""Prefix caching through real processes: a cache hit gives exactly the output of a miss (tiny F32 models)."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.server import Server, model_config, run_server

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "the",
    "lazy",
    "dog",
    "and",
    "then",
    "it",
    "runs",
    "far",
    "away",
    "into",
    "the",
    "woods",
]


def long_text(n_words: int, salt: int = 0) -> str:
    return " ".join(WORDS[(i * 7 + salt) % len(WORDS)] for i in range(n_words))


def complete(server: Server, prompt: str | list[int], max_tokens: int = 24) -> dict[str, Any]:
    with server.http() as http:
        reply = http.post(
            "/v1/completions",
            json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True},
        )
    assert reply.status_code == 200, reply.text
    return reply.json()  # type: ignore[no-any-return]


def text_and_cached(reply: dict[str, Any]) -> tuple[str, int]:
    return reply["choices"][0]["text"], reply["usage"]["prompt_tokens_details"]["cached_tokens"]


@pytest.fixture(scope="module", params=[True, False], ids=["unified-kv", "per-sequence-kv"])
def servers(tiny_llama_gguf: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Server, Server]]:
    """The same tiny model with the prefix cache on and off.

    Flash attention is off: on the CPU its F16 accumulation makes logits depend on where the KV cells sit
    (~1e-2), which flips near-ties of a random model; without it a copied prefix gives logits within 1e-6.
    """
    exact = {"n_ctx": 4096, "n_seq_max": 4, "flash_attn": False, "kv_unified": request.param}
    with (
        run_server(model_config(tiny_llama_gguf, **exact)) as cached,
        run_server(model_config(tiny_llama_gguf, **exact, prefix_cache=False)) as plain,
    ):
        yield cached, plain


def test_repeat_prompt_hits_and_matches_a_miss(servers: tuple[Server, Server]) -> None:
    cached, plain = servers
    prompt = long_text(120)
    first, first_cached = text_and_cached(complete(cached, prompt))
    second, second_cached = text_and_cached(complete(cached, prompt))
    reference, reference_cached = text_and_cached(complete(plain, prompt))
    assert first_cached == 0 and reference_cached == 0
    prompt_tokens = complete(plain, prompt, 1)["usage"]["prompt_tokens"]
    assert second_cached == prompt_tokens - 1  # all but the last prompt token, whose logits are needed
    assert first == second == reference


def test_continuation_reuses_prompt_and_generated_tokens(servers: tuple[Server, Server]) -> None:
    cached, plain = servers
    turn1 = complete(cached, long_text(80, salt=3), 16)
    prompt_tokens = turn1["usage"]["prompt_tokens"]
    # The next turn sends the whole conversation back: prompt + answer + a new part.
    turn2_prompt = long_text(80, salt=3) + turn1["choices"][0]["text"] + " and now something new"
    hit, hit_cached = text_and_cached(complete(cached, turn2_prompt))
    miss, _ = text_and_cached(complete(plain, turn2_prompt))
    assert hit == miss
    assert hit_cached >= prompt_tokens - 1


def test_concurrent_shared_prefix_requests(servers: tuple[Server, Server]) -> None:
    cached, plain = servers
    shared = long_text(150, salt=5)
    prompts = [f"{shared} question number {i}" for i in range(6)]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        hits = list(pool.map(lambda p: complete(cached, p), prompts))
    misses = [complete(plain, p) for p in prompts]
    assert [h["choices"][0]["text"] for h in hits] == [m["choices"][0]["text"] for m in misses]
    reused = sum(h["usage"]["prompt_tokens_details"]["cached_tokens"] for h in hits)
    shared_tokens = complete(plain, shared, 1)["usage"]["prompt_tokens"]
    assert reused >= 4 * (shared_tokens - 8), reused  # most of them copied the shared prefix


def test_n2_shares_the_prompt_and_hits_later(servers: tuple[Server, Server]) -> None:
    cached, plain = servers
    prompt = long_text(60, salt=9)
    with cached.http() as http:
        reply = http.post(
            "/v1/completions", json={"prompt": prompt, "max_tokens": 8, "temperature": 0, "n": 2}
        )
    texts = [c["text"] for c in reply.json()["choices"]]
    assert texts[0] == texts[1] == complete(plain, prompt, 8)["choices"][0]["text"]


def test_eviction_under_memory_pressure(tiny_llama_gguf: Path) -> None:
    # 1024 cells, 2 sequence ids: every new distinct prompt must evict cached KV, never fail.
    with run_server(model_config(tiny_llama_gguf, n_ctx=1024, n_seq_max=2)) as server:
        outputs = {}
        for salt in range(6):
            outputs[salt] = text_and_cached(complete(server, long_text(150, salt=salt * 11), 16))[0]
        again, again_cached = text_and_cached(complete(server, long_text(150, salt=55), 16))
        assert again == outputs[5] and again_cached > 0
        server.wait_metric('llamafleet_prefix_cache_evictions_total{worker="0"}', 3)
        server.wait_metric('llamafleet_prefix_cache_hits_total{worker="0"}', 1)


def test_disk_cache_survives_a_restart(tiny_llama_gguf: Path, tmp_path: Path) -> None:
    model = model_config(tiny_llama_gguf, n_ctx=4096, flash_attn=False)
    disk = {"disk_cache": {"path": str(tmp_path / "seq"), "max_bytes": 64 << 20, "min_tokens": 32}}
    prompt = long_text(100, salt=2)
    with run_server(model, extra=disk) as server:
        first, first_cached = text_and_cached(complete(server, prompt))
        server.wait_metric('llamafleet_disk_cache_saves_total{worker="0"}', 1)
    assert first_cached == 0
    files = list((tmp_path / "seq").glob("*.seq"))
    assert len(files) == 1
    (tmp_path / "seq" / "999-0123456789abcdef0123456789abcdef.seq").write_bytes(b"not a sequence state")
    with run_server(model, extra=disk) as server:
        again, again_cached = text_and_cached(complete(server, prompt))
        server.wait_metric('llamafleet_disk_cache_restores_total{worker="0"}', 1)
        server.wait_metric('llamafleet_disk_cache_invalid_removed_total{worker="0"}', 1)
        # A longer prompt (the next turn) also starts from the saved prefix.
        _longer, longer_cached = text_and_cached(complete(server, prompt + " and more"))
    assert again == first
    assert again_cached == complete_tokens(tiny_llama_gguf, prompt) - 1
    assert longer_cached >= again_cached
    assert not (tmp_path / "seq" / "999-0123456789abcdef0123456789abcdef.seq").exists()


def complete_tokens(model_path: Path, text: str) -> int:
    return len(complete_tokens_list(model_path, text))


FAMILIES = {
    "llama": "write_tiny_llama",
    "gemma3-swa": "write_tiny_gemma3",
    "mamba-recurrent": "write_tiny_recurrent",
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cache_hit_equals_miss_for_each_family(family: str, tmp_path: Path) -> None:
    from tests.fixtures import tiny_families, tiny_models

    writer = getattr(tiny_families, FAMILIES[family], None) or getattr(tiny_models, FAMILIES[family])
    path = writer(tmp_path / f"{family}.gguf")
    exact = {"n_ctx": 2048, "n_seq_max": 4, "flash_attn": False}
    prompt = complete_tokens_list(path, long_text(60, salt=4))
    extended = prompt + complete_tokens_list(path, " and a new question", bos=False)
    with (
        run_server(model_config(path, **exact)) as cached,
        run_server(model_config(path, **exact, prefix_cache=False)) as plain,
    ):
        first, _ = text_and_cached(complete(cached, prompt))
        repeat, _ = text_and_cached(complete(cached, prompt))
        turn, turn_cached = text_and_cached(complete(cached, extended))
        assert first == repeat == text_and_cached(complete(plain, prompt))[0]
        assert turn == text_and_cached(complete(plain, extended))[0]
    # Attention (also sliding-window, kept full) truncates the cached slot; the recurrent model restores
    # the state checkpointed at the end of the first prompt.
    assert turn_cached >= len(prompt) - 1, (family, turn_cached, len(prompt))


def complete_tokens_list(model_path: Path, text: str, bos: bool = True) -> list[int]:
    from shared.vocab import Vocab

    vocab = Vocab.load(model_path)
    try:
        return vocab.tokenize(text, add_special=bos, parse_special=True)  # as the server tokenizes
    finally:
        vocab.close()


@pytest.mark.slow
def test_multi_turn_chat_hits_all_but_the_new_turn(smollm2_gguf: Path) -> None:
    """On the real SmolLM2: the second turn's prompt is served from the first turn's KV up to the new
    message (the answer's tokens re-tokenize to what was generated)."""
    with run_server(model_config(smollm2_gguf, n_ctx=8192, n_seq_max=2)) as server:
        client = server.client()
        messages = [{"role": "user", "content": "Name three colours of the rainbow."}]
        first = client.chat.completions.create(
            model="test-model", messages=messages, max_tokens=20, temperature=0
        )
        assert first.usage is not None
        messages += [
            {"role": "assistant", "content": first.choices[0].message.content or ""},
            {"role": "user", "content": "And two more?"},
        ]
        second = client.chat.completions.create(
            model="test-model", messages=messages, max_tokens=5, temperature=0
        )
        assert second.usage is not None and second.usage.prompt_tokens_details is not None
        cached = second.usage.prompt_tokens_details.cached_tokens or 0
        # Everything of turn one (prompt and answer) is reused; only the new turn is prefilled.
        assert cached >= first.usage.prompt_tokens + first.usage.completion_tokens - 2, (cached, first.usage)
        assert second.usage.prompt_tokens - cached <= 16
