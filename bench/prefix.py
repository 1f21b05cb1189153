"""Prefix caching benchmarks: `python -m bench.prefix` (Gemma 3 270M, the real service, same run).

1. shared prefix: 24 requests sharing a ~1000-token prefix with ~20-token suffixes, 32 output tokens,
   concurrency 8; the same server with the prefix cache on and off (TTFT p50 and throughput ratios).
2. multi-turn chat: conversations that resend the whole history each turn; TTFT with the cache on and off.
3. disk: the first long prompt after a cold restart, served from the disk cache, against a full prefill.
4. routing: the prefix-cache hit rate of a multi-tenant workload with 1 worker and with 2 workers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from typing import Any

import httpx

from bench.serving import PASSAGE, make_prompts, run_load
from shared.config import load_config
from shared.models import resolve_model_path
from shared.vocab import Vocab


def _server(model: dict[str, Any], **kwargs: Any) -> Any:
    from tests.integration.server import run_server

    return run_server(model, api_key=None, passive_threads=False, **kwargs)


def shared_prefix(model: dict[str, Any], vocab: Vocab) -> None:
    prompts = make_prompts(vocab, 24, 1020, shared_prefix=1000, tag="shared-")
    results = {}
    for cache in (True, False):
        with _server({**model, "prefix_cache": cache}) as server:
            asyncio.run(run_load(server.base_url, make_prompts(vocab, 2, 64, tag="warm-"), 4, 1))
            results[cache] = asyncio.run(run_load(server.base_url, prompts, 32, 8))
    on, off = results[True], results[False]
    ttft_ratio = statistics.median(on.ttft) / statistics.median(off.ttft)
    throughput_ratio = (on.output_tokens / on.seconds) / (off.output_tokens / off.seconds)
    print("shared prefix (24 x ~1000-token shared prefix + ~20, 32 out, concurrency 8)")
    print(f"  cache on : {on.describe()}")
    print(f"  cache off: {off.describe()}")
    print(f"  TTFT p50 on/off = {ttft_ratio:.3f} (bar <= 0.15)")
    print(f"  throughput on/off = {throughput_ratio:.2f}x (bar >= 3)")


async def _chat_turns(base_url: str, conversations: int, turns: int) -> list[list[float]]:
    """TTFT of each turn of each conversation; every turn resends the history plus a new question."""
    ttfts: list[list[float]] = [[] for _ in range(turns)]
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
        for c in range(conversations):
            messages = [{"role": "system", "content": PASSAGE * 4 + f" Conversation {c}."}]
            for turn in range(turns):
                messages.append(
                    {"role": "user", "content": f"Question {turn}: tell me more about part {turn}."}
                )
                started = time.perf_counter()
                first = None
                text = ""
                body = {"messages": messages, "max_tokens": 24, "temperature": 0, "stream": True}
                async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                    async for line in response.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        choices = json.loads(line[6:])["choices"]
                        piece = (choices[0]["delta"].get("content") or "") if choices else ""
                        if piece and first is None:  # the first chunk only carries the role
                            first = time.perf_counter() - started
                        text += piece
                ttfts[turn].append(first or 0.0)
                messages.append({"role": "assistant", "content": text})
    return ttfts


def multi_turn(model: dict[str, Any]) -> None:
    rows = {}
    for cache in (True, False):
        with _server({**model, "prefix_cache": cache}) as server:
            rows[cache] = asyncio.run(_chat_turns(server.base_url, conversations=3, turns=4))
    print("multi-turn chat (3 conversations x 4 turns, ~400-token system prompt, 24 out)")
    for turn in range(4):
        on = statistics.median(rows[True][turn]) * 1000
        off = statistics.median(rows[False][turn]) * 1000
        print(f"  turn {turn + 1}: TTFT cache on {on:7.1f} ms  off {off:7.1f} ms  ratio {on / off:.2f}")


def disk_restart(model: dict[str, Any], vocab: Vocab) -> None:
    prompt = make_prompts(vocab, 1, 1000, tag="disk-")[0]
    with tempfile.TemporaryDirectory(prefix="lf-disk-") as folder:
        extra = {"disk_cache": {"path": folder, "max_bytes": 1 << 30, "min_tokens": 128}}
        with _server(model, extra=extra) as server:
            cold = asyncio.run(run_load(server.base_url, [prompt], 1, 1)).ttft[0]
            time.sleep(1.0)  # the writer thread saves in the background
        with _server(model, extra=extra) as server:
            warm = asyncio.run(run_load(server.base_url, [prompt], 1, 1)).ttft[0]
    print("disk cache (1000-token prompt; first request after a cold restart)")
    print(f"  full prefill TTFT {cold * 1000:.1f} ms, from disk after restart {warm * 1000:.1f} ms")
    print(f"  ratio {warm / cold:.3f} (bar <= 0.3)")


def routing(model: dict[str, Any], vocab: Vocab) -> None:
    tenants = [make_prompts(vocab, 1, 300, tag=f"tenant-{t}-")[0] for t in range(6)]
    requests: list[list[int]] = []
    for round_no in range(4):
        for t, system in enumerate(tenants):
            requests.append(
                system + vocab.tokenize(f" Question {round_no}-{t}?", add_special=False, parse_special=False)
            )
    print("routing (6 tenants x 4 rounds, ~300-token system prompts, concurrency 4)")
    for workers in ({"count": 1}, {"count": 2, "routing": "prefix"}, {"count": 2, "routing": "least_loaded"}):
        single = {**model, "threads": 1, "threads_batch": 1, "n_seq_max": 8, "n_ctx": 16384}
        with _server(single, workers=workers) as server:
            asyncio.run(run_load(server.base_url, requests, 4, 4))
            time.sleep(1.0)
            metrics = server.metrics()
        reused = sum(
            v for k, v in metrics.items() if k.startswith("llamafleet_prefix_cache_reused_tokens_total")
        )
        prompt = sum(v for k, v in metrics.items() if k.startswith("llamafleet_worker_prompt_tokens_total"))
        label = f"{workers['count']} worker(s) {workers.get('routing', '')}".strip()
        print(f"  {label:28s} hit rate {reused / prompt:.1%} ({reused:.0f} of {prompt:.0f} prompt tokens)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-C", "--config", default="configs/gemma-3-270m.json")
    parser.add_argument("--only", choices=["shared", "multi-turn", "disk", "routing"])
    args = parser.parse_args(argv)
    config = load_config(args.config)
    model_path = resolve_model_path(config.model)
    vocab = Vocab.load(model_path)
    model = config.model.model_dump(exclude_none=True)
    steps = {
        "shared": lambda: shared_prefix(model, vocab),
        "multi-turn": lambda: multi_turn(model),
        "disk": lambda: disk_restart(model, vocab),
        "routing": lambda: routing(model, vocab),
    }
    for name, step in steps.items():
        if args.only in (None, name):
            step()
    vocab.close()


if __name__ == "__main__":
    main()
