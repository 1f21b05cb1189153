"""Decoding one media span's embeddings into a sequence's KV, as part of an engine step.

llama.cpp's batch carries either token ids or embeddings, never both, so a media span gets a llama_decode
of its own in the step that plans it (the step's text rows, other sequences' decode rows included, follow
in the usual batch). A non-causal span (gemma3's images attend to each other, which llama.cpp computes
only within one micro-batch; worker/mtmd_context.py refuses spans over n_ubatch) goes in whole; a causal
one (Whisper-type audio) is chunked by the step budget like a long prompt, its embeddings kept on the
span between steps. A step's media cost is at most one projector run (none on an embedding-cache hit or
for a later chunk) plus one decode of one span's tokens; bench/media.py measures it.
"""

from __future__ import annotations

import ctypes
import logging
import time
from typing import Any

import llama_cpp
import numpy as np

from worker.media import MediaEncoder, MediaSpan
from worker.mtmd_context import MediaError
from worker.step import Failure, SeqWork

log = logging.getLogger(__name__)


def decode_media(ctx: Any, encoder: MediaEncoder, item: SeqWork, span: MediaSpan) -> Failure | None:
    """Encodes (or fetches) the span's embeddings and decodes them at the item's positions."""
    try:
        whole = encoder.embeddings(span)
    except MediaError as error:
        return Failure(400, "invalid_request_error", str(error))
    offset = item.position - span.start  # a causal span may be decoded over several steps
    embd = whole[offset : offset + len(item.tokens)]
    n_tokens, n_embd = embd.shape
    batch = llama_cpp.llama_batch_init(n_tokens, n_embd, 1)
    try:
        batch.n_tokens = n_tokens
        flat = np.ascontiguousarray(embd, dtype=np.float32)
        ctypes.memmove(batch.embd, flat.ctypes.data, flat.nbytes)
        for i in range(n_tokens):
            batch.pos[i] = item.position + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = item.seq_id
            batch.logits[i] = 0
        if span.piece.non_causal:
            llama_cpp.llama_set_causal_attn(ctx, False)
        started = time.perf_counter()
        try:
            status = int(llama_cpp.llama_decode(ctx, batch))
        finally:
            if span.piece.non_causal:
                llama_cpp.llama_set_causal_attn(ctx, True)
    finally:
        llama_cpp.llama_batch_free(batch)
    log.debug(
        "%s span of %d tokens decoded in %.1f ms",
        span.piece.kind,
        n_tokens,
        (time.perf_counter() - started) * 1000,
    )
    if status != 0:
        log.warning("llama_decode of a %s span failed (status %d)", span.piece.kind, status)
        return Failure(500, "server_error", f"llama_decode of the {span.piece.kind} failed (status {status})")
    return None
