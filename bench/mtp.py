"""draft-mtp: acceptance and speed-up of the NextN head on tiny generated glm4moe models.

No packaged model has NextN layers, so this runs the worker's real scheduler and runner (no HTTP) on the
generated models of tests/fixtures/tiny_mtp.py: the default one (2 trunk blocks, width 64: the target is
about as cheap as its NextN head, so a drafted token costs nearly what a target token does) and a deeper
one (12 trunk blocks, width 256: the head is one block against twelve, the shape of a real MTP model).
Each line: greedy, `max_tokens` output tokens per request, tokens/s with draft-mtp at k draft tokens
against the same engine without speculation measured in the same run (best of `--repeats` runs each), and
the acceptance rate (overall and by draft position). Timings on a shared CPU are noisy; acceptance is
deterministic.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.config import ModelOptions, WorkerOverride
from shared.protocol import SamplingParams, SubmitRequest
from tests.fixtures.tiny_mtp import write_tiny_mtp
from worker.engine import LlamaEngine
from worker.runner import build_scheduler
from worker.speculative.setup import build_speculation

MODELS: dict[str, dict[str, Any]] = {
    "tiny (2 blocks, width 64)": {},
    "deeper (12 blocks, width 256)": {"n_layer": 12, "n_embd": 256, "n_ff": 512, "residual_gain": 0.05},
}


@dataclass
class Run:
    seconds: float
    tokens: int
    drafted: int
    accepted: int
    drafted_at: list[int]
    accepted_at: list[int]

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


def run(path: Path, concurrency: int, max_tokens: int, threads: int, **fields: Any) -> Run:
    options = ModelOptions(
        path=str(path),
        n_ctx=concurrency * 1024,
        n_seq_max=concurrency,
        n_batch=256,
        threads=threads,
        threads_batch=threads,
        prefix_cache=False,
        **fields,
    )
    engine = LlamaEngine(options, path, WorkerOverride())
    speculation = build_speculation(options, engine)
    sched = build_scheduler(engine, speculation=speculation)
    try:
        for i in range(concurrency):
            prompt = [5 + (i * 31 + k * 7) % 250 for k in range(48)]
            params = SamplingParams(temperature=0.0)
            sched.submit(SubmitRequest(f"r{i}", prompt, max_tokens, sampling=params))
        tokens = 0
        started = time.perf_counter()
        while not sched.idle:
            result = sched.step()
            tokens += sum(len(item.token_ids) for item in result.items)
        seconds = time.perf_counter() - started
        c = speculation.counters if speculation is not None else None
        if c is None or options.draft_model is None:
            return Run(seconds, tokens, 0, 0, [], [])
        return Run(
            seconds,
            tokens,
            c.drafted.get("draft-mtp", 0),
            c.accepted.get("draft-mtp", 0),
            list(c.drafted_at),
            list(c.accepted_at),
        )
    finally:
        sched.close()
        engine.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ks", default="1,2,3")
    parser.add_argument("--concurrency", default="1,4")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs per figure")
    args = parser.parse_args(argv)

    def best(path: Path, concurrency: int, **fields: Any) -> Run:
        runs = [run(path, concurrency, args.max_tokens, args.threads, **fields) for _ in range(args.repeats)]
        return min(runs, key=lambda r: r.seconds)

    ks = [int(k) for k in args.ks.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        for label, shape in MODELS.items():
            path = write_tiny_mtp(Path(tmp) / "mtp.gguf", **shape)
            for concurrency in (int(c) for c in args.concurrency.split(",")):
                base = best(path, concurrency)
                print(
                    f"{label}, concurrency {concurrency}: no speculation {base.tokens_per_second:.0f} tok/s"
                )
                for k in ks:
                    r = best(path, concurrency, draft_model="draft-mtp", draft_model_num_pred_tokens=k)
                    by_position = " ".join(
                        f"{a / d:.2f}" for a, d in zip(r.accepted_at, r.drafted_at, strict=True) if d
                    )
                    print(
                        f"  k={k}: {r.tokens_per_second:.0f} tok/s = "
                        f"{r.tokens_per_second / base.tokens_per_second:.2f}x, "
                        f"accepted {r.accepted}/{r.drafted} = {r.accepted / max(r.drafted, 1):.2f} "
                        f"(by draft position: {by_position})"
                    )


if __name__ == "__main__":
    main()
