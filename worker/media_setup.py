"""Start-up and intake glue for media: load the projector named by `model.mtmd`, expand submits.

Kept out of worker/main.py so the process loop stays about sockets: this builds the `MediaEncoder`
(projector path or hub download, embedding cache) and turns a submit that carries media into an expanded
prompt, or a 400 naming the part.
"""

from __future__ import annotations

import logging
from pathlib import Path

import llama_cpp

from shared.config import ModelOptions, WorkerOverride
from shared.models import ModelSourceError, resolve_from_pretrained
from shared.protocol import SubmitRequest
from worker.embedding_cache import EmbeddingCache
from worker.engine import LlamaEngine
from worker.media import MediaEncoder
from worker.mtmd_context import MediaError, MtmdContext
from worker.scheduler import RequestRejected, Scheduler

log = logging.getLogger(__name__)


def projector_path(options: ModelOptions) -> Path | None:
    mtmd = options.mtmd
    if mtmd is None:
        return None
    if mtmd.mmproj_path is not None:
        path = Path(mtmd.mmproj_path).expanduser()
        if not path.is_file():
            raise ModelSourceError(f"model.mtmd.mmproj_path {path} does not exist")
        return path
    assert mtmd.mmproj_from_pretrained is not None
    return resolve_from_pretrained(mtmd.mmproj_from_pretrained)


def load_media(options: ModelOptions, engine: LlamaEngine, override: WorkerOverride) -> MediaEncoder | None:
    """The worker's media encoder, or None without `model.mtmd` (or for an embedding model)."""
    path = projector_path(options)
    if path is None or engine.embedding:
        return None
    threads = override.threads if override.threads is not None else options.threads
    n_ubatch = int(llama_cpp.llama_n_ubatch(engine.ctx))
    use_gpu = options.n_gpu_layers != 0  # None: llama.cpp offloads by default
    mtmd = MtmdContext(path, engine.model, threads or 1, n_ubatch, use_gpu=use_gpu)
    cache = None
    assert options.mtmd is not None
    if options.mtmd.embedding_cache is not None:
        spec = options.mtmd.embedding_cache
        cache = EmbeddingCache(Path(spec.path).expanduser(), spec.max_bytes)
    n_embd = int(llama_cpp.llama_model_n_embd(engine.model))
    log.info("projector %s: vision=%s audio=%s", path, mtmd.vision, mtmd.audio)
    return MediaEncoder(mtmd, n_embd, engine.vocab.n_vocab, cache)


def submit_with_media(
    scheduler: Scheduler, encoder: MediaEncoder | None, submit: SubmitRequest, n_ctx_seq: int
) -> None:
    """Queues `submit`; with media, its prompt expanded first. Raises RequestRejected (400) for media
    this worker cannot take."""
    if not submit.media:
        scheduler.submit(submit)
        return
    if encoder is None:
        raise RequestRejected("this model has no multimodal projector (model.mtmd)")
    try:
        media = encoder.expand(submit)
    except MediaError as error:
        raise RequestRejected(str(error)) from error
    # The router sized max_tokens on the text alone: leave room for what the media added.
    submit.max_tokens = max(1, min(submit.max_tokens, n_ctx_seq - len(submit.prompt)))
    try:
        scheduler.submit(submit, media)
    except Exception:
        media.close()
        raise
