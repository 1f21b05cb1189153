"""Mixed LoRA traffic against plain traffic, same server, same run: `python -m bench.lora`.

llama.cpp applies LoRA adapters per context, so a step decodes one adapter set and the scheduler rotates
between sets (worker/adapter_policy.py). This measures what that costs: 16 concurrent streams, half on the
base model and half on one adapter, against 16 streams all on the base model, on the packaged SmolLM2 with a
random adapter written for its shapes at start (rank 8 on attn_q and attn_v, PEFT's default targets;
`--targets all` adapts every dense projection, which costs llama.cpp about half a base step more per step
on this CPU: three extra graph nodes per projection and layer). It prints the
throughput ratio mixed / all-base (target >= 0.65) and the inter-token latency p99 of each half. Rounds
alternate and the best of each side is kept (a shared, noisy machine).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.serving import LoadResult, _cpu_seconds, make_prompts, stream_completion
from shared.config import load_config
from shared.models import resolve_model_path
from shared.vocab import Vocab

ADAPTER = "bench-lora"


async def run_mix(
    base_url: str, base_model: str, prompts: list[list[int]], max_tokens: int, adapter_share: int
) -> tuple[float, LoadResult, LoadResult]:
    """All prompts at once; every `adapter_share`-th one (0: none) on the adapter. Returns the wall
    time and the base and adapter halves' results."""
    base = LoadResult(0.0, 0, 0)
    adapted = LoadResult(0.0, 0, 0)
    limits = httpx.Limits(max_connections=len(prompts) + 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:
        jobs = []
        for index, prompt in enumerate(prompts):
            on_adapter = adapter_share > 0 and index % adapter_share == 1
            target = adapted if on_adapter else base
            target.requests += 1
            model = ADAPTER if on_adapter else base_model
            jobs.append(stream_completion(client, prompt, max_tokens, target, {"model": model}))
        started = time.perf_counter()
        await asyncio.gather(*jobs)
        seconds = time.perf_counter() - started
    base.seconds = adapted.seconds = seconds
    return seconds, base, adapted


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000 if ordered else 0.0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-C", "--config", default="configs/default.json")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--switch-steps", type=int, default=None, help="model.lora_switch_steps")
    parser.add_argument(
        "--targets",
        default="attn_q,attn_v",
        help="adapted projections (PEFT's default q_proj, v_proj), or 'all' for every dense one",
    )
    parser.add_argument(
        "--passive-threads",
        action="store_true",
        help="OMP_WAIT_POLICY=passive (a machine shared with other work)",
    )
    args = parser.parse_args(argv)

    from tests.fixtures.tiny_lora import TARGETS, write_lora
    from tests.integration.server import run_server

    config = load_config(args.config)
    model_path = resolve_model_path(config.model)
    vocab = Vocab.load(model_path)
    rounds = [
        make_prompts(vocab, args.streams, args.prompt_tokens, tag=f"{r}-") for r in range(2 * args.rounds + 1)
    ]
    vocab.close()
    folder = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    targets = TARGETS if args.targets == "all" else tuple(args.targets.split(","))
    adapter = write_lora(folder / "random.gguf", model_path, seed=7, rank=8, gain=0.05, targets=targets)
    model = config.model.model_dump(exclude_none=True)
    model["n_seq_max"] = max(args.streams, model.get("n_seq_max", 1))
    model["loras"] = [{"path": str(adapter), "name": ADAPTER}]
    if args.switch_steps is not None:
        model["lora_switch_steps"] = args.switch_steps
    base_model = config.model.served_name
    plain_runs: list[float] = []
    mixed_runs: list[tuple[float, LoadResult, LoadResult]] = []
    plain_itl: list[float] = []
    # Tokens per CPU second of the worker: on a machine shared with other work, wall time measures the
    # neighbours as much as us; the worker's own CPU time per token does not.
    plain_cpu: list[float] = []
    mixed_cpu: list[float] = []
    with run_server(model, api_key=None, passive_threads=args.passive_threads) as server:
        asyncio.run(run_mix(server.base_url, base_model, rounds[0][:4], 4, 2))  # warm-up, both sets
        workers = server.workers()

        def worker_cpu() -> float:
            return sum(_cpu_seconds(workers).values())

        for round_no in range(args.rounds):
            cpu = worker_cpu()
            prompts = rounds[2 * round_no + 1]
            seconds, plain, _ = asyncio.run(run_mix(server.base_url, base_model, prompts, args.max_tokens, 0))
            plain_cpu.append(plain.output_tokens / max(worker_cpu() - cpu, 1e-9))
            plain_runs.append(plain.output_tokens / seconds)
            plain_itl.append(_p99(plain.itl))
            cpu = worker_cpu()
            prompts = rounds[2 * round_no + 2]
            mixed_run = asyncio.run(run_mix(server.base_url, base_model, prompts, args.max_tokens, 2))
            mixed_runs.append(mixed_run)
            seconds, base_half, adapter_half = mixed_run
            tokens = base_half.output_tokens + adapter_half.output_tokens
            mixed_cpu.append(tokens / max(worker_cpu() - cpu, 1e-9))
            print(
                f"round {round_no + 1}: all base {plain_runs[-1]:.1f} tok/s "
                f"(ITL p99 {plain_itl[-1]:.1f} ms), "
                f"mixed {tokens / seconds:.1f} tok/s (ITL p99 base {_p99(base_half.itl):.1f} ms, adapter "
                f"{_p99(adapter_half.itl):.1f} ms): ratio {tokens / seconds / plain_runs[-1]:.3f}, "
                f"per worker CPU second {mixed_cpu[-1] / plain_cpu[-1]:.3f}",
                flush=True,
            )
        switches = server.metrics().get('llamafleet_worker_lora_adapter_switches_total{worker="0"}', 0.0)
    best_plain = max(plain_runs)
    seconds, base_half, adapter_half = max(
        mixed_runs, key=lambda r: (r[1].output_tokens + r[2].output_tokens) / r[0]
    )
    mixed = (base_half.output_tokens + adapter_half.output_tokens) / seconds
    ratio = mixed / best_plain
    print(
        f"model {model_path.name}, {args.streams} streams x {args.prompt_tokens} prompt tokens, "
        f"{args.max_tokens} output tokens, best of {args.rounds} rounds, "
        f"adapter rank 8 on {','.join(targets)}"
    )
    print(f"all base        : {best_plain:7.1f} tok/s  ITL p99 {min(plain_itl):6.1f} ms")
    print(
        f"half on adapter : {mixed:7.1f} tok/s  ITL p99 base half {_p99(base_half.itl):6.1f} ms, "
        f"adapter half {_p99(adapter_half.itl):6.1f} ms"
    )
    print(
        f"throughput ratio mixed / all-base = {ratio:.3f}   (target >= 0.65); adapter switches {switches:.0f}"
    )
    cpu_ratio = max(mixed_cpu) / max(plain_cpu)
    print(f"tokens per worker CPU second, mixed / all-base = {cpu_ratio:.3f}")
    return {
        "ratio": ratio,
        "itl_p99_base_ms": _p99(base_half.itl),
        "itl_p99_adapter_ms": _p99(adapter_half.itl),
        "cpu_ratio": cpu_ratio,
    }


if __name__ == "__main__":
    main()
