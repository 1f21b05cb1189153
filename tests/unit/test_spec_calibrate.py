"""Step-cost measuring on a real (tiny) llama.cpp context: the measured sequence keeps exactly its KV."""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import pytest

from shared.config import ModelOptions, WorkerOverride
from shared.protocol import SamplingParams, SubmitRequest
from worker.engine import LlamaEngine
from worker.runner import build_scheduler
from worker.speculative.calibrate import measure_step_costs
from worker.speculative.setup import build_speculation


def _engine(path: Path, calibration: float | None = None) -> LlamaEngine:
    options = ModelOptions(
        path=str(path),
        n_ctx=1024,
        n_seq_max=2,
        n_batch=64,
        threads=1,
        draft_model_calibration_seconds=calibration,
    )
    return LlamaEngine(options, path, WorkerOverride())


def test_measuring_leaves_the_sequence_as_it_was(tiny_llama_gguf: Path) -> None:
    engine = _engine(tiny_llama_gguf)
    try:
        engine.batch.clear()
        engine.batch.add_chunk(list(range(5, 25)), 0, 1, True)
        assert engine.decode(engine.batch.size) == 0
        rows = measure_step_costs(engine, 1, 20, 17, budget=5.0)
        assert len(rows) == 17 and all(seconds > 0 for seconds in rows)
        assert llama_cpp.llama_memory_seq_pos_max(engine.memory, 1) == 19
        assert llama_cpp.llama_memory_seq_pos_max(engine.memory, 0) == -1
        # Near the context's end only what fits is measured.
        assert len(measure_step_costs(engine, 0, 1024 - 5, 17, budget=5.0)) == 5
    finally:
        engine.close()


@pytest.mark.parametrize("calibration", [None, 0.5, 0.0])
def test_greedy_output_is_the_same_with_a_measured_curve(
    tiny_llama_gguf: Path, calibration: float | None
) -> None:
    """A predicted output speculates with the measured curve (`draft_model_calibration_seconds` unset or
    a budget), or with none (0: acceptance alone); the answer equals the plain one."""
    outputs: list[list[int]] = []
    for speculative in (False, True):
        engine = _engine(tiny_llama_gguf, calibration)
        speculation = build_speculation(engine.options, engine)
        sched = build_scheduler(engine, speculation=speculation)
        try:
            prompt = [5 + (k * 7) % 250 for k in range(12)]
            params = SamplingParams(temperature=0.0)
            predicted = outputs[0] if outputs else None
            sched.submit(
                SubmitRequest("r", prompt, 40, sampling=params, speculative=speculative, prediction=predicted)
            )
            tokens: list[int] = []
            while not sched.idle:
                result = sched.step()
                assert not result.errors
                for item in result.items:
                    tokens.extend(item.token_ids)
            outputs.append(tokens)
            if speculative:
                assert speculation is not None
                if calibration == 0.0:
                    assert speculation.costs is None
                else:
                    assert speculation.costs is not None and len(speculation.costs.rows) == 33
                assert speculation.counters.accepted.get("prediction", 0) > 0
        finally:
            sched.close()
            engine.close()
    assert outputs[0] == outputs[1] and len(outputs[0]) == 40
