"""The `draft-model` provider: a small GGUF with the target's vocabulary drafts greedily for every sequence.

Like llama-server's `-md`, but batched: the draft model has its own context with one KV sequence per target
sequence id. Each step first catches every speculating sequence up to its history (the tokens its draft
KV does not hold yet, the pending token last: prompts in `n_batch` chunks), which gives the first draft
token from each sequence's last row; then one batched decode per further draft position feeds every
still-drafting sequence its previous draft token. A sequence stops drafting early when the draft model's
own probability of its pick falls below `draft_model_p_min`. The draft KV is reconciled lazily: at the next
`draft()` whatever the sequence's history no longer matches (rejected drafts, a reused sequence id) is
removed first (`llama_memory_seq_rm`).
"""

from __future__ import annotations

import ctypes
import logging

import llama_cpp
import numpy as np

from shared.config import ConfigError, ModelOptions, WorkerOverride
from shared.models import resolve_model_path
from worker.engine import LlamaEngine
from worker.speculative.base import Drafter, DraftSeq

log = logging.getLogger(__name__)


def _draft_options(options: ModelOptions, target: LlamaEngine) -> ModelOptions:
    """The draft model's engine options: the target's context shape, the draft's file and threads."""
    return options.model_copy(
        update={
            "path": options.draft_model_path,
            "from_pretrained": options.draft_model_from_pretrained,
            "packaged": None,
            "draft_model": None,
            "n_ctx": target.info.n_ctx,
            "n_seq_max": target.info.n_seq_max,
            "threads": options.draft_model_threads or options.threads,
            "threads_batch": options.draft_model_threads_batch or options.threads_batch,
            "embedding": False,
            "embedding_pooling": None,
            "loras": [],
        }
    )


def check_same_vocab(target: LlamaEngine, draft: LlamaEngine) -> None:
    """Raises ConfigError unless both models have the same tokens (ids, texts) and special tokens."""
    tv, dv = target.vocab._vocab, draft.vocab._vocab
    n = target.vocab.n_vocab
    if draft.vocab.n_vocab != n:
        raise ConfigError(
            f"model.draft_model_path: the draft model has {draft.vocab.n_vocab} tokens, the target {n}"
        )
    for name in ("llama_vocab_bos", "llama_vocab_eos"):
        if getattr(llama_cpp, name)(tv) != getattr(llama_cpp, name)(dv):
            raise ConfigError(f"model.draft_model_path: the draft model's {name[12:]} token differs")
    for token in range(n):
        if llama_cpp.llama_vocab_get_text(tv, token) != llama_cpp.llama_vocab_get_text(dv, token):
            raise ConfigError(
                f"model.draft_model_path: the draft model's vocabulary differs from the target's "
                f"(token {token})"
            )


class DraftModel(Drafter):
    name = "draft-model"

    def __init__(self, options: ModelOptions, target: LlamaEngine) -> None:
        if options.draft_model_path is None and options.draft_model_from_pretrained is None:
            raise ConfigError(
                "model.draft_model 'draft-model' needs model.draft_model_path or "
                "model.draft_model_from_pretrained"
            )
        draft_options = _draft_options(options, target)
        path = resolve_model_path(draft_options)
        self.engine = LlamaEngine(draft_options, path, WorkerOverride())
        try:
            check_same_vocab(target, self.engine)
            if self.engine.info.recurrent:
                raise ConfigError("model.draft_model_path: a recurrent draft model cannot roll back")
        except Exception:
            self.engine.close()
            raise
        self.p_min = options.draft_model_p_min
        self.n_vocab = self.engine.vocab.n_vocab
        self._held: dict[int, list[int]] = {}  # sequence id -> tokens in the draft KV

    def draft(self, seqs: list[DraftSeq]) -> list[list[int]]:
        drafts: list[list[int]] = [[] for _ in seqs]
        picks = self._catch_up(seqs)
        active: list[int] = []  # indexes into seqs still drafting
        for i, seq in enumerate(seqs):
            token = picks.get(i)
            if token is not None:
                drafts[i].append(token)
                if seq.k > 1:
                    active.append(i)
        while active:
            batch = self.engine.batch
            batch.clear()
            rows = {}
            for i in active:
                seq_id = seqs[i].seq_id
                held = self._held[seq_id]
                rows[i] = batch.add_token(drafts[i][-1], len(held), seq_id, True)
                held.append(drafts[i][-1])
            if self.engine.decode(batch.size) != 0:
                log.warning("the draft model's llama_decode failed; drafting stops for this step")
                for i in active:  # the KV of a failed batch is undone: forget it
                    self._forget(seqs[i].seq_id)
                break
            still: list[int] = []
            for i in active:
                token = self._pick(rows[i])
                if token is None:
                    continue
                drafts[i].append(token)
                if len(drafts[i]) < seqs[i].k:
                    still.append(i)
            active = still
        return drafts

    def _catch_up(self, seqs: list[DraftSeq]) -> dict[int, int | None]:
        """Feeds every sequence the history its draft KV lacks (the pending token last); returns the
        draft model's pick after each one's history (None below p_min), for those whose decode worked."""
        todo: list[tuple[int, list[int], int]] = []  # (index, tokens to feed, first position)
        for i, seq in enumerate(seqs):
            history = [int(t) for t in seq.tokens]
            held = self._held.setdefault(seq.seq_id, [])
            common = 0
            limit = min(len(held), len(history) - 1)  # always feed the pending token
            while common < limit and held[common] == history[common]:
                common += 1
            if common < len(held):
                self.engine.seq_rm(seq.seq_id, common, -1)
                del held[common:]
            todo.append((i, history[common:], common))
        picks: dict[int, int | None] = {}
        batch = self.engine.batch
        while todo:
            batch.clear()
            fed: list[tuple[int, list[int], int | None]] = []  # (index, tokens fed, row if the last chunk)
            rest: list[tuple[int, list[int], int]] = []
            for i, tokens, position in todo:
                take = min(len(tokens), batch.free)
                if take == 0:
                    rest.append((i, tokens, position))
                    continue
                done = take == len(tokens)
                row = batch.add_chunk(tokens[:take], position, seqs[i].seq_id, done)
                fed.append((i, tokens[:take], row if done else None))
                if not done:
                    rest.append((i, tokens[take:], position + take))
            if self.engine.decode(batch.size) != 0:
                log.warning("the draft model's llama_decode failed; no drafts this step")
                for i, _, _ in fed:
                    self._forget(seqs[i].seq_id)
                return {}
            for i, tokens, last_row in fed:
                self._held[seqs[i].seq_id].extend(tokens)
                if last_row is not None:  # read now: the next decode replaces the logits
                    picks[i] = self._pick(last_row)
            todo = rest
        return picks

    def _pick(self, row: int) -> int | None:
        """The draft model's greedy token at batch row `row`, or None (below p_min)."""
        logits = np.ctypeslib.as_array(
            ctypes.cast(llama_cpp.llama_get_logits_ith(self.engine.ctx, row), ctypes.POINTER(ctypes.c_float)),
            shape=(self.n_vocab,),
        )
        token = int(logits.argmax())
        if self.p_min > 0.0:
            shifted = np.exp(logits.astype(np.float64) - float(logits[token]))
            if 1.0 / float(shifted.sum()) < self.p_min:
                return None
        return token

    def _forget(self, seq_id: int) -> None:
        self.engine.seq_rm(seq_id)
        self._held[seq_id] = []

    def release(self, seq_id: int) -> None:
        if self._held.pop(seq_id, None) is not None:
            self.engine.seq_rm(seq_id)

    def close(self) -> None:
        self.engine.close()
