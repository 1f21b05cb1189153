"""Prefix-aware routing across two workers: each tenant's system prompt keeps hitting one worker's cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.integration.server import Server, model_config, run_server
from tests.integration.test_prefix_cache import complete, long_text


def tenant_workload(server: Server, tenants: int = 3, rounds: int = 4) -> tuple[int, int]:
    """(cached prompt tokens, prompt tokens) over requests that share one of `tenants` system prompts."""
    cached = total = 0
    for round_no in range(rounds):
        for tenant in range(tenants):
            reply: dict[str, Any] = complete(
                server, f"{long_text(120, salt=tenant * 5)} question {round_no}", 4
            )
            cached += reply["usage"]["prompt_tokens_details"]["cached_tokens"]
            total += reply["usage"]["prompt_tokens"]
    return cached, total


def test_prefix_routing_keeps_hit_rate_with_two_workers(tiny_llama_gguf: Path) -> None:
    model = model_config(tiny_llama_gguf, n_ctx=2048, n_seq_max=4)
    rates = {}
    for name, workers in {
        "one": {"count": 1},
        "two-prefix": {"count": 2, "routing": "prefix"},
        "two-least-loaded": {"count": 2, "routing": "least_loaded"},
    }.items():
        with run_server(model, workers=workers) as server:
            cached, total = tenant_workload(server)
            rates[name] = cached / total
            print(f"{name}: cached {cached} of {total} prompt tokens ({cached / total:.1%})")
            if workers["count"] == 2:
                # Both workers served requests.
                for index in (0, 1):
                    server.wait_metric(f'llamafleet_worker_prompt_tokens_total{{worker="{index}"}}', 1)
    # Only the first request of each tenant misses when routing follows prefixes (3 of 12); taking
    # workers in turn sends each tenant to both, so each tenant misses twice.
    assert rates["two-prefix"] >= 0.7, rates
    assert rates["two-prefix"] >= rates["one"] - 0.05, rates
    assert rates["two-prefix"] > rates["two-least-loaded"], rates
