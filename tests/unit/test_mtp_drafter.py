"""The MTP drafter at the llama.cpp level, on the tiny glm4moe with one NextN block.

A small loop plays the runner's part (several sequences in one target batch, drafts verified greedily row
by row, rejected KV removed, `after_target_decode` then `rollback`), so these tests pin the drafter's own
contract: greedy output equals plain greedy, drafts are the NextN head's real predictions (the same as a
from-scratch recomputation over the final text, which fails if any hidden state is fed to the wrong row),
and the start-up checks name their config field.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import numpy.typing as npt
import pytest
from llama_cpp import llama_cpp_ext

from shared.config import ConfigError, ModelOptions, WorkerOverride
from shared.vocab import init_backend
from tests.fixtures.tiny_families import write_tiny_recurrent
from tests.fixtures.tiny_mtp import write_tiny_mtp
from worker.batch import BatchBuffer
from worker.engine import LlamaEngine
from worker.speculative.base import DraftSeq, TargetRows
from worker.speculative.mtp import MtpDrafter, load_mtp_params
from worker.speculative.setup import build_speculation

N_CTX = 2048
N_BATCH = 64
N_SEQ = 4
N_GEN = 60
PROMPTS = [
    [1, *range(40, 70)],
    [1, *range(100, 105)],
    [1, *(7 + (i * 37) % 250 for i in range(90))],  # longer than N_BATCH: two prefill chunks
]


@pytest.fixture(scope="module")
def mtp_model(tiny_mtp_gguf: Path) -> Iterator[Any]:
    init_backend()
    model = llama_cpp.llama_model_load_from_file(str(tiny_mtp_gguf).encode(), load_mtp_params())
    assert model
    yield model
    llama_cpp.llama_model_free(model)


def new_target(model: Any) -> Any:
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = N_CTX, N_BATCH, N_BATCH, N_SEQ
    params.n_threads = params.n_threads_batch = 1
    ctx = llama_cpp.llama_init_from_model(model, params)
    assert ctx
    return ctx


def new_drafter(model: Any, target: Any) -> MtpDrafter:
    return MtpDrafter(
        target, model, n_ctx=N_CTX, n_batch=N_BATCH, n_ubatch=N_BATCH, n_seq_max=N_SEQ, kv_unified=True
    )


def argmax_row(ctx: Any, row: int, n_vocab: int) -> int:
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, row), shape=(n_vocab,))
    return int(logits.argmax())


def plain_greedy(model: Any, prompt: list[int], n: int) -> list[int]:
    ctx = new_target(model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    batch = BatchBuffer(N_BATCH)
    try:
        for start in range(0, len(prompt), N_BATCH):
            batch.clear()
            chunk = prompt[start : start + N_BATCH]
            batch.add_chunk(chunk, start, 0, True)
            assert llama_cpp.llama_decode(ctx, batch.view(batch.size)) == 0
        out = [argmax_row(ctx, batch.size - 1, n_vocab)]
        while len(out) < n:
            batch.clear()
            batch.add_token(out[-1], len(prompt) + len(out) - 1, 0, True)
            assert llama_cpp.llama_decode(ctx, batch.view(1)) == 0
            out.append(argmax_row(ctx, 0, n_vocab))
        return out
    finally:
        llama_cpp.llama_free(ctx)


@dataclass
class Spec:
    """What a speculative run saw: outputs, counts, and each draft-1 by the pending token's position."""

    outputs: list[list[int]]
    drafted: int = 0
    accepted: int = 0
    first_drafts: list[dict[int, int]] = field(default_factory=list)
    drafts: list[dict[int, list[int]]] = field(default_factory=list)  # whole drafts, same keys


