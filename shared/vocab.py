"""A llama.cpp model's vocabulary: tokenize, token pieces, special tokens, and the embedded chat template.

The router loads the GGUF with `vocab_only` (milliseconds, no weights) to template and tokenize; the worker
uses the same class over its full model for end-of-generation checks. Every id that reaches llama.cpp is
range-checked first, since an out-of-range id aborts the whole process inside llama.cpp.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from pathlib import Path

import llama_cpp

from shared.stderr_capture import bounded_stderr

log = logging.getLogger(__name__)

_backend_lock = threading.Lock()
_backend_ready = False

# Keep a reference: llama.cpp calls this for every log line for the life of the process.
# ggml_log_level in this llama.cpp: 1 DEBUG, 2 INFO, 3 WARN, 4 ERROR, 5 CONT (continues the last line).
_LOG_LEVELS = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
_llama_log = logging.getLogger("llama.cpp")
_MAX_LOG_CHARS = 2000
# llama.cpp warns about harmless model quirks on every load; show them only when asked for.
_llama_log.setLevel(os.environ.get("LLAMAFLEET_LLAMA_LOG_LEVEL", "ERROR").upper())


@llama_cpp.llama_log_callback
def _forward_llama_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    del user_data
    py_level = _LOG_LEVELS.get(int(level), logging.DEBUG)
    # llama.cpp is chatty at INFO (every metadata key on load): show its info lines only at DEBUG.
    if py_level == logging.INFO:
        py_level = logging.DEBUG
    if _llama_log.isEnabledFor(py_level):
        line = text.decode("utf-8", "replace").rstrip()
        if len(line) > _MAX_LOG_CHARS:  # e.g. a parse error quoting a whole grammar
            line = f"{line[:_MAX_LOG_CHARS]}... ({len(line) - _MAX_LOG_CHARS} more characters not logged)"
        _llama_log.log(py_level, line)


def init_backend() -> None:
    """Initialises llama.cpp once per process and routes its logs to Python logging (quiet by default)."""
    global _backend_ready
    with _backend_lock:
        if _backend_ready:
            return
        llama_cpp.llama_log_set(_forward_llama_log, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        _backend_ready = True


class TokenizerError(ValueError):
    """Text or token ids that this vocabulary cannot handle."""


class Vocab:
    """Wraps a `llama_vocab*` with piece caching; thread-compatible (no shared mutable C state)."""

    def __init__(self, model: llama_cpp.llama_model_p, owns_model: bool = False) -> None:
        self._model = model
        self._owns_model = owns_model
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self.bos_id = int(llama_cpp.llama_vocab_bos(self._vocab))
        self.eos_id = int(llama_cpp.llama_vocab_eos(self._vocab))
        self.eot_id = int(llama_cpp.llama_vocab_eot(self._vocab))
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        self.add_eos = bool(llama_cpp.llama_vocab_get_add_eos(self._vocab))
        self._pieces: list[bytes | None] = [None] * self.n_vocab
        self.eog_ids = frozenset(
            t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self._vocab, t)
        )

    @classmethod
    def load(cls, path: Path) -> Vocab:
        """Loads only the vocabulary of a GGUF (no weights)."""
        init_backend()
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not model:
            raise TokenizerError(f"cannot load the vocabulary of {path}")
        return cls(model, owns_model=True)

    def close(self) -> None:
        if self._owns_model and self._model:
            llama_cpp.llama_model_free(self._model)
            self._owns_model = False

    @property
    def model(self) -> llama_cpp.llama_model_p:
        return self._model

    def token_text(self, token: int) -> str:
        """The token's vocabulary entry (e.g. `<|im_end|>`), for templates' bos/eos strings."""
        if not 0 <= token < self.n_vocab:
            return ""
        raw = llama_cpp.llama_vocab_get_text(self._vocab, token)
        return raw.decode("utf-8", "replace") if raw else ""

    def chat_template(self) -> str | None:
        raw = llama_cpp.llama_model_chat_template(self._model, None)
        return raw.decode("utf-8") if raw else None

    def metadata(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(4096)
        n = llama_cpp.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        while True:
            out = (llama_cpp.llama_token * capacity)()
            n = llama_cpp.llama_tokenize(
                self._vocab, data, len(data), out, capacity, add_special, parse_special
            )
            if n >= 0:
                return list(out[:n])
            if n == -(2**31):
                raise TokenizerError("text too long to tokenize")
            capacity = -n

    def check_ids(self, tokens: list[int]) -> None:
        for token in tokens:
            if not 0 <= token < self.n_vocab:
                raise TokenizerError(f"token id {token} is out of range [0, {self.n_vocab})")

    def piece(self, token: int) -> bytes:
        """The bytes a token renders to; control tokens render to nothing."""
        cached = self._pieces[token]
        if cached is not None:
            return cached
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        piece = buf.raw[: max(n, 0)]
        self._pieces[token] = piece
        return piece

    def special_piece(self, token: int) -> bytes:
        """The bytes of a token including control tokens' own text (for echo and logprob tokens)."""
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, True)
        if n < 0:  # a longer piece: llama.cpp says how long
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, True)
        return buf.raw[: max(n, 0)]

    def display(self, token: int) -> str:
        """A token's text for logprobs: its piece, or `bytes:\\xNN..` when the piece is not valid UTF-8
        on its own (as OpenAI shows partial characters), so distinct tokens never share a label."""
        piece = self.piece(token)
        try:
            return piece.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in piece)

    def grammar_is_valid(self, grammar: str) -> bool:
        """Whether llama.cpp parses this GBNF (root rule `root`): checked before a request is queued."""
        with bounded_stderr():  # a parse error prints the whole grammar to stderr
            sampler = llama_cpp.llama_sampler_init_grammar(self._vocab, grammar.encode(), b"root")
        if not sampler:
            return False
        llama_cpp.llama_sampler_free(sampler)
        return True

    def render(self, tokens: list[int]) -> str:
        """Token ids back to text as llama.cpp's `llama_detokenize` writes it (control tokens as their text,
        a sentencepiece vocabulary's leading space removed) for /detokenize. Ids must be checked first."""
        ids = (llama_cpp.llama_token * len(tokens))(*tokens)
        capacity = 16 + 8 * len(tokens)
        while True:
            buf = ctypes.create_string_buffer(capacity)
            n = llama_cpp.llama_detokenize(self._vocab, ids, len(tokens), buf, capacity, False, True)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", "replace")
            capacity = -n

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", "replace")
