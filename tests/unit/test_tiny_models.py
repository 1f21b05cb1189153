"""The generated tiny GGUF models load in llama.cpp and behave as the integration tests assume."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import llama_cpp
import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader

from tests.fixtures.tiny_models import (
    BOS_ID,
    BYTE_VOCAB_SIZE,
    CHATML_TEMPLATE,
    EOS_ID,
    IM_END_ID,
    IM_START_ID,
    _read_kv,
    smollm2_gguf_path,
    write_tiny_llama,
    write_tiny_llama_with_vocab_of,
)


@dataclass
class _Loaded:
    model: Any
    vocab: Any
    ctx: Any


@pytest.fixture(scope="module", autouse=True)
def _backend() -> None:
    llama_cpp.llama_backend_init()


@contextmanager
def _load(path: Path) -> Iterator[_Loaded]:
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
    assert model, f"llama.cpp could not load {path}"
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_seq_max = 256, 64, 2
    params.n_threads = params.n_threads_batch = 1
    ctx = llama_cpp.llama_init_from_model(model, params)
    try:
        assert ctx, "llama.cpp could not create a context"
        yield _Loaded(model, llama_cpp.llama_model_get_vocab(model), ctx)
    finally:
        if ctx:
            llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)


def _tokenize(vocab: Any, text: str, *, add_special: bool = True, parse_special: bool) -> list[int]:
    data = text.encode()
    out = (llama_cpp.llama_token * 512)()
    n = llama_cpp.llama_tokenize(vocab, data, len(data), out, len(out), add_special, parse_special)
    assert n >= 0
    return list(out[:n])


def _decode(ctx: Any, tokens: list[int]) -> None:
    arr = (llama_cpp.llama_token * len(tokens))(*tokens)
    assert llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(arr, len(tokens))) == 0


def _greedy(m: _Loaded, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy-generate from a fresh KV cache; stops after an end-of-generation token."""
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(m.ctx), True)
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
    try:
        _decode(m.ctx, prompt)
        out: list[int] = []
        while len(out) < max_tokens:
            token = int(llama_cpp.llama_sampler_sample(chain, m.ctx, -1))
            out.append(token)
            if llama_cpp.llama_vocab_is_eog(m.vocab, token):
                break
            _decode(m.ctx, [token])
        return out
    finally:
        llama_cpp.llama_sampler_free(chain)


def _piece(vocab: Any, token: int) -> bytes:
    buf = ctypes.create_string_buffer(64)
    n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, True)
    assert n >= 0
    return buf.raw[:n]


def _chatml_prompt() -> str:
    template = jinja2.Environment().from_string(CHATML_TEMPLATE)
    messages = [{"role": "user", "content": "hello world"}]
    return template.render(messages=messages, add_generation_prompt=True)


def test_writes_f32_llama_with_byte_vocab(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "tiny.gguf")
    reader = GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "llama"
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == BYTE_VOCAB_SIZE
    assert reader.tensors and all(t.tensor_type == GGMLQuantizationType.F32 for t in reader.tensors)
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert list(embd.shape) == [64, BYTE_VOCAB_SIZE]  # ggml order: ne = [n_embd, n_vocab]
    with _load(path) as m:
        desc = ctypes.create_string_buffer(128)
        llama_cpp.llama_model_desc(m.model, desc, len(desc))
        assert b"F32" in desc.value
        assert llama_cpp.llama_vocab_n_tokens(m.vocab) == BYTE_VOCAB_SIZE


def test_fast_kv_reader_matches_gguf_reader(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "tiny.gguf")
    ours = {kv.key: kv.value for kv in _read_kv(path)}
    reader = GGUFReader(path)
    assert set(ours) == {k for k in reader.fields if not k.startswith("GGUF.")}
    assert [t.decode() for t in ours["tokenizer.ggml.tokens"]] == reader.fields[
        "tokenizer.ggml.tokens"
    ].contents()
    assert ours["tokenizer.ggml.scores"] == reader.fields["tokenizer.ggml.scores"].contents()
    assert ours["tokenizer.chat_template"].decode() == CHATML_TEMPLATE
    assert ours["llama.embedding_length"] == 64