def speculative_greedy(
    model: Any,
    prompts: list[list[int]],
    n: int,
    k: int,
    *,
    pair: tuple[Any, MtpDrafter] | None = None,
    first_seq: int = 0,
    skip: int = 0,
    mtp_failures: bool = False,
) -> Spec:
    """All sequences in one target batch per step, as the runner does; prefill chunks included.

    Prompt i runs as sequence `first_seq + i`. `pair`: a target context and drafter to use (and leave
    open); `skip`: prompt tokens already in the target's KV for every sequence (a copied prefix the
    drafter never saw)."""
    target, drafter = pair if pair is not None else (new_target(model), None)
    drafter = drafter or new_drafter(model, target)
    memory = llama_cpp.llama_get_memory(target)
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    batch = BatchBuffer(N_BATCH)
    spec = Spec([[] for _ in prompts], first_drafts=[{} for _ in prompts], drafts=[{} for _ in prompts])
    prefilled = [skip] * len(prompts)
    try:
        while any(len(out) < n for out in spec.outputs):
            batch.clear()
            rows: list[TargetRows] = []
            drafts: dict[int, list[int]] = {}
            asks = [
                DraftSeq(first_seq + s, [*p, *spec.outputs[s]], k, len(p))
                for s, p in enumerate(prompts)
                if prefilled[s] == len(p) and len(spec.outputs[s]) < n
            ]
            for ask, draft in zip(asks, drafter.draft(asks), strict=True):
                s = ask.seq_id - first_seq
                drafts[s] = draft[: n - len(spec.outputs[s])]
                if draft:
                    spec.first_drafts[s][len(ask.tokens) - 1] = draft[0]
                    spec.drafts[s][len(ask.tokens) - 1] = list(draft)
            for s, prompt in enumerate(prompts):
                if prefilled[s] < len(prompt):  # one prefill chunk per step, sharing the batch
                    chunk = prompt[prefilled[s] : prefilled[s] + 24]
                    done = prefilled[s] + len(chunk) == len(prompt)
                    last = batch.add_chunk(chunk, prefilled[s], first_seq + s, done)
                    rows.append(
                        TargetRows(first_seq + s, last - len(chunk) + 1, prefilled[s], chunk, len(chunk), 1)
                    )
                elif len(spec.outputs[s]) < n:
                    tokens = [spec.outputs[s][-1], *drafts.get(s, [])]
                    position = len(prompt) + len(spec.outputs[s]) - 1
                    last = batch.add_chunk(tokens, position, first_seq + s, True)
                    batch.want_logits[last - len(tokens) + 1 : last + 1] = 1
                    rows.append(
                        TargetRows(first_seq + s, last - len(tokens) + 1, position, tokens, 0, len(tokens))
                    )
            assert llama_cpp.llama_decode(target, batch.view(batch.size)) == 0
            for item in rows:
                s = item.seq_id - first_seq
                if prefilled[s] < len(prompts[s]):
                    prefilled[s] += len(item.tokens)
                    if prefilled[s] == len(prompts[s]):
                        last_row = item.first_row + len(item.tokens) - 1
                        spec.outputs[s].append(argmax_row(target, last_row, n_vocab))
                    continue
                draft = list(item.tokens[1:])
                new: list[int] = []
                for i in range(len(draft) + 1):
                    new.append(argmax_row(target, item.first_row + i, n_vocab))
                    if i == len(draft) or new[-1] != draft[i]:
                        break
                spec.drafted += len(draft)
                spec.accepted += len(new) - 1
                item.n_kept = len(new)
                spec.outputs[s].extend(new)
            drafter.after_target_decode(target, rows)
            for item in rows:
                if item.n_kept < len(item.tokens):  # rejected drafts: drop their target KV, then roll back
                    kept = item.position + item.n_kept
                    llama_cpp.llama_memory_seq_rm(memory, item.seq_id, kept, -1)
                    drafter.rollback(item.seq_id, kept)
        assert (drafter.decode_failures > 0) == mtp_failures
        for s in range(len(prompts)):
            drafter.release(first_seq + s)
        spec.outputs = [out[:n] for out in spec.outputs]
        return spec
    finally:
        if pair is None:
            drafter.close()
            llama_cpp.llama_free(target)


@pytest.mark.parametrize("k", [1, 3])
def test_mtp_greedy_equals_plain_greedy(mtp_model: Any, k: int) -> None:
    spec = speculative_greedy(mtp_model, PROMPTS, N_GEN, k)
    for prompt, out in zip(PROMPTS, spec.outputs, strict=True):
        assert out == plain_greedy(mtp_model, prompt, N_GEN)
    # Both verification paths ran: drafts were accepted and drafts were rejected.
    assert 0 < spec.accepted < spec.drafted


