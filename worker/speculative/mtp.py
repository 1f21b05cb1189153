"""The `draft-mtp` provider: drafts from the model's own NextN (multi-token prediction) block.

A NextN block predicts the token after next from two inputs per position p: the embedding of token x_p and
the target's hidden state at p - 1. llama.cpp runs it in a second context of type
`LLAMA_CONTEXT_TYPE_MTP` on the same model (loaded with `load_mtp`) or on a separate assistant GGUF that
holds only the block; that context keeps its own KV cache for the block's attention, one row per
position, and its rows carry both a token and an input vector (`BatchBuffer(n_embd=...)`).

How the rows line up, per sequence (see worker/speculative/base.py for the step order):

- The target context outputs every row's hidden state (`llama_set_embeddings_nextn(target, True, False)`:
  unmasked, no extra logits). After each target decode, `after_target_decode` stashes, for every row the
  target keeps (prefill rows, the pending token, accepted drafts), the MTP input row (x_p, h_{p-1}); h_{p-1}
  comes from the same item or from the last kept row of the previous one. Rows are only stashed, not
  decoded: they ride in the next `draft()` decode (or a flush when the stash grows large).
- `draft()` decodes, for all drafting sequences in ONE batch, their stashed rows plus the pending token's
  row (x_{n}, h_{n-1}) with logits: its argmax is draft 1. Draft j + 1 chains from draft j: the row
  (d_j, MTP hidden state of the previous row) at the next position, one batched decode per draft position.
  The chained rows are speculative and removed right after (`llama_memory_seq_rm`); the pending token's row
  stays, since the target decodes that very token next.
- Rejected drafts never reach the MTP KV (only kept rows are stashed), so a rollback has nothing to undo
  beyond defensive trimming.
- llama.cpp takes a sequence's new rows only right after the last position it holds, so rows are never
  skipped: a row whose h_{p-1} is unknown (the first row after a prefix the target reused) gets zeros.
- A released sequence keeps its rows, as the prefix cache keeps its target KV: a next turn on the same
  slot drafts with the whole conversation in view, after its rows are checked against the new history.
  Rows the MTP context never saw (a prefix copied from another slot, an `n > 1` sibling's prompt) are
  copied from the sequence whose rows match the history longest. What stays absent only makes the head
  see less context: drafts get worse, never wrong - the target verifies every draft.

Greedy drafts: the head's argmax, cut short when its probability falls below `draft_model_p_min`.
`draft_model_top_k` only matters for sampled drafts, which this provider does not make. With several NextN
blocks only the first is used (chained), as llama.cpp's glm4moe supports one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import numpy.typing as npt
from llama_cpp import llama_cpp_ext

from shared.config import ConfigError, ModelOptions
from shared.models import resolve_from_pretrained
from worker.batch import BatchBuffer
from worker.engine import LlamaEngine
from worker.speculative.base import Drafter, DraftSeq, TargetRows

log = logging.getLogger(__name__)

PROVIDER = "draft-mtp"


@dataclass(slots=True)
class _Row:
    position: int
    token: int
    hidden: npt.NDArray[np.float32]  # the target's hidden state at position - 1


@dataclass(slots=True)
class _SeqState:
    fed: int = 0  # the MTP KV holds no row of this sequence at or beyond this position
    last_pos: int = -1  # position of `last_hidden` (-1: none known)
    last_hidden: npt.NDArray[np.float32] | None = None
    stash: list[_Row] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # the token of each decoded row by position; -1: none
    live: bool = True  # False once released: the rows stay for a later request that reuses the prefix
    resumed_at: int | None = None  # first position fed after a release, until the history is checked
    missing: int = 0  # rows below this position are absent: copy them from a sequence with the same history


def check_nextn(options: ModelOptions, n_layer_nextn: int) -> None:
    """The model (or assistant GGUF) must have NextN layers; the error names the config field."""
    if n_layer_nextn <= 0:
        source = (
            f"model.draft_model_path {options.draft_model_path}" if options.draft_model_path else "the model"
        )
        raise ConfigError(
            f'model.draft_model "draft-mtp" needs NextN (MTP) layers, and {source} has none '
            "(llama_model_n_layer_nextn = 0)"
        )


def build_mtp(options: ModelOptions, engine: LlamaEngine) -> MtpDrafter:
    """The provider for `model.draft_model = "draft-mtp"`: the target model's own NextN block (the engine
    loads it with `load_mtp`), or an assistant GGUF holding only the block (`draft_model_path` /
    `draft_model_from_pretrained`). worker/speculative/setup.py has already checked n_batch and rollback."""
    assistant = _assistant_path(options)
    model = engine.model if assistant is None else load_assistant(assistant)
    try:
        check_nextn(options, int(llama_cpp.llama_model_n_layer_nextn(model)))
        threads = options.draft_model_threads or options.threads
        return MtpDrafter(
            engine.ctx,
            model,
            n_ctx=engine.info.n_ctx,
            n_batch=max(engine.n_batch, engine.n_seq_max),  # room for every sequence's pending row
            n_ubatch=options.n_ubatch or min(engine.n_batch, 512),
            n_seq_max=engine.n_seq_max,
            kv_unified=options.kv_unified,
            p_min=options.draft_model_p_min,
            threads=threads,
            threads_batch=options.draft_model_threads_batch or options.threads_batch or threads,
            owned_model=assistant is not None,
        )
    except BaseException:
        if assistant is not None:
            llama_cpp.llama_model_free(model)
        raise


def _assistant_path(options: ModelOptions) -> Path | None:
    if options.draft_model_path is not None:
        return Path(options.draft_model_path)
    if options.draft_model_from_pretrained is not None:
        return resolve_from_pretrained(options.draft_model_from_pretrained)
    return None


def load_mtp_params() -> Any:
    """Model params for a separate assistant GGUF that holds only the NextN block."""
    params = llama_cpp.llama_model_default_params()
    params.load_mtp = True
    return params


class MtpDrafter(Drafter):
    """Drafts for every speculating sequence from one MTP context next to the target's."""

    name = PROVIDER
    observes_target = True
    target_outputs = False  # the target's hidden states come unmasked, for every row, without logits

    def __init__(
        self,
        target_ctx: Any,
        model: Any,
        *,
        n_ctx: int,
        n_batch: int,
        n_ubatch: int,
        n_seq_max: int,
        kv_unified: bool,
        p_min: float = 0.0,
        threads: int | None = None,
        threads_batch: int | None = None,
        owned_model: bool = False,
    ) -> None:
        """`model` is the target model (loaded with `load_mtp`) or an assistant GGUF; `owned_model`: free it
        in `close()`."""
        self._target_ctx = target_ctx
        self._model = model
        self._owned_model = owned_model
        self.n_embd = int(llama_cpp.llama_model_n_embd(model))
        target_model = llama_cpp.llama_get_model(target_ctx)
        target_embd = int(llama_cpp.llama_model_n_embd(target_model))
        if self.n_embd != target_embd:
            raise ConfigError(
                f"model.draft_model_path: the MTP model's embedding size {self.n_embd} differs from the "
                f"target's {target_embd}"
            )
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model)))
        target_vocab = int(llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(target_model)))
        if self.n_vocab != target_vocab:
            raise ConfigError(
                f"model.draft_model_path: the MTP model's vocabulary ({self.n_vocab} tokens) differs from "
                f"the target's ({target_vocab})"
            )
        params = llama_cpp.llama_context_default_params()
        params.ctx_type = llama_cpp.LLAMA_CONTEXT_TYPE_MTP
        params.ctx_other = target_ctx
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = min(n_ubatch, n_batch)
        params.n_seq_max = n_seq_max
        params.kv_unified = kv_unified
        self._kv_unified = kv_unified  # cells can then be shared by range (llama_memory_seq_cp)
        params.n_rs_seq = 0
        if threads is not None:
            params.n_threads = threads
        if threads_batch is not None:
            params.n_threads_batch = threads_batch
        ctx = llama_cpp.llama_init_from_model(model, params)
        if not ctx:
            raise ConfigError('model.draft_model "draft-mtp": llama.cpp could not create the MTP context')
        self._ctx = ctx
        self._memory = llama_cpp.llama_get_memory(ctx)
        self.n_batch = int(llama_cpp.llama_n_batch(ctx))
        self._batch = BatchBuffer(self.n_batch, self.n_embd)
        self._p_min = p_min
        self._states: dict[int, _SeqState] = {}
        self._stashed = 0
        # MTP rows output their own hidden state (for chaining). Unmasked: every row's, indexed by batch row;
        # the masked mode returns the batch's FIRST rows, not its output rows, for an MTP graph (its hidden
        # state is taken before the output rows are selected), which chained from the wrong row whenever
        # stashed rows shared the decode (tests/unit/test_mtp_drafter.py, the chained-drafts test).
        llama_cpp_ext.llama_set_embeddings_nextn(ctx, True, False)
        # The target outputs its hidden state for every row of every decode from now on.
        llama_cpp_ext.llama_set_embeddings_nextn(target_ctx, True, False)
        # Counters the bench and tests read (the scheduler counts drafted / accepted per provider).
        self.decodes = 0
        self.rows_decoded = 0
        self.decode_failures = 0

    # -- feeding: the target's kept rows -------------------------------------------------------------

    def after_target_decode(self, ctx: object, rows: list[TargetRows]) -> None:
        for item in rows:
            if item.n_kept > 0:
                self._stash_kept(item)
        if self._stashed > self.n_batch // 2:
            self._flush()

    def _stash_kept(self, item: TargetRows) -> None:
        state = self._states.get(item.seq_id)
        start = item.position
        if state is None:  # no state: make sure no cell of an earlier life of this id is left over
            state = self._states[item.seq_id] = _SeqState()
            llama_cpp.llama_memory_seq_rm(self._memory, item.seq_id, -1, -1)
        elif not state.live:  # a new request on a released sequence: its rows below `start` are checked
            state.live, state.resumed_at = True, start  # against the new history at the first draft
        # llama.cpp takes a sequence's rows only at consecutive positions, right after the last it holds.
        end = state.stash[-1].position + 1 if state.stash else state.fed
        if start + 1 < end:  # the sequence went back past its pending row: drop what follows
            self.rollback(item.seq_id, start)
        elif start > end:  # the target got rows this context never saw (a copied prefix): start over
            self._clear(item.seq_id, state)
            state.missing = start
        hidden = self._target_hidden(item.first_row, item.n_kept)
        if hidden is None:
            self._clear(item.seq_id, state)
            return
        for i in range(item.n_kept):
            position = start + i
            if i > 0:
                previous = hidden[i - 1]
            elif state.last_pos == position - 1 and state.last_hidden is not None:
                previous = state.last_hidden
            else:  # position 0, or the target's state before this item is unknown here (a reused prefix):
                previous = np.zeros(self.n_embd, dtype=np.float32)  # a row of lesser quality, no gap
            if position >= state.fed:
                state.stash.append(_Row(position, int(item.tokens[i]), previous))
                self._stashed += 1
        state.last_pos = start + item.n_kept - 1
        state.last_hidden = hidden[item.n_kept - 1]

    def _clear(self, seq_id: int, state: _SeqState) -> None:
        """Forget every row of the sequence (its state object stays)."""
        llama_cpp.llama_memory_seq_rm(self._memory, seq_id, -1, -1)
        self._stashed -= len(state.stash)
        state.stash, state.tokens, state.fed = [], [], 0
        state.last_pos, state.last_hidden, state.resumed_at, state.missing = -1, None, None, 0

    def _target_hidden(self, first_row: int, n: int) -> npt.NDArray[np.float32] | None:
        """A copy of the target's hidden states for batch rows first_row .. first_row + n - 1."""
        pointer = llama_cpp_ext.llama_get_embeddings_nextn_ith(self._target_ctx, first_row)
        if not pointer:
            log.warning("the target context returned no hidden states; MTP drafting stops for these rows")
            return None
        return np.ctypeslib.as_array(pointer, shape=(n, self.n_embd)).copy()

    # -- drafting ------------------------------------------------------------------------------------

    def draft(self, seqs: list[DraftSeq]) -> list[list[int]]:
        drafts: list[list[int]] = [[] for _ in seqs]
        resumed = [
            s for s in seqs if s.seq_id in self._states and self._states[s.seq_id].resumed_at is not None
        ]
        if resumed:
            self._flush()
            for seq in resumed:
                self._check_history(seq)
        needy = [s for s in seqs if s.seq_id in self._states and self._states[s.seq_id].missing > 0]
        if needy and self._kv_unified:
            self._flush()
            for seq in needy:
                self._borrow(seq)
        ready = [i for i, seq in enumerate(seqs) if self._can_draft(seq)]
        if self._stashed + len(ready) > self.n_batch:
            self._flush()
        if not ready:
            return drafts
        # Draft 1: every stashed row plus each drafting sequence's pending-token row, in one decode.
        batch = self._batch
        batch.clear()
        self._fill_stash()
        out_rows: dict[int, int] = {}
        for i in ready:
            seq = seqs[i]
            state = self._states[seq.seq_id]
            n = len(seq.tokens) - 1
            assert state.last_hidden is not None
            if state.fed > n:  # drafted before without being decoded: its pending row is there already
                llama_cpp.llama_memory_seq_rm(self._memory, seq.seq_id, n, -1)
            out_rows[i] = self._add_row(int(seq.tokens[-1]), n, seq.seq_id, state.last_hidden, True)
            self._note(state, n, int(seq.tokens[-1]))
        if not self._decode(batch.size):
            return drafts
        active = list(ready)
        for step in range(max((seqs[i].k for i in ready), default=0)):
            chained: list[int] = []
            batch_rows: list[tuple[int, int, npt.NDArray[np.float32]]] = []
            for i in active:
                token = self._pick(out_rows[i])
                if token is None:
                    continue
                drafts[i].append(token)
                if len(drafts[i]) < seqs[i].k:
                    hidden = self._mtp_hidden(out_rows[i])
                    if hidden is not None:
                        chained.append(i)
                        batch_rows.append((i, token, hidden))
            if not chained:
                break
            batch.clear()
            for i, token, hidden in batch_rows:
                seq = seqs[i]
                position = len(seq.tokens) + step  # draft `step + 1` sits one past the pending token
                out_rows[i] = self._add_row(token, position, seq.seq_id, hidden, True)
            if not self._decode(batch.size):
                break
            active = chained
        for i in ready:  # the chained rows were guesses: only the pending token's row stays
            if seqs[i].k > 1:
                llama_cpp.llama_memory_seq_rm(self._memory, seqs[i].seq_id, len(seqs[i].tokens), -1)
        return drafts

    def _check_history(self, seq: DraftSeq) -> None:
        """A released sequence's rows serve a new request only where the new history has the same tokens
        (a row's content depends on nothing else). Otherwise its target KV came from elsewhere (a prefix
        copied from another slot): drop the old rows and the first new one, fed with the old hidden state."""
        state = self._states.get(seq.seq_id)
        if state is None or state.resumed_at is None:  # dropped meanwhile (a failed decode)
            return
        start, state.resumed_at = state.resumed_at, None
        old = np.asarray(state.tokens[:start], dtype=np.int64)
        new = np.asarray(seq.tokens[: len(old)], dtype=np.int64)
        if len(new) == len(old) and bool(np.all((old == new) | (old < 0))):
            return
        llama_cpp.llama_memory_seq_rm(self._memory, seq.seq_id, 0, start + 1)
        state.tokens[: start + 1] = [-1] * min(start + 1, len(state.tokens))
        state.missing = start + 1

    def _borrow(self, seq: DraftSeq) -> None:
        """Copy the absent low rows of `seq` from the sequence whose decoded rows match its history longest
        (an `n > 1` request's prompt, a shared system prompt): a row depends only on the tokens up to it.
        One attempt per gap; the first row after the gap keeps its approximate (zero) hidden state."""
        state = self._states[seq.seq_id]
        missing, state.missing = state.missing, 0
        history = np.asarray(seq.tokens[:missing], dtype=np.int64)
        donor, length = -1, 0
        for other_id, other in self._states.items():
            n = min(len(other.tokens), len(history))
            if other_id == seq.seq_id or n <= length:
                continue
            same = np.asarray(other.tokens[:n], dtype=np.int64) == history[:n]
            match = n if bool(same.all()) else int(same.argmin())
            if match > length:
                donor, length = other_id, match
        if length == 0:
            return
        llama_cpp.llama_memory_seq_cp(self._memory, donor, seq.seq_id, 0, length)
        if len(state.tokens) < length:
            state.tokens.extend([-1] * (length - len(state.tokens)))
        state.tokens[:length] = history[:length].tolist()

    def _note(self, state: _SeqState, position: int, token: int) -> None:
        """Record a decoded row."""
        if position >= len(state.tokens):
            state.tokens.extend([-1] * (position + 1 - len(state.tokens)))
        state.tokens[position] = token
        state.fed = max(state.fed, position + 1)

    def _can_draft(self, seq: DraftSeq) -> bool:
        state = self._states.get(seq.seq_id)
        n = len(seq.tokens) - 1  # the pending token's position
        return state is not None and seq.k >= 1 and state.last_pos == n - 1 and state.last_hidden is not None

    def _pick(self, row: int) -> int | None:
        """The head's greedy draft from output row `row`, or None below `p_min`."""
        pointer = llama_cpp.llama_get_logits_ith(self._ctx, row)
        if not pointer:
            return None
        logits = np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))
        token = int(logits.argmax())
        if self._p_min > 0.0:
            shifted = np.exp(logits - logits[token], dtype=np.float64)
            if 1.0 / float(shifted.sum()) < self._p_min:
                return None
        return token

    def _mtp_hidden(self, row: int) -> npt.NDArray[np.float32] | None:
        pointer = llama_cpp_ext.llama_get_embeddings_nextn_ith(self._ctx, row)
        if not pointer:
            return None
        return np.ctypeslib.as_array(pointer, shape=(self.n_embd,)).copy()

    # -- the MTP batch -------------------------------------------------------------------------------

    def _add_row(
        self, token: int, position: int, seq_id: int, hidden: npt.NDArray[np.float32], logits: bool
    ) -> int:
        row = self._batch.add_token(token, position, seq_id, logits)
        self._batch.embd[row] = hidden
        return row

    def _fill_stash(self) -> None:
        for seq_id, state in self._states.items():
            for r in state.stash:
                self._add_row(r.token, r.position, seq_id, r.hidden, False)
                self._note(state, r.position, r.token)
            state.stash.clear()
        self._stashed = 0

    def _flush(self) -> None:
        """Decode the stashed rows alone, in batches of at most n_batch rows."""
        pending = [(seq_id, r) for seq_id, state in self._states.items() for r in state.stash]
        for state in self._states.values():
            state.stash.clear()
        self._stashed = 0
        for start in range(0, len(pending), self.n_batch):
            chunk = pending[start : start + self.n_batch]
            self._batch.clear()
            for seq_id, r in chunk:
                self._add_row(r.token, r.position, seq_id, r.hidden, False)
                self._note(self._states[seq_id], r.position, r.token)
            self._decode(self._batch.size)

    def _decode(self, n_rows: int) -> bool:
        """One MTP decode. When it fails (the KV is full of released sequences' rows), those rows are
        dropped and it is tried once more; on a second failure the sequences involved restart with empty
        MTP state (no drafts until the target feeds them again), never a failed request."""
        status = int(llama_cpp.llama_decode(self._ctx, self._batch.view(n_rows)))
        if status != 0 and self._drop_released():
            status = int(llama_cpp.llama_decode(self._ctx, self._batch.view(n_rows)))
        self.decodes += 1
        self.rows_decoded += n_rows
        if status == 0:
            return True
        self.decode_failures += 1
        seq_ids = sorted({int(seq_id) for seq_id in self._batch.seq_ids[:n_rows]})
        log.warning(
            "MTP llama_decode failed (status %d); dropping MTP state of %d sequences", status, len(seq_ids)
        )
        for seq_id in seq_ids:
            self._drop(seq_id)
        return False

    def _drop_released(self) -> bool:
        released = [seq_id for seq_id, state in self._states.items() if not state.live]
        for seq_id in released:
            self._drop(seq_id)
        return bool(released)

    def _drop(self, seq_id: int) -> None:
        state = self._states.pop(seq_id, None)
        if state is not None:
            self._stashed -= len(state.stash)
        llama_cpp.llama_memory_seq_rm(self._memory, seq_id, -1, -1)

    # -- lifecycle -----------------------------------------------------------------------------------

    def rollback(self, seq_id: int, n_past: int) -> None:
        state = self._states.get(seq_id)
        if state is None:
            return
        if state.fed > n_past:
            llama_cpp.llama_memory_seq_rm(self._memory, seq_id, n_past, -1)
            state.fed = n_past
        del state.tokens[n_past:]
        kept = [r for r in state.stash if r.position < n_past]
        self._stashed -= len(state.stash) - len(kept)
        state.stash = kept
        if state.last_pos >= n_past:
            state.last_pos, state.last_hidden = -1, None

    def release(self, seq_id: int) -> None:
        """Keep the rows (and the stash, still to be decoded): the target's slot table may keep this
        sequence's KV as prefix cache, and a next turn on it then drafts with its whole context. A later
        request on the id gets them checked against its history (`_check_history`); they are dropped when
        the MTP KV runs out of room (`_drop_released`)."""
        state = self._states.get(seq_id)
        if state is not None:
            state.live, state.resumed_at = False, None

    def close(self) -> None:
        if self._ctx is not None:
            llama_cpp_ext.llama_set_embeddings_nextn(self._target_ctx, False, False)
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if self._owned_model and self._model is not None:
            llama_cpp.llama_model_free(self._model)
            self._model = None
        self._states.clear()
        self._stashed = 0


def load_assistant(path: Path) -> Any:
    """Load a separate assistant GGUF holding the NextN block (`draft_model_path` for draft-mtp)."""
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), load_mtp_params())
    if not model:
        raise ConfigError(f"model.draft_model_path: llama.cpp could not load {path}")
    return model
