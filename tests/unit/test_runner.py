"""The model runner on a real tiny model: the greedy argmax shortcut picks llama.cpp's greedy token.

Plain greedy sequences skip llama_sampler_sample and read their row of the output logits by position
(llama.cpp keeps output rows in batch order); this runs the same requests with the shortcut on and off,
with chunked prefill, n > 1 and both KV layouts, and wants identical tokens.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.config import ModelOptions, WorkerOverride
from shared.protocol import SamplingParams, SubmitRequest
from worker.engine import LlamaEngine
from worker.runner import ModelRunner, build_scheduler
from worker.sampling import SamplerChain
from worker.step import Sampler


class NoShortcutRunner(ModelRunner):
    def new_sampler(self, submit: SubmitRequest, choice: int) -> Sampler:
        sampler = super().new_sampler(submit, choice)
        assert isinstance(sampler, SamplerChain)
        sampler.plain_greedy = False
        return sampler


def generate(engine: LlamaEngine, shortcut: bool) -> dict[tuple[str, int], list[int]]:
    sched = build_scheduler(engine)
    if not shortcut:
        runner = NoShortcutRunner(engine)
        sched.runner = runner
        sched.slots.memory = runner
    for i in range(6):
        prompt = [5 + (i * 13 + k * 7) % 250 for k in range(10 + 30 * i)]  # up to 160 tokens: chunked
        sched.submit(
            SubmitRequest(f"r{i}", prompt, 12, n=2 if i % 2 else 1, sampling=SamplingParams(temperature=0.0))
        )
    out: dict[tuple[str, int], list[int]] = {}
    while not sched.idle:
        result = sched.step()
        assert not result.errors
        for item in result.items:
            out.setdefault((item.rid, item.choice), []).extend(item.token_ids)
    sched.close()
    return out


@pytest.mark.parametrize("unified", [True, False])
def test_greedy_shortcut_matches_llama_cpp_greedy(tiny_llama_gguf: Path, unified: bool) -> None:
    options = ModelOptions(
        path=str(tiny_llama_gguf),
        n_ctx=16 * 512,
        n_seq_max=16,
        n_batch=64,
        kv_unified=unified,
        prefix_cache=False,
    )
    engine = LlamaEngine(options, tiny_llama_gguf, WorkerOverride())
    try:
        fast, slow = generate(engine, True), generate(engine, False)
    finally:
        engine.close()
    assert len(fast) == 9 and all(fast.values())
    assert fast == slow