def test_drafts_are_the_heads_predictions_over_the_final_text(mtp_model: Any) -> None:
    """Recompute the NextN head from scratch over each final text (one target decode with hidden states,
    one MTP decode of every row (x_p, h_(p-1))): its argmax at each pending position must be the draft-1
    the incremental drafter proposed there. Feeding a hidden state to the wrong row, or losing a row on a
    rollback, changes these."""
    spec = speculative_greedy(mtp_model, PROMPTS, N_GEN, 3)
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(mtp_model))
    n_embd = llama_cpp.llama_model_n_embd(mtp_model)
    for prompt, out, first_drafts in zip(PROMPTS, spec.outputs, spec.first_drafts, strict=True):
        text = [*prompt, *out]
        hidden = reference_hidden(mtp_model, text, n_embd)
        expected = reference_head_argmax(mtp_model, text, hidden, n_vocab)
        assert len(first_drafts) > N_GEN // 4
        mismatched = {p: (d, expected[p]) for p, d in first_drafts.items() if expected[p] != d}
        assert not mismatched


def test_chained_drafts_are_the_heads_own_chain(mtp_model: Any) -> None:
    """Drafts 2 and 3 chain the head on its own output: the row (d_j, the head's hidden state for the row
    before) one position further. Recomputed from scratch for some drafts of the batched run, they must
    match, which pins the chained rows' positions, inputs and removal."""
    spec = speculative_greedy(mtp_model, PROMPTS, N_GEN, 3)
    n_embd = llama_cpp.llama_model_n_embd(mtp_model)
    checked = 0
    for prompt, out, drafts in zip(PROMPTS, spec.outputs, spec.drafts, strict=True):
        text = [*prompt, *out]
        hidden = reference_hidden(mtp_model, text, n_embd)
        for pending, draft in list(drafts.items())[::4]:
            if len(draft) > 1:
                assert reference_chain(mtp_model, text[: pending + 1], hidden, len(draft)) == draft
                checked += 1
    assert checked > 10


def reference_chain(model: Any, text: list[int], hidden: npt.NDArray[np.float32], k: int) -> list[int]:
    """The head's k chained drafts after `text` (its last token pending), in a fresh MTP context."""
    target = new_target(model)
    params = llama_cpp.llama_context_default_params()
    params.ctx_type = llama_cpp.LLAMA_CONTEXT_TYPE_MTP
    params.ctx_other = target
    params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = N_CTX, N_BATCH, N_BATCH, 1
    mtp = llama_cpp.llama_init_from_model(model, params)
    assert mtp
    n_embd = hidden.shape[1]
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    try:
        llama_cpp_ext.llama_set_embeddings_nextn(mtp, True, False)  # every row's, by batch row
        batch = BatchBuffer(N_BATCH, n_embd)
        previous = np.vstack([np.zeros((1, n_embd), dtype=np.float32), hidden[: len(text) - 1]])
        for start in range(0, len(text), N_BATCH):
            batch.clear()
            chunk = text[start : start + N_BATCH]
            last = batch.add_chunk(chunk, start, 0, start + len(chunk) == len(text))
            batch.embd[: len(chunk)] = previous[start : start + len(chunk)]
            assert llama_cpp.llama_decode(mtp, batch.view(batch.size)) == 0
        drafts = [argmax_row(mtp, last, n_vocab)]
        row = last
        while len(drafts) < k:
            pointer = llama_cpp_ext.llama_get_embeddings_nextn_ith(mtp, row)
            own = np.ctypeslib.as_array(pointer, shape=(n_embd,)).copy()
            batch.clear()
            row = batch.add_token(drafts[-1], len(text) + len(drafts) - 1, 0, True)
            batch.embd[row] = own
            assert llama_cpp.llama_decode(mtp, batch.view(1)) == 0
            drafts.append(argmax_row(mtp, row, n_vocab))
        return drafts
    finally:
        llama_cpp.llama_free(mtp)
        llama_cpp.llama_free(target)


def reference_hidden(model: Any, text: list[int], n_embd: int) -> npt.NDArray[np.float32]:
    ctx = new_target(model)
    try:
        llama_cpp_ext.llama_set_embeddings_nextn(ctx, True, False)
        batch = BatchBuffer(N_BATCH)
        rows: list[npt.NDArray[np.float32]] = []
        for start in range(0, len(text), N_BATCH):
            batch.clear()
            chunk = text[start : start + N_BATCH]
            batch.add_chunk(chunk, start, 0, False)
            assert llama_cpp.llama_decode(ctx, batch.view(batch.size)) == 0
            pointer = llama_cpp_ext.llama_get_embeddings_nextn_ith(ctx, 0)
            rows.append(np.ctypeslib.as_array(pointer, shape=(len(chunk), n_embd)).copy())
        return np.concatenate(rows)
    finally:
        llama_cpp.llama_free(ctx)


