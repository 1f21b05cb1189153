"""The baseline: a tight llama-cpp-python loop with no HTTP, router or ZeroMQ.

It decodes the same number of sequences of the same lengths as the server benchmark, `concurrency` at a
time, in one llama_decode per step (all prompts of a wave prefilled together, then one row per sequence),
greedy-sampled with llama.cpp's own sampler: the best a Python program on these bindings can do.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import llama_cpp

from shared.config import ModelOptions, WorkerOverride
from worker.engine import LlamaEngine


@dataclass
class RawResult:
    seconds: float
    output_tokens: int
    prefill_seconds: float  # one prompt alone: the floor for time to first token

    @property
    def tokens_per_second(self) -> float:
        return self.output_tokens / self.seconds


class RawEngine:
    def __init__(self, options: ModelOptions, model_path: Path) -> None:
        self.engine = LlamaEngine(options, model_path, WorkerOverride())
        params = llama_cpp.llama_sampler_chain_default_params()
        self.greedy = llama_cpp.llama_sampler_chain_init(params)
        llama_cpp.llama_sampler_chain_add(self.greedy, llama_cpp.llama_sampler_init_greedy())

    def close(self) -> None:
        llama_cpp.llama_sampler_free(self.greedy)
        self.engine.close()

    def _clear(self) -> None:
        llama_cpp.llama_memory_clear(self.engine.memory, True)

    def prefill_time(self, prompt: list[int], repeats: int = 3, idle_before: float = 0.0) -> float:
        """Best-of time to prefill one prompt and sample its first token; `idle_before` seconds of rest
        first, as a server has between one client's requests (llama.cpp's threads sleep when idle)."""
        best = float("inf")
        batch = self.engine.batch
        for _ in range(repeats):
            self._clear()
            time.sleep(idle_before)
            started = time.perf_counter()
            done = 0
            while done < len(prompt):
                batch.clear()
                take = min(batch.capacity, len(prompt) - done)
                row = batch.add_chunk(prompt[done : done + take], done, 0, done + take == len(prompt))
                assert self.engine.decode(batch.size) == 0
                done += take
            llama_cpp.llama_sampler_sample(self.greedy, self.engine.ctx, row)
            best = min(best, time.perf_counter() - started)
        self._clear()
        return best

    def run(self, prompts: list[list[int]], max_tokens: int, concurrency: int) -> RawResult:
        batch = self.engine.batch
        started = time.perf_counter()
        produced = 0
        for wave_start in range(0, len(prompts), concurrency):
            wave = prompts[wave_start : wave_start + concurrency]
            self._clear()
            last_rows: dict[int, int] = {}
            positions = [0] * len(wave)
            pending = list(range(len(wave)))
            while pending:  # prefill the wave's prompts, packed into n_batch chunks
                batch.clear()
                still: list[int] = []
                for seq in pending:
                    prompt = wave[seq]
                    take = min(batch.free, len(prompt) - positions[seq])
                    if take <= 0:
                        still.append(seq)
                        continue
                    done = positions[seq] + take == len(prompt)
                    row = batch.add_chunk(
                        prompt[positions[seq] : positions[seq] + take], positions[seq], seq, done
                    )
                    positions[seq] += take
                    if done:
                        last_rows[seq] = row
                    else:
                        still.append(seq)
                assert self.engine.decode(batch.size) == 0
                for seq, row in list(last_rows.items()):
                    if row >= 0:
                        token = llama_cpp.llama_sampler_sample(self.greedy, self.engine.ctx, row)
                        last_rows[seq] = -1 - token  # remember the sampled token
                pending = still
            tokens = {seq: -1 - encoded for seq, encoded in last_rows.items()}
            produced += len(wave)
            for _ in range(max_tokens - 1):
                batch.clear()
                rows = {seq: batch.add_token(tokens[seq], positions[seq], seq, True) for seq in tokens}
                assert self.engine.decode(batch.size) == 0
                for seq, row in rows.items():
                    positions[seq] += 1
                    tokens[seq] = llama_cpp.llama_sampler_sample(self.greedy, self.engine.ctx, row)
                produced += len(rows)
        seconds = time.perf_counter() - started
        self._clear()
        return RawResult(seconds, produced, self.prefill_time(prompts[0]))
