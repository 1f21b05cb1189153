"""Budget closing for structured output: `python -m bench.structured_budget` (Gemma 3 270M, same run).

1. cost: tokens/s of json_schema requests (greedy, one at a time, budgets generous enough that the
   closer never steers, so both sides generate the same tokens) with budget tracking on and off
   (`structured_budget` in the model config); rounds alternate, the best of each side is kept.
   The machine this was written on is shared and was heavily loaded, so (1b) measures the same in one
   process: a greedy decode loop on the model with the worker's own SamplerChain, tracking on and off
   alternating, best of several rounds (decode included, the way a request spends its time).
2. budget hits: how often json_object prompts and the test schemas with their length bounds removed (free
   strings and arrays, the way a base model runs away) hit a 200-token budget, greedy and sampled, and how
   many answers parse: with tracking off (cut answers), on (closed answers), and on with
   `structured_repeat_limit` (looping free strings closed early); answers that did not hit the budget
   are compared between the last two (the repetition bound must not change them).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import json
import time
from typing import Any

import httpx

from shared.config import load_config
from shared.models import resolve_model_path
from tests.integration.structured_cases import SCHEMAS

COST_SCHEMAS = [s for s in SCHEMAS if s[0] in ("person", "address", "order", "meeting", "record", "deep")]


def _server(model: dict[str, Any]) -> Any:
    from tests.integration.server import run_server

    return run_server(model, api_key=None, passive_threads=False)


def unbounded(schema: Any) -> Any:
    """The schema with maxLength / maxItems / pattern / format removed: free strings and arrays."""
    if isinstance(schema, dict):
        drop = ("maxLength", "maxItems", "pattern", "format")
        return {k: unbounded(v) for k, v in schema.items() if k not in drop}
    if isinstance(schema, list):
        return [unbounded(v) for v in schema]
    return copy.deepcopy(schema)


def _ask(client: httpx.Client, model: str, prompt: str, fmt: dict[str, Any], **extra: Any) -> dict[str, Any]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "response_format": fmt,
        **extra,
    }
    response = client.post("/v1/chat/completions", json=body)
    response.raise_for_status()
    return dict(response.json())


def cost_round(base_url: str, model: str) -> tuple[int, float]:
    """Completion tokens and seconds of the cost requests, one at a time."""
    tokens, seconds = 0, 0.0
    with httpx.Client(base_url=base_url, timeout=600) as client:
        for name, description, schema in COST_SCHEMAS:
            fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}
            started = time.perf_counter()
            answer = _ask(
                client, model, f"Give me {description} as JSON.", fmt, max_tokens=1000, temperature=0
            )
            seconds += time.perf_counter() - started
            tokens += answer["usage"]["completion_tokens"]
    return tokens, seconds


def cost(model: dict[str, Any], rounds: int) -> None:
    best: dict[bool, float] = {}
    tokens: dict[bool, int] = {}
    for _ in range(rounds):
        for on in (True, False):
            with _server({**model, "structured_budget": on}) as server:
                cost_round(server.base_url, model["alias"])  # warm-up
                n, seconds = cost_round(server.base_url, model["alias"])
            tokens[on] = n
            best[on] = max(best.get(on, 0.0), n / seconds)
    print(f"cost: {len(COST_SCHEMAS)} json_schema requests, greedy, one at a time, best of {rounds} rounds")
    print(f"  tracking on : {best[True]:.1f} tok/s ({tokens[True]} tokens)")
    print(f"  tracking off: {best[False]:.1f} tok/s ({tokens[False]} tokens)")
    print(f"  on / off = {best[True] / best[False]:.3f}")


def decode_loop(path: str, rounds: int) -> None:
    """(1b) tokens/s of greedy json_schema decoding in one process, SamplerChain with and without budget."""
    import llama_cpp

    from router.structured.response_format import schema_grammar
    from shared.protocol import SamplingParams
    from shared.vocab import init_backend
    from worker.sampling import SamplerChain

    init_backend()
    model = llama_cpp.llama_model_load_from_file(path.encode(), llama_cpp.llama_model_default_params())
    vocab = llama_cpp.llama_model_get_vocab(model)
    n_vocab = int(llama_cpp.llama_vocab_n_tokens(vocab))
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_threads, params.n_threads_batch = 2048, 2, 2
    ctx = llama_cpp.llama_init_from_model(model, params)
    memory = llama_cpp.llama_get_memory(ctx)

    def run(grammar: str, prompt: bytes, budget: int) -> tuple[int, float]:
        llama_cpp.llama_memory_clear(memory, True)
        ids = (llama_cpp.llama_token * 512)()
        n = llama_cpp.llama_tokenize(vocab, prompt, len(prompt), ids, 512, True, True)
        llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(ids, n))
        sampler = SamplerChain(vocab, n_vocab, SamplingParams(temperature=0.0), grammar, 0, budget=budget)
        started, count = time.perf_counter(), 0
        for _ in range(400):
            token = sampler.sample(ctx, -1)
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                break
            count += 1
            one = (llama_cpp.llama_token * 1)(token)
            llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(one, 1))
        sampler.close()
        return count, time.perf_counter() - started

    jobs = [
        (schema_grammar(schema, "x").grammar, f"<start_of_turn>user\nGive me {d} as JSON.<end_of_turn>\n")
        for _, d, schema in COST_SCHEMAS
    ]
    best = {True: 0.0, False: 0.0}
    tokens = {True: 0, False: 0}
    for _ in range(rounds):
        for on in (True, False):
            total_tokens, total_seconds = 0, 0.0
            for grammar, text in jobs:
                count, seconds = run(grammar, (text + "<start_of_turn>model\n").encode(), 1000 if on else 0)
                total_tokens += count
                total_seconds += seconds
            tokens[on] = total_tokens
            best[on] = max(best[on], total_tokens / total_seconds)
    print(f"cost in one process: {len(jobs)} json_schema documents, greedy decode loop, best of {rounds}")
    print(f"  tracking on : {best[True]:.1f} tok/s ({tokens[True]} tokens)")
    print(f"  tracking off: {best[False]:.1f} tok/s ({tokens[False]} tokens)")
    print(f"  on / off = {best[True] / best[False]:.3f}")
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)


def budget_hits(model: dict[str, Any], budget: int, repeat_limit: int) -> None:
    formats: list[tuple[str, str, dict[str, Any]]] = [
        ("json_object", "a JSON object", {"type": "json_object"})
    ]
    formats += [
        (
            name,
            description,
            {"type": "json_schema", "json_schema": {"name": name, "schema": unbounded(schema)}},
        )
        for name, description, schema in SCHEMAS
    ]
    unhit: dict[str, dict[int, str]] = {}
    settings = [("off", False, 0), ("on", True, 0), (f"on, repeat limit {repeat_limit}", True, repeat_limit)]
    for label, on, limit in settings:
        with _server({**model, "structured_budget": on, "structured_repeat_limit": limit}) as server:

            def one(job: tuple[str, str, dict[str, Any], float]) -> tuple[bool, bool, bool, str]:
                _, description, fmt, temperature = job
                with httpx.Client(base_url=server.base_url, timeout=600) as client:
                    answer = _ask(
                        client,
                        model["alias"],
                        f"Give me {description} as JSON.",
                        fmt,
                        max_tokens=budget,
                        temperature=temperature,
                        seed=7,
                    )
                choice = answer["choices"][0]
                hit = choice["finish_reason"] == "length" or bool(choice.get("budget_closed"))
                try:
                    json.loads(choice["message"]["content"])
                    parses = True
                except ValueError:
                    parses = False
                return hit, parses, choice["finish_reason"] == "stop", choice["message"]["content"]

            jobs = [(n, d, f, t) for n, d, f in formats for t in (0.0, 0.8)]
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                results = list(pool.map(one, jobs))
            hits = sum(r[0] for r in results)
            parses = sum(r[1] for r in results)
            stops = sum(r[2] for r in results)
            unhit[label] = {i: r[3] for i, r in enumerate(results) if not r[0]}
            print(
                f"  tracking {label}: {hits}/{len(results)} hit the {budget}-token budget, "
                f"{parses}/{len(results)} parse, {stops}/{len(results)} finish 'stop'"
            )
    plain, bounded = unhit["on"], unhit[settings[2][0]]
    same = sum(1 for i, text in plain.items() if bounded.get(i) == text)
    print(f"  answers within budget without the bound, unchanged with it: {same}/{len(plain)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-C", "--config", default="configs/gemma-3-270m.json")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", choices=["cost", "decode", "hits"])
    parser.add_argument("--repeat-limit", type=int, default=48)
    args = parser.parse_args(argv)
    config = load_config(args.config)
    model = config.model.model_dump(exclude_none=True)
    model.update(n_ctx=8192, n_seq_max=4, prefix_cache=False)
    if args.only in (None, "cost"):
        cost(model, args.rounds)
    if args.only in (None, "decode"):
        decode_loop(str(resolve_model_path(config.model)), 2 * args.rounds)
    if args.only in (None, "hits"):
        print("budget hits: json_object + 20 schemas without length bounds, greedy and sampled (seed 7)")
        budget_hits(model, 200, args.repeat_limit)


if __name__ == "__main__":
    main()