def reference_head_argmax(
    model: Any,
    text: list[int],
    hidden: npt.NDArray[np.float32],
    n_vocab: int,
    first: int = 0,
    zero_at: int | None = None,
) -> list[int]:
    """The head's argmax at every position of `text` (-1 below `first`), fed the rows from `first` on;
    the row at `zero_at` gets a zero hidden state (as the drafter feeds a row whose input it cannot know)."""
    target = new_target(model)
    params = llama_cpp.llama_context_default_params()
    params.ctx_type = llama_cpp.LLAMA_CONTEXT_TYPE_MTP
    params.ctx_other = target
    params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = N_CTX, N_BATCH, N_BATCH, 1
    mtp = llama_cpp.llama_init_from_model(model, params)
    assert mtp
    try:
        batch = BatchBuffer(N_BATCH, hidden.shape[1])
        previous = np.vstack([np.zeros((1, hidden.shape[1]), dtype=np.float32), hidden[:-1]])
        if zero_at is not None:
            previous[zero_at] = 0.0
        best: list[int] = [-1] * first
        for start in range(first, len(text), N_BATCH):
            batch.clear()
            chunk = text[start : start + N_BATCH]
            batch.add_chunk(chunk, start, 0, False)
            batch.want_logits[: len(chunk)] = 1
            batch.embd[: len(chunk)] = previous[start : start + len(chunk)]
            assert llama_cpp.llama_decode(mtp, batch.view(batch.size)) == 0
            best.extend(argmax_row(mtp, i, n_vocab) for i in range(len(chunk)))
        return best
    finally:
        llama_cpp.llama_free(mtp)
        llama_cpp.llama_free(target)


