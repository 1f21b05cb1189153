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

import pytest

from shared.config import FromPretrainedOptions, ModelOptions, WorkerOverride
from shared.protocol import SamplingParams, SubmitRequest
from tests.fixtures.tiny_mtp import write_tiny_mtp
from tests.unit.test_mtp_drafter import reference_head_argmax, reference_hidden
from worker.engine import LlamaEngine
from worker.runner import build_scheduler
from worker.scheduler import Scheduler
from worker.speculative import mtp as mtp_module
from worker.speculative.base import DraftSeq, TargetRows
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


def test_an_assistant_gguf_drafts_as_the_models_own_block(
    tiny_mtp_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`draft_model_path`: the NextN block in a GGUF of its own, the target without it. Same weights, so the
    same drafts: identical outputs and identical drafted / accepted counts to the one-file model."""
    trunk = write_tiny_mtp(tmp_path / "trunk.gguf", part="trunk")
    nextn = write_tiny_mtp(tmp_path / "nextn.gguf", part="nextn")
    whole = run(tiny_mtp_gguf, draft_model="draft-mtp", draft_model_num_pred_tokens=3)
    split = run(trunk, draft_model="draft-mtp", draft_model_num_pred_tokens=3, draft_model_path=str(nextn))
    assert split == whole
    assert whole[2]["draft-mtp"] > 0
    # The same assistant named by draft_model_from_pretrained (the hub download itself is not under test).
    asked: list[FromPretrainedOptions] = []

    def resolve(options: FromPretrainedOptions) -> Path:
        asked.append(options)
        return nextn

    monkeypatch.setattr(mtp_module, "resolve_from_pretrained", resolve)
    hub = {"repo_id": "example/assistant-GGUF", "filename": "nextn.gguf"}
    pretrained = run(
        trunk, draft_model="draft-mtp", draft_model_num_pred_tokens=3, draft_model_from_pretrained=hub
    )
    assert pretrained == whole
    assert [(o.repo_id, o.filename) for o in asked] == [("example/assistant-GGUF", "nextn.gguf")]


def test_p_min_cuts_unsure_drafts_and_stays_exact(tiny_mtp_gguf: Path) -> None:
    """`draft_model_p_min`: the head drafts only where its top token's probability reaches it (the tiny
    model's 276-token softmax is flat: 0.05 already halves the drafts and raises acceptance)."""
    plain, _, _ = run(tiny_mtp_gguf)
    eager = run(tiny_mtp_gguf, draft_model="draft-mtp", draft_model_num_pred_tokens=3)
    picky = run(tiny_mtp_gguf, draft_model="draft-mtp", draft_model_num_pred_tokens=3, draft_model_p_min=0.05)
    assert picky[0] == plain
    assert 0 < picky[1]["draft-mtp"] < eager[1]["draft-mtp"] * 2 // 3
    assert picky[2]["draft-mtp"] / picky[1]["draft-mtp"] > eager[2]["draft-mtp"] / eager[1]["draft-mtp"]


def test_a_continued_conversation_keeps_the_heads_context(tmp_path: Path) -> None:
    """A second turn reuses the first turn's cached KV (same sequence slot): the MTP rows of the first
    turn must still be there, so every draft of the second turn is the head's prediction over the whole
    text, as a from-scratch recomputation gives it (not over the second turn's rows alone). The head's
    attention is made strong here (head_gain 1) so that its context decides its argmax."""
    path = write_tiny_mtp(tmp_path / "attentive.gguf", head_gain=1.0)
    options = ModelOptions(
        path=str(path),
        n_ctx=2 * 512,
        n_seq_max=2,
        n_batch=64,
        threads=1,
        threads_batch=1,
        draft_model="draft-mtp",
        draft_model_num_pred_tokens=3,
    )
    engine = LlamaEngine(options, path, WorkerOverride())
    speculation = build_speculation(options, engine)
    assert speculation is not None and isinstance(speculation.drafter, MtpDrafter)
    drafter = speculation.drafter
    seen: list[tuple[list[int], int]] = []
    draft = drafter.draft

    def recording(seqs: list[DraftSeq]) -> list[list[int]]:
        drafts = draft(seqs)
        seen.extend((list(s.tokens), d[0]) for s, d in zip(seqs, drafts, strict=True) if d)
        return drafts

    drafter.draft = recording  # type: ignore[method-assign]
    sched = build_scheduler(engine, speculation=speculation)
    greedy = SamplingParams(temperature=0.0)
    try:
        first = [5 + (k * 11) % 250 for k in range(40)]
        sched.submit(SubmitRequest("turn1", first, 30, sampling=greedy))
        answer = finish(sched)["turn1"]
        second = [*first, *answer, *(9 + k for k in range(10))]
        sched.submit(SubmitRequest("turn2", second, 30, sampling=greedy))
        text = [*second, *finish(sched)["turn2"]]
        hidden = reference_hidden(engine.model, text, drafter.n_embd)
        expected = reference_head_argmax(engine.model, text, hidden, drafter.n_vocab)
        turn2 = [(tokens, d) for tokens, d in seen if len(tokens) > len(second)]
        assert len(turn2) > 5
        assert [d for _, d in turn2] == [expected[len(tokens) - 1] for tokens, _ in turn2]
    finally:
        sched.close()
        engine.close()


def finish(sched: Scheduler) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    while not sched.idle:
        result = sched.step()
        assert not result.errors
        for item in result.items:
            out.setdefault(item.rid, []).extend(item.token_ids)
    return out


def test_a_sibling_borrows_the_prompt_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`n = 2`: the second choice gets the prompt's target KV by copy, never decoded; its MTP rows for the
    prompt are copied from the first choice's, so its drafts see the whole prompt: they equal the head
    recomputed over its full text (its first own row has no known hidden state: zero there, as fed)."""
    path = write_tiny_mtp(tmp_path / "attentive.gguf", head_gain=1.0)
    options = ModelOptions(
        path=str(path),
        n_ctx=2 * 512,
        n_seq_max=2,
        n_batch=64,
        threads=1,
        threads_batch=1,
        draft_model="draft-mtp",
        draft_model_num_pred_tokens=3,
    )
    engine = LlamaEngine(options, path, WorkerOverride())
    speculation = build_speculation(options, engine)
    assert speculation is not None and isinstance(speculation.drafter, MtpDrafter)
    drafter = speculation.drafter
    first_positions: dict[int, int] = {}
    seen: list[tuple[int, list[int], int]] = []
    stash, draft = MtpDrafter._stash_kept, drafter.draft

    def observing(self: MtpDrafter, item: TargetRows) -> None:
        first_positions.setdefault(item.seq_id, item.position)
        stash(self, item)

    def recording(seqs: list[DraftSeq]) -> list[list[int]]:
        drafts = draft(seqs)
        seen.extend((s.seq_id, list(s.tokens), d[0]) for s, d in zip(seqs, drafts, strict=True) if d)
        return drafts

    monkeypatch.setattr(MtpDrafter, "_stash_kept", observing)
    drafter.draft = recording  # type: ignore[method-assign]
    sched = build_scheduler(engine, speculation=speculation)
    try:
        prompt = [5 + (k * 11) % 250 for k in range(60)]
        sched.submit(SubmitRequest("r", prompt, 40, n=2, sampling=SamplingParams(temperature=0.0)))
        finish(sched)
        siblings = [seq_id for seq_id, position in first_positions.items() if position > 0]
        assert len(siblings) == 1
        sibling = siblings[0]
        drafts = [(tokens, d) for seq_id, tokens, d in seen if seq_id == sibling]
        text = max((tokens for tokens, _ in drafts), key=len)
        hidden = reference_hidden(engine.model, text, drafter.n_embd)
        expected = reference_head_argmax(
            engine.model, text, hidden, drafter.n_vocab, zero_at=first_positions[sibling]
        )
        assert len(drafts) > 5
        assert [d for _, d in drafts] == [expected[len(tokens) - 1] for tokens, _ in drafts]
    finally:
        sched.close()
        engine.close()
