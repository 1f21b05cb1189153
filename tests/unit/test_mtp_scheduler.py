"""draft-mtp through the worker's real scheduler and runner (no processes): exact against a plain engine.

Covers what the llama.cpp-level tests in test_mtp_drafter.py do not: chunked prefill sharing steps with
speculating sequences, `n > 1` (a sibling's prompt KV is copied, not decoded, so its MTP rows start with a
hole), more requests than sequence slots (ids are released and reused, with prefix-cache reuse), and the
per-provider counters the scheduler keeps for /metrics; and the separate assistant GGUF
(`draft_model_path`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shared.config import ModelOptions, WorkerOverride
from shared.protocol import SamplingParams, SubmitRequest
from tests.fixtures.tiny_mtp import write_tiny_mtp
from worker.engine import LlamaEngine
from worker.runner import build_scheduler
from worker.speculative.mtp import MtpDrafter
from worker.speculative.setup import build_speculation

Outputs = dict[tuple[str, int], list[int]]


def run(path: Path, **fields: Any) -> tuple[Outputs, dict[str, int], dict[str, int]]:
    options = ModelOptions(
        path=str(path), n_ctx=4 * 512, n_seq_max=4, n_batch=64, threads=1, threads_batch=1, **fields
    )
    engine = LlamaEngine(options, path, WorkerOverride())
    speculation = build_speculation(options, engine)
    sched = build_scheduler(engine, speculation=speculation)
    try:
        for i in range(6):
            prompt = [5 + (i * 13 + k * 7) % 250 for k in range(8 + 25 * i)]  # up to 133 tokens: chunked
            if i == 5:
                prompt = [5 + (k * 7) % 250 for k in range(8)] + [9, 9]  # reuses request 0's prefix
            params = SamplingParams(temperature=0.0)
            sched.submit(SubmitRequest(f"r{i}", prompt, 40, n=2 if i % 2 else 1, sampling=params))
        out: Outputs = {}
        while not sched.idle:
            result = sched.step()
            assert not result.errors
            for item in result.items:
                out.setdefault((item.rid, item.choice), []).extend(item.token_ids)
        if speculation is not None and speculation.drafter is not None:
            assert isinstance(speculation.drafter, MtpDrafter)
            assert speculation.drafter.decode_failures == 0
            counters = speculation.counters
            return out, dict(counters.drafted), dict(counters.accepted)
        return out, {}, {}
    finally:
        sched.close()
        engine.close()


def test_scheduler_greedy_with_mtp_equals_plain(tiny_mtp_gguf: Path) -> None:
    plain, _, _ = run(tiny_mtp_gguf)
    spec, drafted, accepted = run(tiny_mtp_gguf, draft_model="draft-mtp", draft_model_num_pred_tokens=3)
    assert len(plain) == 9 and all(len(tokens) == 40 for tokens in plain.values())
    assert spec == plain
    assert 0 < accepted["draft-mtp"] < drafted["draft-mtp"]


def test_an_assistant_gguf_drafts_as_the_models_own_block(tiny_mtp_gguf: Path, tmp_path: Path) -> None:
    """`draft_model_path`: the NextN block in a GGUF of its own, the target without it. Same weights, so the
    same drafts: identical outputs and identical drafted / accepted counts to the one-file model."""
    trunk = write_tiny_mtp(tmp_path / "trunk.gguf", part="trunk")
    nextn = write_tiny_mtp(tmp_path / "nextn.gguf", part="nextn")
    whole = run(tiny_mtp_gguf, draft_model="draft-mtp", draft_model_num_pred_tokens=3)
    split = run(trunk, draft_model="draft-mtp", draft_model_num_pred_tokens=3, draft_model_path=str(nextn))
    assert split == whole
    assert whole[2]["draft-mtp"] > 0


def test_p_min_cuts_unsure_drafts_and_stays_exact(tiny_mtp_gguf: Path) -> None:
    """`draft_model_p_min`: the head drafts only where its top token's probability reaches it (the tiny
    model's 276-token softmax is flat: 0.05 already halves the drafts and raises acceptance)."""
    plain, _, _ = run(tiny_mtp_gguf)
    eager = run(tiny_mtp_gguf, draft_model="draft-mtp", draft_model_num_pred_tokens=3)
    picky = run(tiny_mtp_gguf, draft_model="draft-mtp", draft_model_num_pred_tokens=3, draft_model_p_min=0.05)
    assert picky[0] == plain
    assert 0 < picky[1]["draft-mtp"] < eager[1]["draft-mtp"] * 2 // 3
    assert picky[2]["draft-mtp"] / picky[1]["draft-mtp"] > eager[2]["draft-mtp"] / eager[1]["draft-mtp"]
