"""The tiny gemma3 (SWA) and Mamba (recurrent) models load and keep the cache invariants."""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader

from tests.fixtures.tiny_families import (
    GEMMA3_ARCH,
    RECURRENT_ARCH,
    write_tiny_gemma3,
    write_tiny_recurrent,
)
from tests.fixtures.tiny_models import (
    BOS_ID,
    BYTE_VOCAB_SIZE,
    CHATML_TEMPLATE,
    EOS_ID,
    FIRST_BYTE_ID,
    IM_END_ID,
    IM_START_ID,
)

_TEXT = b"user\nthe quick brown fox jumps over a lazy dog"
PROMPT: list[int] = [BOS_ID, IM_START_ID, *(FIRST_BYTE_ID + b for b in _TEXT)][:40]
N_GEN = 20
CUT = 30  # position the caches are truncated at
_Writer = Callable[..., Path]


@dataclass
class _Loaded:
    model: Any
    ctx: Any

    @property
    def mem(self) -> Any:
        return llama_cpp.llama_get_memory(self.ctx)


@pytest.fixture(scope="module", autouse=True)
def _backend() -> None:
    llama_cpp.llama_backend_init()


@contextmanager
def _load(path: Path) -> Iterator[_Loaded]:
    model_params = llama_cpp.llama_model_default_params()
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), model_params)
    assert model, f"llama.cpp could not load {path}"
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_seq_max = 512, 128, 2
    params.kv_unified = True
    params.n_threads = params.n_threads_batch = 1
    ctx = llama_cpp.llama_init_from_model(model, params)
    try:
        assert ctx, "llama.cpp could not create a context"
        yield _Loaded(model, ctx)
    finally:
        if ctx:
            llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)


def _decode(ctx: Any, tokens: Sequence[int], pos0: int, seqs: Sequence[int] = (0,)) -> list[Any]:
    """Decode `tokens` from position `pos0` into each of `seqs`; return each seq's last logits.

    Every seq gets the same tokens in one batch, so several seqs advance in lockstep.
    """
    n = len(tokens) * len(seqs)
    batch = llama_cpp.llama_batch_init(n, 0, 1)
    last: list[int] = []  # batch index of each seq's last token
    try:
        i = 0
        for seq in seqs:
            for k, token in enumerate(tokens):
                batch.token[i], batch.pos[i] = token, pos0 + k
                batch.n_seq_id[i], batch.seq_id[i][0] = 1, seq
                batch.logits[i] = k == len(tokens) - 1
                i += 1
            last.append(i - 1)
        batch.n_tokens = n
        assert llama_cpp.llama_decode(ctx, batch) == 0
    finally:
        llama_cpp.llama_batch_free(batch)
    rows = (llama_cpp.llama_get_logits_ith(ctx, i) for i in last)
    return [np.ctypeslib.as_array(row, shape=(BYTE_VOCAB_SIZE,)).copy() for row in rows]


def _continue(ctx: Any, tokens: Sequence[int], pos0: int) -> list[int]:
    """Decode `tokens` into seq 0 from `pos0`, then greedy-generate N_GEN tokens."""
    logits = _decode(ctx, tokens, pos0)[0]
    out: list[int] = []
    for pos in range(pos0 + len(tokens), pos0 + len(tokens) + N_GEN):
        out.append(int(np.argmax(logits)))
        if len(out) < N_GEN:
            logits = _decode(ctx, out[-1:], pos)[0]
    return out


def _fresh_greedy(m: _Loaded) -> list[int]:
    llama_cpp.llama_memory_clear(m.mem, True)
    return _continue(m.ctx, PROMPT, 0)


def _assert_f32_gguf(path: Path, arch: str) -> None:
    reader = GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == arch
    assert reader.fields["tokenizer.chat_template"].contents() == CHATML_TEMPLATE
    assert reader.tensors and all(t.tensor_type == GGMLQuantizationType.F32 for t in reader.tensors)


def _arch(model: Any) -> bytes:
    buf = ctypes.create_string_buffer(64)
    assert llama_cpp.llama_model_meta_val_str(model, b"general.architecture", buf, len(buf)) > 0
    return buf.value


@pytest.mark.parametrize("write", [write_tiny_gemma3, write_tiny_recurrent])
def test_eos_bias_is_the_end_of_generation_logit(tmp_path: Path, write: _Writer) -> None:
    for eos_bias in (50.0, -50.0):
        with _load(write(tmp_path / "m.gguf", eos_bias=eos_bias)) as m:
            logits = _decode(m.ctx, PROMPT, 0)[0]
        eog = logits[[EOS_ID, IM_END_ID]]
        np.testing.assert_allclose(eog, eos_bias, rtol=0.02)
        assert logits[[BOS_ID, IM_START_ID]].max() < -20.0  # other specials are suppressed
        assert 0.0 < np.delete(logits, [EOS_ID, IM_END_ID]).max() < 20.0


