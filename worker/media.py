"""Media in a generation request: expand each item into prompt tokens, and embed it when its turn comes.

At submit, every `MediaInput` is tokenized by mtmd (worker/mtmd_context.py) and spliced into the prompt:
the text tokens the projector wants around it, plus one *placeholder* token per media embedding. The
placeholders are derived from the media's SHA-256 (token i of a span is a hash of the digest and i), so
the prefix cache, which compares prompt tokens, matches a turn-two prompt that carries the same image
and never one that carries a different image; a match that ends inside a span is cut back to the span's
start (`clamp_reuse`), so a partial image is never reused. The placeholders never reach llama.cpp as
tokens: the scheduler plans a span (a non-causal one whole, a causal one in budget-sized chunks, one span
per step) as work items of their own (`plan_take`), and the runner decodes the span's embeddings (from
the embedding cache, or encoded now) in a llama_decode of its own.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from shared.protocol import SubmitRequest
from worker.embedding_cache import EmbeddingCache
from worker.mtmd_context import MediaError, MediaPiece, MtmdContext

log = logging.getLogger(__name__)


@dataclass
class MediaSpan:
    """One media item's embeddings at prompt positions [start, start + piece.n_tokens)."""

    start: int
    sha256: str
    piece: MediaPiece
    # Kept from the first chunk to the last when a causal span is decoded over several steps.
    embd: npt.NDArray[np.float32] | None = field(default=None, repr=False)

    @property
    def end(self) -> int:
        return self.start + self.piece.n_tokens


@dataclass
class RequestMedia:
    spans: list[MediaSpan] = field(default_factory=list)
    added_tokens: int = 0  # prompt tokens beyond the text tokens the router sent
    reported: bool = False

    def report_added(self) -> int | None:
        """`added_tokens` the first time (the router adds it to usage once), then None."""
        if self.reported:
            return None
        self.reported = True
        return self.added_tokens

    def span_over(self, position: int) -> MediaSpan | None:
        """The span that holds prompt position `position`."""
        return next((s for s in self.spans if s.start <= position < s.end), None)

    def next_start(self, position: int) -> int | None:
        """The first span start at or after `position`."""
        return next((s.start for s in self.spans if s.start >= position), None)

    def clamp_reuse(self, length: int) -> int:
        """A reusable prefix length cut back so that it never ends inside a span."""
        for span in self.spans:
            if span.start < length < span.end:
                return span.start
        return length

    def close(self) -> None:
        for span in self.spans:
            span.piece.close()
            span.embd = None


def chunk_key(sha256: str, index: int) -> str:
    """The hash a media item's `index`-th chunk is keyed by (the item's own hash for the first)."""
    return hashlib.sha256(f"{sha256}:{index}".encode()).hexdigest()


def placeholders(sha256: str, count: int, n_vocab: int) -> list[int]:
    """`count` token ids in [0, n_vocab) derived from the media hash (see the module docstring)."""
    out: list[int] = []
    seed = bytes.fromhex(sha256)
    index = 0
    while len(out) < count:
        block = hashlib.sha256(seed + index.to_bytes(4, "little")).digest()
        out.extend(int.from_bytes(block[i : i + 4], "little") % n_vocab for i in range(0, 32, 4))
        index += 1
    return out[:count]


class MediaEncoder:
    """The worker's media service: expands requests at submit, returns embeddings for the runner."""

    def __init__(self, mtmd: MtmdContext, n_embd: int, n_vocab: int, cache: EmbeddingCache | None) -> None:
        self.mtmd = mtmd
        self.n_embd = n_embd
        self.n_vocab = n_vocab
        self.cache = cache
        self.encoded = 0  # projector runs (cache misses), for tests and stats
        self.cache_hits = 0

    def expand(self, submit: SubmitRequest) -> RequestMedia:
        """Rewrites `submit.prompt` with every media item spliced in; raises MediaError naming the part."""
        media = RequestMedia()
        prompt = submit.prompt
        out: list[int] = []
        cursor = 0
        try:
            for item in sorted(submit.media, key=lambda m: m.position):
                if not 0 <= item.position <= len(prompt):
                    raise MediaError(
                        f"{item.part or 'media'}: position {item.position} is outside the prompt"
                    )
                out.extend(prompt[cursor : item.position])
                cursor = item.position
                try:
                    pieces = self.mtmd.pieces(item.kind, item.data, item.sha256)
                except MediaError as error:
                    raise MediaError(f"{item.part or item.kind}: {error}") from error
                for index, piece in enumerate(pieces):  # audio: one chunk per 30 s
                    key = item.sha256 if index == 0 else chunk_key(item.sha256, index)
                    out.extend(piece.before)
                    media.spans.append(MediaSpan(len(out), key, piece))
                    out.extend(placeholders(key, piece.n_tokens, self.n_vocab))
                    out.extend(piece.after)
            out.extend(prompt[cursor:])
        except MediaError:
            media.close()
            raise
        if media.spans and media.spans[-1].end == len(out):
            media.close()
            raise MediaError("the prompt cannot end with a media item (no text after it to answer from)")
        media.added_tokens = len(out) - len(prompt)
        submit.prompt = out
        submit.media = []  # the bytes are not needed any more
        return media

    def embeddings(self, span: MediaSpan) -> npt.NDArray[np.float32]:
        """The span's embeddings: kept from an earlier chunk of it, from the cache when it holds them,
        else encoded (and stored)."""
        if span.embd is not None:
            return span.embd
        span.embd = self._load(span)
        return span.embd

    def _load(self, span: MediaSpan) -> npt.NDArray[np.float32]:
        key = f"{span.sha256}-{self.mtmd.identity[:16]}"
        if self.cache is not None:
            cached = self.cache.get(key, span.piece.n_tokens, self.n_embd)
            if cached is not None:
                self.cache_hits += 1
                log.info("%s %s: embeddings from the cache", span.piece.kind, span.sha256[:12])
                return cached
        started = time.perf_counter()
        array = self.mtmd.encode(span.piece, self.n_embd)
        self.encoded += 1
        log.info(
            "%s %s: embeddings encoded (%d tokens) in %.1f ms",
            span.piece.kind,
            span.sha256[:12],
            span.piece.n_tokens,
            (time.perf_counter() - started) * 1000,
        )
        if self.cache is not None:
            self.cache.put(key, array)
        return array

    def close(self) -> None:
        self.mtmd.close()


def plan_take(media: RequestMedia | None, n_past: int, take: int) -> tuple[int, MediaSpan | None]:
    """How many prompt tokens a prefill chunk at `n_past` takes (`take` is the step's budget): within a
    span (returned with it), the rest of a non-causal span whole (its tokens attend to each other, which
    llama.cpp computes only inside one micro-batch) or up to `take` of a causal one, like text; else text
    up to the next span at most."""
    if media is None:
        return take, None
    span = media.span_over(n_past)
    if span is not None:
        rest = span.end - n_past
        return (rest if span.piece.non_causal else min(take, rest)), span
    following = media.next_start(n_past)
    if following is not None:
        take = min(take, following - n_past)
    return take, None