def mismatches(
    model: Any, prompt: list[int], spec_out: list[int], drafts: dict[int, int], first: int = 0
) -> int:
    """How many draft-1s differ from the head recomputed over the final text (rows from `first` on)."""
    text = [*prompt, *spec_out]
    n_embd = llama_cpp.llama_model_n_embd(model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    expected = reference_head_argmax(model, text, reference_hidden(model, text, n_embd), n_vocab, first)
    assert len(drafts) > 5
    return sum(expected[p] != d for p, d in drafts.items())


@pytest.fixture(scope="module")
def attentive_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A head whose own attention decides its argmax (head_gain 1), so its context is visible in drafts."""
    path = write_tiny_mtp(tmp_path_factory.mktemp("attentive") / "attentive.gguf", head_gain=1.0)
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), load_mtp_params())
    assert model
    yield model
    llama_cpp.llama_model_free(model)


def test_stale_rows_of_a_released_sequence_are_not_reused_for_another_history(attentive_model: Any) -> None:
    """Sequence 0 serves history A and is released (its MTP rows stay, for a next turn). Then the target
    gets another history B's prefix into sequence 0 without the drafter seeing it (a prefix copied from
    another slot): the drafter must drop A's rows, so its drafts are the head over B's observed rows."""
    model = attentive_model
    target = new_target(model)
    drafter = new_drafter(model, target)
    memory = llama_cpp.llama_get_memory(target)
    try:
        a, b, copied = PROMPTS[2], [1, *(200 - i for i in range(70))], 50
        speculative_greedy(model, [a], 30, 3, pair=(target, drafter))
        llama_cpp.llama_memory_seq_rm(memory, 0, -1, -1)
        batch = BatchBuffer(N_BATCH)
        batch.add_chunk(b[:copied], 0, 0, False)
        assert llama_cpp.llama_decode(target, batch.view(batch.size)) == 0
        spec = speculative_greedy(model, [b], 30, 3, pair=(target, drafter), skip=copied)
        assert spec.outputs[0] == plain_greedy(model, b, 30)
        # The first observed row (position `copied`) has no known hidden state before it: not fed either.
        assert mismatches(model, b, spec.outputs[0], spec.first_drafts[0], first=copied + 1) == 0
    finally:
        drafter.close()
        llama_cpp.llama_free(target)


def test_a_full_mtp_kv_drops_released_rows_and_retries(attentive_model: Any) -> None:
    """An MTP KV too small for two sequences' rows: the released one's rows make room for the live one."""
    model = attentive_model
    target = new_target(model)
    drafter = MtpDrafter(
        target, model, n_ctx=256, n_batch=N_BATCH, n_ubatch=N_BATCH, n_seq_max=N_SEQ, kv_unified=True
    )
    try:
        speculative_greedy(model, [PROMPTS[2]], 60, 3, pair=(target, drafter))  # ~150 rows, then released
        b = [1, *(200 - i for i in range(60))]
        spec = speculative_greedy(model, [b], 60, 3, pair=(target, drafter), first_seq=1)
        assert drafter.decode_failures == 0
        assert 0 not in drafter._states  # sequence 0's rows were dropped for room
        assert spec.outputs[0] == plain_greedy(model, b, 60)
        assert mismatches(model, b, spec.outputs[0], spec.first_drafts[0]) == 0
    finally:
        drafter.close()
        llama_cpp.llama_free(target)


def test_an_mtp_kv_too_small_costs_drafts_not_requests(mtp_model: Any) -> None:
    """MTP decodes that fail (an MTP KV of 256 cells, llama.cpp's least, for a 330-token sequence) drop
    the sequence's MTP state and drafting resumes after; the output is the target's all the same."""
    target = new_target(mtp_model)
    drafter = MtpDrafter(
        target, mtp_model, n_ctx=256, n_batch=N_BATCH, n_ubatch=N_BATCH, n_seq_max=N_SEQ, kv_unified=True
    )
    long_prompt = [1, *(7 + (i * 37) % 250 for i in range(270))]
    try:
        spec = speculative_greedy(mtp_model, [long_prompt], 60, 3, pair=(target, drafter), mtp_failures=True)
        assert spec.outputs[0] == plain_greedy(mtp_model, long_prompt, 60)
        assert spec.accepted > 0
    finally:
        drafter.close()
        llama_cpp.llama_free(target)


# -- start-up checks ---------------------------------------------------------------------------------


def start(path: Path, **fields: Any) -> None:
    """Load an engine with `draft_model = "draft-mtp"` and build its speculation, as the worker does."""
    options = ModelOptions(path=str(path), draft_model="draft-mtp", n_ctx=512, **fields)
    engine = LlamaEngine(options, path, WorkerOverride())
    try:
        speculation = build_speculation(options, engine)
        assert speculation is not None and isinstance(speculation.drafter, MtpDrafter)
        speculation.close()
    finally:
        engine.close()


def test_a_nextn_model_starts(tiny_mtp_gguf: Path) -> None:
    start(tiny_mtp_gguf, n_batch=5, draft_model_num_pred_tokens=4)


def test_a_model_without_nextn_layers_is_a_startup_error(tiny_llama_gguf: Path) -> None:
    with pytest.raises(ConfigError, match=r'model\.draft_model "draft-mtp" needs NextN.*n_layer_nextn = 0'):
        start(tiny_llama_gguf)


def test_an_assistant_without_nextn_layers_names_draft_model_path(
    tiny_mtp_gguf: Path, tiny_llama_gguf: Path
) -> None:
    with pytest.raises(ConfigError, match=r"model\.draft_model_path .*tiny-llama\.gguf has none"):
        start(tiny_mtp_gguf, draft_model_path=str(tiny_llama_gguf))


def test_an_assistant_that_does_not_load_names_draft_model_path(tiny_mtp_gguf: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf")
    with pytest.raises(ConfigError, match=r"model\.draft_model_path: llama\.cpp could not load .*broken"):
        start(tiny_mtp_gguf, draft_model_path=str(broken))


def test_an_assistant_of_another_width_names_draft_model_path(tiny_mtp_gguf: Path, tmp_path: Path) -> None:
    narrow = write_tiny_mtp(tmp_path / "narrow.gguf", n_embd=32, part="nextn")
    with pytest.raises(
        ConfigError, match=r"model\.draft_model_path: the MTP model's embedding size 32 differs"
    ):
        start(tiny_mtp_gguf, draft_model_path=str(narrow))


def test_a_recurrent_model_is_refused(tmp_path: Path) -> None:
    """Rejected drafts cannot be removed from recurrent state (no retained n_rs_seq slots here)."""
    mamba = write_tiny_recurrent(tmp_path / "mamba.gguf")
    with pytest.raises(ConfigError, match=r"model\.draft_model 'draft-mtp'.*recurrent"):
        start(mamba)


def test_n_batch_below_k_plus_one_is_a_startup_error(tiny_mtp_gguf: Path) -> None:
    with pytest.raises(ValueError, match=r"model\.n_batch 4 .*draft_model_num_pred_tokens 4"):
        start(tiny_mtp_gguf, n_batch=4, draft_model_num_pred_tokens=4)
