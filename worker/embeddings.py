"""Embeddings on a llama.cpp context: many inputs packed into few llama_decode calls, one sequence each.

An embedding model (BERT and the like) is served from the engine's own context. A generation model serves
embeddings only when the config sets `embedding_pooling`, and then from a second context on the same
llama_model, so an embedding request never touches the KV cache of running generations. Every input of one
llama_decode fits one micro-batch: a non-causal encoder asserts on it (aborting the process), and MEAN
pooling over a sequence split across micro-batches would average only its last part.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import llama_cpp
import numpy as np
import numpy.typing as npt

from shared.config import ModelOptions, WorkerOverride
from shared.convert_bert import NORMALIZE_KEY
from shared.protocol import EmbeddingsReply, EmbedInfo, EmbedRequest, Error
from worker.batch import BatchBuffer
from worker.engine import EngineLoadError, LlamaEngine, context_params

log = logging.getLogger(__name__)

Vector = npt.NDArray[np.float32]

_POOLINGS = {"mean": llama_cpp.LLAMA_POOLING_TYPE_MEAN, "last": llama_cpp.LLAMA_POOLING_TYPE_LAST}
# Sequences and micro-batch of the second context a generation model embeds with.
_GENERATION_EMBED_SEQS = 16
_GENERATION_EMBED_UBATCH = 512


class EmbeddingError(RuntimeError):
    """llama_decode failed or returned no pooled vector."""


class EmbeddingRunner:
    """Pooled, optionally L2-normalised vectors for lists of token ids on one embedding context."""

    def __init__(self, ctx: Any, model: Any, *, owns_context: bool) -> None:
        self.ctx = ctx
        self._owns_context = owns_context
        self.memory = llama_cpp.llama_get_memory(ctx)
        self.n_seq_max = int(llama_cpp.llama_n_seq_max(ctx))
        self.n_ubatch = min(int(llama_cpp.llama_n_ubatch(ctx)), int(llama_cpp.llama_n_batch(ctx)))
        self.pooling = int(llama_cpp.llama_pooling_type(ctx))
        self.n_embd = int(llama_cpp.llama_model_n_embd_out(model))
        limit = min(self.n_ubatch, int(llama_cpp.llama_n_ctx_seq(ctx)))
        if not self.memory:  # an encoder has no cache and only n_ctx_train position embeddings
            limit = min(limit, int(llama_cpp.llama_model_n_ctx_train(model)))
        self.max_tokens = limit
        self.batch = BatchBuffer(self.n_ubatch)
        self.decodes_total = 0

    def packs(self, inputs: Sequence[Sequence[int]]) -> list[list[int]]:
        """Input indices grouped, in order, into packs of at most n_seq_max inputs and n_ubatch tokens."""
        packs: list[list[int]] = []
        current: list[int] = []
        tokens = 0
        for index, ids in enumerate(inputs):
            if not 0 < len(ids) <= self.max_tokens:
                raise ValueError(f"input {index} has {len(ids)} tokens (limit {self.max_tokens})")
            if current and (len(current) == self.n_seq_max or tokens + len(ids) > self.n_ubatch):
                packs.append(current)
                current, tokens = [], 0
            current.append(index)
            tokens += len(ids)
        if current:
            packs.append(current)
        return packs

    def embed(self, inputs: Sequence[Sequence[int]], normalize: bool) -> list[Vector]:
        """One vector per input, in input order; raises EmbeddingError when llama.cpp fails."""
        out: list[Vector] = [np.empty(0, dtype=np.float32)] * len(inputs)
        for pack in self.packs(inputs):
            for index, vector in zip(pack, self._decode([inputs[i] for i in pack]), strict=True):
                out[index] = vector
        if normalize:
            for vector in out:
                norm = float(np.linalg.norm(vector))
                if norm > 0.0:
                    vector /= norm
        return out

    def _decode(self, pack: list[Sequence[int]]) -> list[Vector]:
        batch = self.batch
        batch.clear()
        spans: list[tuple[int, int]] = []
        for seq_id, ids in enumerate(pack):
            start = batch.size
            batch.add_chunk(np.asarray(ids, dtype=np.int32), 0, seq_id, True)
            spans.append((start, batch.size))
        batch.want_logits[: batch.size] = 1  # pooling reads every token's output
        try:
            status = int(llama_cpp.llama_decode(self.ctx, batch.view(batch.size)))
            self.decodes_total += 1
            if status != 0:
                raise EmbeddingError(f"llama_decode failed with status {status}")
            if self.pooling == llama_cpp.LLAMA_POOLING_TYPE_NONE:
                return self._mean_of_rows(spans, batch.size)
            return [self._pooled(seq_id) for seq_id in range(len(pack))]
        finally:
            if self.memory:  # this context holds nothing between calls
                llama_cpp.llama_memory_clear(self.memory, False)

    def _pooled(self, seq_id: int) -> Vector:
        pointer = llama_cpp.llama_get_embeddings_seq(self.ctx, seq_id)
        if not pointer:
            raise EmbeddingError(f"llama.cpp returned no pooled embedding for sequence {seq_id}")
        return np.ctypeslib.as_array(pointer, shape=(self.n_embd,)).astype(np.float32, copy=True)

    def _mean_of_rows(self, spans: list[tuple[int, int]], n_rows: int) -> list[Vector]:
        """A context without pooling gives one vector per token: mean them per input."""
        pointer = llama_cpp.llama_get_embeddings(self.ctx)
        if not pointer:
            raise EmbeddingError("llama.cpp returned no token embeddings")
        rows = np.ctypeslib.as_array(pointer, shape=(n_rows, self.n_embd))
        return [rows[start:end].mean(axis=0, dtype=np.float32) for start, end in spans]

    def close(self) -> None:
        if self._owns_context and self.ctx:
            llama_cpp.llama_free(self.ctx)
        self.ctx = None


def embedding_context(engine: LlamaEngine, options: ModelOptions, override: WorkerOverride) -> Any:
    """A second context on the engine's model for `embedding_pooling`, sized for one packed decode."""
    assert options.embedding_pooling is not None
    pooling = _POOLINGS[options.embedding_pooling]
    n_seq = _GENERATION_EMBED_SEQS
    n_ubatch = min(options.n_ubatch or _GENERATION_EMBED_UBATCH, engine.info.n_ctx_seq)
    n_ubatch = max(n_ubatch - n_ubatch % n_seq, n_seq)  # MEAN pooling: n_ubatch % n_seq_max == 0
    params = context_params(options, override, True, pooling)
    params.n_ctx = params.n_batch = params.n_ubatch = n_ubatch
    params.n_seq_max = n_seq
    params.kv_unified = True
    ctx = llama_cpp.llama_init_from_model(engine.model, params)
    if not ctx:
        raise EngineLoadError("llama.cpp could not create the embedding context")
    return ctx


