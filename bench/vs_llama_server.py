"""llamafleet against llama.cpp's llama-server on the same GGUF, threads and context.

`python -m bench.vs_llama_server`. Needs a `llama-server` binary built from the llama.cpp sources
vendored in the installed llama-cpp-python (see README "Performance"); its path comes from
LLAMA_SERVER_BIN, and without it the bench says so and skips. Both servers run side by side but are
driven one at a time, rounds alternating, best round of
each side kept (the machine is shared and noisy: read the ratio).

1. single stream: one request at a time, a ~310-token prompt, 128 tokens out (greedy, ignore_eos);
   decode tokens/s counted from the first streamed token to the last, so prefill is not in it.
2. shared prefix: the prompt-cache workload (24 requests, ~850-token hot prefix + ~40 new tokens, 32 out,
   concurrency 8); output tokens/s over the whole run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.serving import make_prompts, run_load
from shared.config import ModelOptions, load_config
from shared.models import resolve_model_path
from shared.vocab import Vocab


@dataclass
class Stream:
    ttft: float
    decode_seconds: float  # first streamed token to last
    tokens: int

    @property
    def decode_rate(self) -> float:
        return (self.tokens - 1) / self.decode_seconds


async def _stream_one(base_url: str, prompt: list[int], max_tokens: int) -> Stream:
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
        started = time.perf_counter()
        first: float | None = None
        last = started
        async with client.stream("POST", "/v1/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                choices = json.loads(line[6:]).get("choices") or []
                if not choices or not choices[0].get("text"):
                    continue
                last = time.perf_counter()
                if first is None:
                    first = last
    assert first is not None, "no token streamed"
    return Stream(first - started, last - first, max_tokens)


@contextlib.contextmanager
def llama_server(
    binary: str, gguf: Path, options: ModelOptions, port: int, extra: Sequence[str] = ()
) -> Iterator[str]:
    """llama-server with the worker's context shape: n_ctx, slots, batch, threads, per-slot KV streams,
    full-size sliding-window KV (llama.cpp's context default, which the worker keeps); `extra` arguments
    after those (e.g. its speculative decoding)."""
    args = [
        binary,
        "-m",
        str(gguf),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-c",
        str(options.n_ctx),
        "-np",
        str(options.n_seq_max),
        "-b",
        str(options.n_batch),
        "-ub",
        str(options.n_ubatch or options.n_batch),
        "-t",
        str(options.threads),
        "-tb",
        str(options.threads_batch),
        "--kv-unified" if options.kv_unified else "--no-kv-unified",
        "--swa-full",
        "--cache-ram",
        "0",
        "--no-webui",
        *extra,
    ]
    log = tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log", delete=False)  # noqa: SIM115
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"llama-server exited: {Path(log.name).read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        else:
            raise RuntimeError("llama-server did not become healthy")
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        os.unlink(log.name)


def single_stream(
    urls: dict[str, str], vocab: Vocab, rounds: int, prompt_tokens: int, max_tokens: int
) -> None:
    best: dict[str, Stream] = {}
    for round_no in range(rounds):
        for name, url in urls.items():
            prompt = make_prompts(vocab, 1, prompt_tokens, tag=f"single-{name}-{round_no}-")[0]
            result = asyncio.run(_stream_one(url, prompt, max_tokens))
            if name not in best or result.decode_rate > best[name].decode_rate:
                best[name] = result
    print(f"single stream ({prompt_tokens}-token prompt, {max_tokens} out, best of {rounds})")
    for name, result in best.items():
        print(
            f"  {name:13s} decode {result.decode_rate:6.1f} tok/s ({1000 / result.decode_rate:5.2f} ms/token)"
            f"  TTFT {result.ttft * 1000:6.1f} ms"
        )
    ratio = best["llamafleet"].decode_rate / best["llama-server"].decode_rate
    print(f"  decode ratio llamafleet / llama-server = {ratio:.3f}")


def shared_prefix(urls: dict[str, str], vocab: Vocab, rounds: int) -> None:
    # Warm each server's cache with the hot prefix, then 24 requests sharing it.
    best: dict[str, float] = {}
    for round_no in range(rounds):
        for name, url in urls.items():
            tag = f"hot-{name}-{round_no}-"
            prompts = make_prompts(vocab, 25, 890, shared_prefix=850, tag=tag)
            asyncio.run(run_load(url, prompts[:1], 4, 1))
            result = asyncio.run(run_load(url, prompts[1:], 32, 8))
            best[name] = max(best.get(name, 0.0), result.output_tokens / result.seconds)
    print(f"shared prefix (24 x ~850-token hot prefix + ~40, 32 out, concurrency 8, best of {rounds})")
    for name, rate in best.items():
        print(f"  {name:13s} {rate:6.1f} output tok/s")
    print(f"  ratio llamafleet / llama-server = {best['llamafleet'] / best['llama-server']:.3f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-C", "--config", default="configs/gemma-3-270m.json")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=310)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--only", choices=["single", "shared"])
    args = parser.parse_args(argv)
    binary = os.environ.get("LLAMA_SERVER_BIN")
    if not binary or not Path(binary).is_file():
        print("skipped: set LLAMA_SERVER_BIN to a llama-server binary (README, Performance)")
        return
    from tests.integration.server import free_port, run_server

    config = load_config(args.config)
    model_path = resolve_model_path(config.model)
    vocab = Vocab.load(model_path)
    model = config.model.model_dump(exclude_none=True)
    with (
        run_server(model, api_key=None, passive_threads=False) as ours,
        llama_server(binary, model_path, config.model, free_port()) as theirs,
    ):
        urls: dict[str, Any] = {"llamafleet": ours.base_url, "llama-server": theirs}
        for url in urls.values():  # warm-up
            asyncio.run(_stream_one(url, make_prompts(vocab, 1, 32, tag="warm-")[0], 4))
        if args.only in (None, "single"):
            single_stream(urls, vocab, args.rounds, args.prompt_tokens, args.max_tokens)
        if args.only in (None, "shared"):
            shared_prefix(urls, vocab, args.rounds)
    vocab.close()


if __name__ == "__main__":
    main()
