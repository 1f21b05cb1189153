"""The worker's llama.cpp mtmd context: turns image or audio bytes into prompt pieces and embeddings.

Every mtmd call of the worker is here. A media item is tokenized alone (the marker and one bitmap), which
gives the text around it that the projector wants (gemma3: `<start_of_image>` ... `<end_of_image>`) and one
media chunk; the chunk is kept (a copy, freed with `MediaPiece.close`) until the scheduler reaches it, then
encoded into embeddings that the runner decodes like prompt tokens. mtmd and clip abort the process on
input they cannot handle, so what they are given is checked first: bytes are decoded by mtmd's own loaders
(which fail softly), projectors with M-RoPE positions are refused at start-up, and a non-causal chunk
larger than a micro-batch is refused per request.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from llama_cpp import mtmd_cpp

log = logging.getLogger(__name__)


class MtmdLoadError(RuntimeError):
    """The projector could not be loaded for this model."""


class MediaError(ValueError):
    """A media item this projector cannot take (the router answers 400)."""


@dataclass
class MediaPiece:
    """One media chunk of an item (an image, or 30 s of audio): the text tokens before it, the chunk, and
    (on the item's last chunk) the text tokens after it."""

    kind: str  # "image" or "audio"
    before: list[int]
    after: list[int]
    n_tokens: int
    non_causal: bool
    chunk: Any = field(repr=False)  # an owned mtmd_input_chunk copy; None once closed

    def close(self) -> None:
        if self.chunk is not None:
            mtmd_cpp.mtmd_input_chunk_free(self.chunk)
            self.chunk = None


def file_identity(path: Path) -> str:
    """The projector's identity for the embedding cache: its content hash."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class MtmdContext:
    """One mtmd context beside the worker's model; freed by `close()`."""

    def __init__(self, path: Path, model: Any, n_threads: int, n_ubatch: int, use_gpu: bool = True) -> None:
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.print_timings = False
        params.n_threads = max(1, n_threads)
        params.warmup = True  # allocate the encoder graph at start-up, not on the first request
        ctx = mtmd_cpp.mtmd_init_from_file(str(path).encode(), model, params)
        if not ctx:
            raise MtmdLoadError(f"mtmd could not load the projector {path} for this model (see the log)")
        self.ctx = ctx
        self.path = path
        self.n_ubatch = n_ubatch
        self.vision = bool(mtmd_cpp.mtmd_support_vision(ctx))
        self.audio = bool(mtmd_cpp.mtmd_support_audio(ctx))
        if mtmd_cpp.mtmd_decode_use_mrope(ctx):
            self.close()
            raise MtmdLoadError(f"projector {path}: M-RoPE projectors are not supported yet")
        self.marker = mtmd_cpp.mtmd_default_marker()
        self.identity = file_identity(path)

    def pieces(self, kind: str, data: bytes, media_id: str) -> list[MediaPiece]:
        """Decodes `data` with mtmd's loaders and tokenizes it alone; raises MediaError on bad input."""
        if kind == "image" and not self.vision:
            raise MediaError("this model's projector does not take images")
        if kind == "audio" and not self.audio:
            raise MediaError("this model's projector does not take audio")
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        loaded = mtmd_cpp.mtmd_helper_bitmap_init_from_buf_wrapper(
            self.ctx, buf, len(data), False, _no_video_options()
        )
        bitmap = loaded.bitmap
        if loaded.video_ctx:  # cannot happen with no ffmpeg to run; never keep one if it does
            mtmd_cpp.mtmd_helper_video_free(loaded.video_ctx)
            if bitmap:
                mtmd_cpp.mtmd_bitmap_free(bitmap)
            raise MediaError(f"the {kind} could not be decoded")
        if not bitmap:
            raise MediaError(f"the {kind} could not be decoded")
        chunks = None
        try:
            if bool(mtmd_cpp.mtmd_bitmap_is_audio(bitmap)) != (kind == "audio"):
                raise MediaError(f"the bytes are not {'audio' if kind == 'audio' else 'an image'}")
            mtmd_cpp.mtmd_bitmap_set_id(bitmap, media_id.encode())
            chunks = mtmd_cpp.mtmd_input_chunks_init()
            text = mtmd_cpp.mtmd_input_text(self.marker, len(self.marker), False, True)
            bitmaps = (mtmd_cpp.mtmd_bitmap_p_ctypes * 1)(bitmap)
            status = mtmd_cpp.mtmd_tokenize(self.ctx, chunks, ctypes.byref(text), bitmaps, 1)
            if status != 0:
                raise MediaError(f"mtmd could not tokenize the {kind} (status {status})")
            return self._collect(kind, chunks)
        finally:
            if chunks:
                mtmd_cpp.mtmd_input_chunks_free(chunks)
            mtmd_cpp.mtmd_bitmap_free(bitmap)

    def _collect(self, kind: str, chunks: Any) -> list[MediaPiece]:
        pieces: list[MediaPiece] = []
        text: list[int] = []  # text tokens since the last media chunk
        try:
            for index in range(mtmd_cpp.mtmd_input_chunks_size(chunks)):
                chunk = mtmd_cpp.mtmd_input_chunks_get(chunks, index)
                if mtmd_cpp.mtmd_input_chunk_get_type(chunk) == mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    count = ctypes.c_size_t(0)
                    tokens = mtmd_cpp.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(count))
                    text.extend(tokens[i] for i in range(count.value))
                    continue
                n_tokens = int(mtmd_cpp.mtmd_input_chunk_get_n_tokens(chunk))
                non_causal = bool(mtmd_cpp.mtmd_decode_use_non_causal(self.ctx, chunk))
                if non_causal and n_tokens > self.n_ubatch:
                    raise MediaError(
                        f"the {kind} needs {n_tokens} tokens in one micro-batch; n_ubatch is {self.n_ubatch}"
                    )
                copy = mtmd_cpp.mtmd_input_chunk_copy(chunk)
                pieces.append(MediaPiece(kind, text, [], n_tokens, non_causal, copy))
                text = []
            if not pieces:
                raise MediaError(f"mtmd produced no {kind} chunk")
        except MediaError:
            for piece in pieces:
                piece.close()
            raise
        pieces[-1].after = text
        return pieces

    def encode(self, piece: MediaPiece, n_embd: int) -> npt.NDArray[np.float32]:
        """Runs the projector on the chunk; returns (n_tokens, n_embd) embeddings (a copy)."""
        if piece.chunk is None:
            raise MediaError("the media chunk was already released")
        status = mtmd_cpp.mtmd_encode_chunk(self.ctx, piece.chunk)
        if status != 0:
            raise MediaError(f"the projector failed on the {piece.kind} (status {status})")
        pointer = mtmd_cpp.mtmd_get_output_embd(self.ctx)
        if not pointer:
            raise MediaError(f"the projector returned no embeddings for the {piece.kind}")
        array = np.ctypeslib.as_array(
            ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(piece.n_tokens * n_embd,)
        )
        return array.reshape(piece.n_tokens, n_embd).copy()

    def close(self) -> None:
        if getattr(self, "ctx", None):
            mtmd_cpp.mtmd_free(self.ctx)
            self.ctx = None


def _no_video_options() -> Any:
    """mtmd's loader options with video decoding made impossible. Bytes that stb_image cannot decode fall
    through to mtmd's video path, which runs `ffprobe` / `ffmpeg` from PATH on them: untrusted bytes must
    never reach an external program, so the binaries are looked for under /dev/null, where none can be."""
    options = mtmd_cpp.mtmd_helper_init_opt_default()
    options.video_params.ffmpeg_bin_dir = b"/dev/null"
    return options
