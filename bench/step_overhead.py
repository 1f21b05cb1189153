"""Host overhead of one engine step: `python -m bench.step_overhead` (part of `make bench`).

A GPU finishes a small model's decode step in a few milliseconds, so the Python time between two
`llama_decode` calls bounds GPU throughput. This drives the worker's scheduler directly (no router, no
sockets) with 1, 16 and 64 running sequences decoding greedily, and reports the time per step spent
outside llama_decode: planning, batch fill, sampler calls, commit and encoding the frames message. The
model is the self-made tiny llama (a ~300-token byte vocabulary) unless `--model PATH` names a GGUF;
the sampler's cost grows with the vocabulary.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from shared import protocol
from shared.config import ModelOptions, WorkerOverride
from shared.protocol import SamplingParams, SubmitRequest
from worker.engine import LlamaEngine
from worker.runner import build_scheduler

BARS_MS = {16: 1.0, 64: 3.0}


def measure(engine: LlamaEngine, n_seqs: int, steps: int) -> tuple[float, float]:
    """Median ms per step outside llama_decode, and median ms inside it."""
    sched = build_scheduler(engine)
    codec = protocol.worker_codec()
    decode_s = 0.0
    real_decode = engine.decode

    def timed_decode(n_tokens: int) -> int:
        nonlocal decode_s
        started = time.perf_counter()
        status = real_decode(n_tokens)
        decode_s += time.perf_counter() - started
        return status

    engine.decode = timed_decode  # type: ignore[method-assign]
    try:
        for i in range(n_seqs):
            prompt = [10 + (i * 7 + k) % 200 for k in range(12)]
            sched.submit(
                SubmitRequest(
                    f"r{i}",
                    prompt,
                    max_tokens=steps + 64,
                    sampling=SamplingParams(temperature=0.0),
                    ignore_eos=True,
                )
            )
        while any(r.prefilling for r in sched.running.values()) or sched.waiting:
            sched.step()
        outside: list[float] = []
        inside: list[float] = []
        for _ in range(steps):
            decode_s = 0.0
            started = time.perf_counter()
            result = sched.step()
            codec.encode(protocol.Frames(result.items))
            total = time.perf_counter() - started
            assert len(result.items) == n_seqs, "every sequence produces a token each step"
            outside.append((total - decode_s) * 1e3)
            inside.append(decode_s * 1e3)
        return statistics.median(outside), statistics.median(inside)
    finally:
        engine.decode = real_decode  # type: ignore[method-assign]
        sched.close()


def main(argv: list[str] | None = None) -> dict[int, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="a GGUF (default: the tiny llama)")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if path is None:
            from tests.fixtures.tiny_models import write_tiny_llama

            path = write_tiny_llama(Path(tmp) / "tiny.gguf")
        options = ModelOptions(path=str(path), n_ctx=64 * 256, n_seq_max=64, n_batch=512, prefix_cache=False)
        engine = LlamaEngine(options, path, WorkerOverride())
        results: dict[int, float] = {}
        try:
            print(
                f"host time per engine step outside llama_decode ({path.name}, n_vocab {engine.info.n_vocab})"
            )
            for n in (1, 16, 64):
                outside, inside = measure(engine, n, args.steps)
                results[n] = outside
                bar = ""
                if n in BARS_MS:
                    bar = f" (bar <= {BARS_MS[n]:.1f} ms{', OVER' if outside > BARS_MS[n] else ''})"
                print(
                    f"  {n:3d} sequences: {outside:6.3f} ms outside decode{bar}, {inside:7.3f} ms in decode"
                )
        finally:
            engine.close()
    return results


if __name__ == "__main__":
    main()
