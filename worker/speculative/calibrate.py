"""Measures what a decode step costs by its number of output rows, on a live sequence.

Speculation's draft lengths are chosen from this curve (worker/speculative/costs.py). It is measured once,
when the first sequence that could speculate with a cheap provider is about to draft: by then the worker
serves and the machine is in its working state (measured at start, it also timed the router's start-up on
the same cores). The rows go to that sequence at the positions after its KV, every row asking for logits as
a verification row does, and are removed after each decode, so the sequence holds exactly what it held.
Each row count is timed up to twice (the lower time counts: a busy machine only ever adds time) within a
time budget; the entries beyond it are left out, and costs.py extrapolates. Tiny models take milliseconds,
Gemma 3 270M on 2 CPU cores about 1.5 s for 33 rows; the worker's other sequences wait that long, once.
"""

from __future__ import annotations

import logging
import time

from worker.engine import LlamaEngine

log = logging.getLogger(__name__)


def measure_step_costs(
    engine: LlamaEngine, seq_id: int, position: int, max_rows: int, budget: float
) -> list[float]:
    """Seconds of a decode step with 1 .. `max_rows` output rows (fewer if the budget ran out), decoded
    into `seq_id` at `position`.. (which must be free) and removed again."""
    max_rows = max(1, min(max_rows, engine.info.n_ctx_seq - position, engine.n_batch))
    n_vocab = engine.vocab.n_vocab
    tokens = [(7 + 13 * i) % n_vocab for i in range(max_rows)]
    batch = engine.batch

    def timed(n: int) -> float | None:
        batch.clear()
        batch.add_chunk(tokens[:n], position, seq_id, True)
        batch.want_logits[:n] = 1
        started = time.perf_counter()
        status = engine.decode(n)
        seconds = time.perf_counter() - started
        engine.seq_rm(seq_id, position, -1)
        return seconds if status == 0 else None

    started = time.perf_counter()
    timed(max_rows)  # warm-up: the first decode of a new shape allocates
    best: list[float] = []
    for _ in range(2):
        for n in range(1, max_rows + 1):
            if time.perf_counter() - started > budget and best:
                break
            seconds = timed(n)
            if seconds is None:  # cannot decode this many rows: measure no further
                break
            if n <= len(best):
                best[n - 1] = min(best[n - 1], seconds)
            elif n == len(best) + 1:
                best.append(seconds)
    batch.clear()
    log.info(
        "decode step costs measured for 1..%d output rows in %.2f s: %s ms",
        len(best),
        time.perf_counter() - started,
        " ".join(f"{s * 1e3:.1f}" for s in best),
    )
    return best