class EmbeddingService:
    """The worker's embed queue: checks requests, then runs every queued one together between engine steps."""

    def __init__(self, runner: EmbeddingRunner | None, normalize: bool, n_vocab: int, refusal: str) -> None:
        self.runner = runner
        self.normalize = normalize
        self.n_vocab = n_vocab
        self.refusal = refusal
        self.queue: list[EmbedRequest] = []

    @classmethod
    def for_engine(
        cls, engine: LlamaEngine, options: ModelOptions, override: WorkerOverride
    ) -> EmbeddingService:
        declared = engine.vocab.metadata(NORMALIZE_KEY)
        normalize = (declared or "true").strip().lower() not in ("false", "0")
        n_vocab = engine.vocab.n_vocab
        if engine.embedding:
            if engine.info.pooling_type == llama_cpp.LLAMA_POOLING_TYPE_RANK:
                return cls(None, normalize, n_vocab, "a reranking model does not serve embeddings")
            runner = EmbeddingRunner(engine.ctx, engine.model, owns_context=False)
        elif options.embedding_pooling is not None:
            ctx = embedding_context(engine, options, override)
            runner = EmbeddingRunner(ctx, engine.model, owns_context=True)
        else:
            return cls(None, normalize, n_vocab, "this model does not serve embeddings")
        return cls(runner, normalize, n_vocab, "")

    def info(self) -> EmbedInfo:
        """Part of the worker's `ready` info: the router's limits and default."""
        runner = self.runner
        return EmbedInfo(
            max_tokens=runner.max_tokens if runner else 0,
            dim=runner.n_embd if runner else 0,
            normalize=self.normalize,
        )

    @property
    def pending(self) -> bool:
        return bool(self.queue)

    def submit(self, request: EmbedRequest, draining: bool = False) -> Error | None:
        """Queues a request; returns an `error` message instead for one that cannot run."""
        if draining:
            return Error(request.rid, 503, "unavailable", "worker is draining")
        problem = self._check(request)
        if problem is not None:
            return Error(request.rid, 400, "invalid_request_error", problem)
        self.queue.append(request)
        return None

    def _check(self, request: EmbedRequest) -> str | None:
        if self.runner is None:
            return self.refusal
        if not request.inputs:
            return "the input is empty"
        if any(r.rid == request.rid for r in self.queue):
            return f"duplicate request id {request.rid}"
        for index, ids in enumerate(request.inputs):
            if not ids:
                return f"input[{index}] is empty"
            if len(ids) > self.runner.max_tokens:
                return f"input[{index}] has {len(ids)} tokens; the limit is {self.runner.max_tokens}"
            bad = next((t for t in ids if not 0 <= t < self.n_vocab), None)
            if bad is not None:
                return f"input[{index}] token id {bad} is out of range [0, {self.n_vocab})"
        return None

    def request_ids(self) -> list[str]:
        return [r.rid for r in self.queue]

    def cancel(self, rid: str) -> bool:
        kept = [r for r in self.queue if r.rid != rid]
        cancelled = len(kept) != len(self.queue)
        self.queue = kept
        return cancelled

    def run(self) -> list[EmbeddingsReply | Error]:
        """Embeds every queued request (packed together); returns their replies and errors."""
        requests, self.queue = self.queue, []
        if not requests or self.runner is None:
            return []
        try:
            return self._run_together(requests)
        except EmbeddingError:
            if len(requests) == 1:
                log.exception("embedding request %s failed", requests[0].rid)
                return [Error(requests[0].rid, 500, "server_error", "embedding failed")]
        # One request broke the shared run: redo them one by one so only that one fails.
        messages: list[EmbeddingsReply | Error] = []
        for request in requests:
            try:
                messages.extend(self._run_together([request]))
            except EmbeddingError as error:
                log.error("embedding request %s failed: %s", request.rid, error)
                messages.append(Error(request.rid, 500, "server_error", "embedding failed"))
        return messages

    def _run_together(self, requests: list[EmbedRequest]) -> list[EmbeddingsReply | Error]:
        assert self.runner is not None
        messages: list[EmbeddingsReply | Error] = []
        for normalize in (True, False):
            group = [r for r in requests if r.normalize == normalize]
            if not group:
                continue
            inputs = [ids for r in group for ids in r.inputs]
            vectors = self.runner.embed(inputs, normalize)
            offset = 0
            for request in group:
                count = len(request.inputs)
                chunk = vectors[offset : offset + count]
                offset += count
                reply = EmbeddingsReply(
                    request.rid,
                    [v.astype("<f4", copy=False).tobytes() for v in chunk],
                    [len(ids) for ids in request.inputs],
                )
                messages.append(reply)
        return messages

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()