def test_tokenizes_text_and_chatml_specials(tmp_path: Path) -> None:
    with _load(write_tiny_llama(tmp_path / "tiny.gguf")) as m:
        tokens = _tokenize(m.vocab, "hello world", parse_special=False)
        assert tokens[0] == BOS_ID
        assert b"".join(_piece(m.vocab, t) for t in tokens[1:]) == b" hello world"
        assert len(tokens) == 3  # "▁hello" and "▁world" are single pieces

        prompt = _chatml_prompt()
        special = _tokenize(m.vocab, prompt, parse_special=True)
        assert special[:2] == [BOS_ID, IM_START_ID]
        assert special.count(IM_START_ID) == 2 and special.count(IM_END_ID) == 1
        plain = _tokenize(m.vocab, prompt, parse_special=False)
        assert IM_START_ID not in plain and IM_END_ID not in plain


def test_end_of_generation_tokens(tmp_path: Path) -> None:
    with _load(write_tiny_llama(tmp_path / "tiny.gguf")) as m:
        assert llama_cpp.llama_vocab_is_eog(m.vocab, IM_END_ID)
        assert llama_cpp.llama_vocab_is_eog(m.vocab, EOS_ID)
        assert not llama_cpp.llama_vocab_is_eog(m.vocab, BOS_ID)
        assert not llama_cpp.llama_vocab_is_eog(m.vocab, IM_START_ID)
        assert llama_cpp.llama_vocab_eos(m.vocab) == EOS_ID
        assert llama_cpp.llama_vocab_eot(m.vocab) == IM_END_ID


def test_greedy_generation_is_deterministic_and_runs_to_max_tokens(tmp_path: Path) -> None:
    with _load(write_tiny_llama(tmp_path / "tiny.gguf")) as m:
        for prompt in (
            _tokenize(m.vocab, "hello world", parse_special=False),
            _tokenize(m.vocab, _chatml_prompt(), parse_special=True),
        ):
            first = _greedy(m, prompt, 20)
            assert first == _greedy(m, prompt, 20)
            assert len(first) == 20 and not any(llama_cpp.llama_vocab_is_eog(m.vocab, t) for t in first)
            assert len(set(first)) > 3  # varied output, not one repeated token
        text = b"".join(_piece(m.vocab, t) for t in first)
    with pytest.raises(UnicodeDecodeError):
        text.decode("utf-8")  # byte tokens: generated text is not valid UTF-8 as a whole


def test_other_seed_gives_other_output(tmp_path: Path) -> None:
    outputs = []
    for seed in (0, 1):
        with _load(write_tiny_llama(tmp_path / f"tiny{seed}.gguf", seed=seed)) as m:
            outputs.append(_greedy(m, _tokenize(m.vocab, "hello", parse_special=False), 10))
    assert outputs[0] != outputs[1]


def test_eos_bias_controls_stopping(tmp_path: Path) -> None:
    with _load(write_tiny_llama(tmp_path / "stop.gguf", eos_bias=50.0)) as m:
        prompt = _tokenize(m.vocab, "hello world", parse_special=False)
        out = _greedy(m, prompt, 20)
        assert len(out) == 1 and llama_cpp.llama_vocab_is_eog(m.vocab, out[0])
    with _load(write_tiny_llama(tmp_path / "never.gguf", eos_bias=-50.0)) as m:
        _decode(m.ctx, prompt)
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(m.ctx, -1), shape=(BYTE_VOCAB_SIZE,))
        assert logits[EOS_ID] < -40.0 and logits[IM_END_ID] < -40.0
        assert logits.max() > 0.0


def test_copied_vocab_matches_smollm2_tokenizer(tmp_path: Path) -> None:
    try:
        source = smollm2_gguf_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    path = write_tiny_llama_with_vocab_of(tmp_path / "tiny-smol.gguf", source, eos_bias=50.0)
    prompt = "<|im_start|>user\nHello there, world!<|im_end|>\n<|im_start|>assistant\n"
    with _load(path) as tiny, _load(source) as real:
        n_vocab = llama_cpp.llama_vocab_n_tokens(real.vocab)
        assert llama_cpp.llama_vocab_n_tokens(tiny.vocab) == n_vocab
        for text in ("hello world", prompt):
            assert _tokenize(tiny.vocab, text, parse_special=True) == _tokenize(
                real.vocab, text, parse_special=True
            )
        template = llama_cpp.llama_model_chat_template(tiny.model, None)
        assert template == llama_cpp.llama_model_chat_template(real.model, None)
        out = _greedy(tiny, _tokenize(tiny.vocab, prompt, parse_special=True), 5)
        assert len(out) == 1 and llama_cpp.llama_vocab_is_eog(tiny.vocab, out[0])
