"""A reusable llama_batch whose arrays are numpy buffers, so a step fills whole chunks with slice writes.

llama_batch_init allocates one seq_id array per row, which forces a Python loop per token to fill; here
every row's seq_id pointer points into one int32 array, so prefill chunks are written with numpy slices
and per-step Python work stays proportional to the number of sequences, not tokens.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import llama_cpp
import numpy as np
import numpy.typing as npt


class BatchBuffer:
    """Rows are appended with `add_token` / `add_chunk`, then `view(n)` gives the llama_batch to decode."""

    def __init__(self, capacity: int, n_embd: int = 0) -> None:
        """`n_embd` > 0 also gives every row an input vector (`embd`), sent alongside its token: what an
        MTP context reads as the target's hidden state (worker/speculative/mtp.py)."""
        self.capacity = capacity
        self.tokens = np.zeros(capacity, dtype=np.int32)
        self.embd = np.zeros((capacity, n_embd), dtype=np.float32)
        self.positions = np.zeros(capacity, dtype=np.int32)
        self.n_seq_ids = np.ones(capacity, dtype=np.int32)
        self.seq_ids = np.zeros(capacity, dtype=np.int32)
        self.want_logits = np.zeros(capacity, dtype=np.int8)
        int_size = ctypes.sizeof(ctypes.c_int32)
        base = self.seq_ids.ctypes.data
        self._seq_id_ptrs = (ctypes.POINTER(ctypes.c_int32) * capacity)(
            *[ctypes.cast(base + i * int_size, ctypes.POINTER(ctypes.c_int32)) for i in range(capacity)]
        )
        self.size = 0
        self._batch = self._make_batch()

    def clear(self) -> None:
        self.size = 0

    @property
    def free(self) -> int:
        return self.capacity - self.size

    def add_token(self, token: int, position: int, seq_id: int, logits: bool) -> int:
        """Appends one row; returns its index (the row to read logits from)."""
        row = self.size
        self.tokens[row] = token
        self.positions[row] = position
        self.seq_ids[row] = seq_id
        self.want_logits[row] = 1 if logits else 0
        self.size = row + 1
        return row

    def add_chunk(
        self,
        tokens: Sequence[int] | npt.NDArray[np.int32],
        start_position: int,
        seq_id: int,
        logits_last: bool,
    ) -> int:
        """Appends a prompt chunk; returns the index of its last row."""
        n = len(tokens)
        begin, end = self.size, self.size + n
        self.tokens[begin:end] = tokens
        self.positions[begin:end] = np.arange(start_position, start_position + n, dtype=np.int32)
        self.seq_ids[begin:end] = seq_id
        self.want_logits[begin:end] = 0
        if logits_last and n:
            self.want_logits[end - 1] = 1
        self.size = end
        return end - 1

    def view(self, n_tokens: int) -> llama_cpp.llama_batch:
        """The llama_batch of the first `n_tokens` rows (one struct, built once: the buffers never move)."""
        self._batch.n_tokens = n_tokens
        return self._batch

    def _make_batch(self) -> llama_cpp.llama_batch:
        batch = llama_cpp.llama_batch()
        # llama_cpp annotates these fields as arrays; they are plain pointers into our numpy buffers.
        fields = {
            "token": self.tokens.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token)),
            "embd": self.embd.ctypes.data_as(ctypes.POINTER(ctypes.c_float)) if self.embd.size else None,
            "pos": self.positions.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_pos)),
            "n_seq_id": self.n_seq_ids.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
            "seq_id": ctypes.cast(self._seq_id_ptrs, ctypes.POINTER(ctypes.POINTER(llama_cpp.llama_seq_id))),
            "logits": self.want_logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)),
        }
        for name, value in fields.items():
            setattr(batch, name, value)
        return batch