# --- gemma3 (sliding-window attention) ----------------------------------------------------------


def test_gemma3_loads_with_sliding_window(tmp_path: Path) -> None:
    path = write_tiny_gemma3(tmp_path / "g.gguf", sliding_window=8)
    _assert_f32_gguf(path, GEMMA3_ARCH)
    with _load(path) as m:
        assert _arch(m.model) == b"gemma3"
        assert llama_cpp.llama_model_n_swa(m.model) == 8
        assert not llama_cpp.llama_model_is_recurrent(m.model)
        assert not llama_cpp.llama_model_is_hybrid(m.model)


def test_gemma3_greedy_is_deterministic(tmp_path: Path) -> None:
    with _load(write_tiny_gemma3(tmp_path / "g.gguf")) as m:
        first = _fresh_greedy(m)
        assert first == _fresh_greedy(m)
        assert len(first) == N_GEN and len(set(first)) > 3


def test_gemma3_truncate_and_redecode_reproduces_continuation(tmp_path: Path) -> None:
    with _load(write_tiny_gemma3(tmp_path / "g.gguf")) as m:
        first = _fresh_greedy(m)
        assert llama_cpp.llama_memory_seq_rm(m.mem, 0, CUT, -1)
        assert llama_cpp.llama_memory_seq_pos_max(m.mem, 0) == CUT - 1
        # swa_full (the default) keeps positions outside the window, so the prefix survives.
        assert llama_cpp.llama_memory_seq_pos_min(m.mem, 0) == 0
        assert _continue(m.ctx, PROMPT[CUT:], CUT) == first


def test_gemma3_sliding_window_changes_output(tmp_path: Path) -> None:
    """Same weights with a window longer than the prompt: the SWA path really is exercised."""
    outputs = []
    for window in (8, 4096):
        with _load(write_tiny_gemma3(tmp_path / f"g{window}.gguf", sliding_window=window)) as m:
            outputs.append(_fresh_greedy(m))
    assert outputs[0] != outputs[1]


# --- recurrent (Mamba) --------------------------------------------------------------------------


def test_recurrent_loads(tmp_path: Path) -> None:
    path = write_tiny_recurrent(tmp_path / "r.gguf")
    _assert_f32_gguf(path, RECURRENT_ARCH)
    with _load(path) as m:
        assert _arch(m.model) == b"mamba"
        recurrent = llama_cpp.llama_model_is_recurrent(m.model)
        assert recurrent or llama_cpp.llama_model_is_hybrid(m.model)
        assert llama_cpp.llama_model_n_swa(m.model) == 0


def test_recurrent_greedy_is_deterministic(tmp_path: Path) -> None:
    with _load(write_tiny_recurrent(tmp_path / "r.gguf")) as m:
        first = _fresh_greedy(m)
        assert first == _fresh_greedy(m)
        assert len(first) == N_GEN and len(set(first)) > 3


def test_recurrent_state_cannot_be_truncated(tmp_path: Path) -> None:
    with _load(write_tiny_recurrent(tmp_path / "r.gguf")) as m:
        _fresh_greedy(m)
        end = len(PROMPT) + N_GEN - 2  # the last generated token is sampled, not decoded
        assert llama_cpp.llama_memory_seq_pos_max(m.mem, 0) == end
        assert not llama_cpp.llama_memory_seq_rm(m.mem, 0, CUT, -1)
        assert llama_cpp.llama_memory_seq_pos_max(m.mem, 0) == end  # left untouched
        assert llama_cpp.llama_memory_seq_rm(m.mem, 0, -1, -1)  # whole-sequence removal works
        assert llama_cpp.llama_memory_seq_pos_max(m.mem, 0) == -1


def test_recurrent_seq_cp_gives_identical_state(tmp_path: Path) -> None:
    with _load(write_tiny_recurrent(tmp_path / "r.gguf")) as m:
        logits = _decode(m.ctx, PROMPT, 0)[0]
        llama_cpp.llama_memory_seq_cp(m.mem, 0, 1, -1, -1)
        assert llama_cpp.llama_memory_seq_pos_max(m.mem, 1) == len(PROMPT) - 1
        for pos in range(len(PROMPT), len(PROMPT) + 5):
            both = _decode(m.ctx, [int(np.argmax(logits))], pos, seqs=(0, 1))
            np.testing.assert_array_equal(both[0], both[1])
            logits = both[0]


def test_recurrent_state_carries_history(tmp_path: Path) -> None:
    """A token 37 positions back still moves the logits, so a wrong cached state is detectable."""
    altered = list(PROMPT)
    altered[3] += 1
    with _load(write_tiny_recurrent(tmp_path / "r.gguf")) as m:
        base = _decode(m.ctx, PROMPT, 0)[0]
        llama_cpp.llama_memory_clear(m.mem, True)
        other = _decode(m.ctx, altered, 0)[0]
    assert np.abs(base - other).max() > 0.1
