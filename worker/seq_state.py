"""A sequence's llama.cpp state as bytes and back: what the checkpoint and disk tiers save and restore.

Kept apart from the disk cache (which stores bytes and knows nothing of contexts), so every llama.cpp call of
the worker lives in the engine, runner and state modules.
"""

from __future__ import annotations

import ctypes
from typing import Any

import llama_cpp


def read_seq_state(ctx: Any, seq_id: int, n_tokens: int | None = None) -> bytes:
    """The sequence's state as bytes (`llama_state_seq_get_*`); empty when llama.cpp gives none.

    With `n_tokens`, also empty unless the sequence holds exactly positions 0..n_tokens-1: a state
    that also holds generated tokens must never be saved under the prompt's tokens.
    """
    if n_tokens is not None:
        memory = llama_cpp.llama_get_memory(ctx)
        first = int(llama_cpp.llama_memory_seq_pos_min(memory, seq_id))
        last = int(llama_cpp.llama_memory_seq_pos_max(memory, seq_id))
        if last != n_tokens - 1 or first < 0:
            return b""
    size = int(llama_cpp.llama_state_seq_get_size(ctx, seq_id))
    if size <= 0:
        return b""
    buf = (ctypes.c_uint8 * size)()
    written = int(llama_cpp.llama_state_seq_get_data(ctx, buf, size, seq_id))
    return bytes(memoryview(buf)[:written]) if written > 0 else b""


def restore_seq_state(ctx: Any, seq_id: int, state: bytes) -> bool:
    """Loads `state` into `seq_id` (which should be empty); False when llama.cpp rejects it."""
    if not state:
        return False
    # Points straight at the bytes object's buffer: llama.cpp only reads it, so no copy is needed.
    src = ctypes.cast(ctypes.c_char_p(state), ctypes.POINTER(ctypes.c_uint8))
    return int(llama_cpp.llama_state_seq_set_data(ctx, src, len(state), seq_id)) > 0
