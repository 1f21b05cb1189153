"""Grammar-constrained sampling in the worker: the check-first shortcut, lazy triggers, and their guard."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import pytest

from shared.protocol import SamplingParams
from shared.vocab import Vocab, init_backend
from tests.unit.gbnf_match import matches
from worker.sampling import SamplerChain, SamplerInitError, _Grammar, utf8_tail

GRAMMAR = (
    'root ::= "{" ws "\\"n\\":" ws [0-9]{1,3} ws "," ws "\\"s\\":" ws "\\"" [a-z ]{0,12} "\\"" ws "}"\n'
    "ws ::= [ \\n]?\n"
)


class Decoder:
    """A tiny model with one sequence: prompt, then one token at a time."""

    def __init__(self, path: Path) -> None:
        init_backend()
        self.model = llama_cpp.llama_model_load_from_file(
            str(path).encode(), llama_cpp.llama_model_default_params()
        )
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_threads, params.n_threads_batch = 512, 1, 1
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        self.vocab = Vocab(self.model)

    def close(self) -> None:
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)

    def decode(self, tokens: list[int]) -> None:
        array = (llama_cpp.llama_token * len(tokens))(*tokens)
        assert llama_cpp.llama_decode(self.ctx, llama_cpp.llama_batch_get_one(array, len(tokens))) == 0

    def run(self, prompt: str, sample: Any, steps: int = 40) -> list[int]:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        self.decode(self.vocab.tokenize(prompt, add_special=True, parse_special=True))
        out: list[int] = []
        for _ in range(steps):
            token = sample()
            if token in self.vocab.eog_ids:
                break
            out.append(token)
            self.decode([token])
        return out


@pytest.fixture(scope="module")
def decoder(tiny_llama_gguf: Path) -> Iterator[Decoder]:
    running = Decoder(tiny_llama_gguf)
    yield running
    running.close()


def text_of(decoder: Decoder, tokens: list[int]) -> str:
    return decoder.vocab.detokenize(tokens)


def test_greedy_with_shortcut_equals_full_masking(decoder: Decoder) -> None:
    vocab_ptr = decoder.vocab._vocab
    greedy = SamplingParams(temperature=0.0)
    ours = SamplerChain(vocab_ptr, decoder.vocab.n_vocab, greedy, GRAMMAR)
    got = decoder.run("hello", lambda: ours.sample(decoder.ctx, -1))
    ours.close()
    # llama.cpp's own chain with the grammar masking every candidate, every step
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    llama_cpp.llama_sampler_chain_add(
        chain, llama_cpp.llama_sampler_init_grammar(vocab_ptr, GRAMMAR.encode(), b"root")
    )
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
    reference = decoder.run("hello", lambda: int(llama_cpp.llama_sampler_sample(chain, decoder.ctx, -1)))
    llama_cpp.llama_sampler_free(chain)
    assert got == reference
    assert matches(GRAMMAR, text_of(decoder, got))


def test_seeded_sampling_is_valid_and_repeatable(decoder: Decoder) -> None:
    vocab_ptr = decoder.vocab._vocab
    outputs = []
    for seed in (1, 1, 2):
        chain = SamplerChain(
            vocab_ptr, decoder.vocab.n_vocab, SamplingParams(temperature=1.0, seed=seed), GRAMMAR
        )
        outputs.append(decoder.run("hello", lambda chain=chain: chain.sample(decoder.ctx, -1)))
        chain.close()
    assert outputs[0] == outputs[1]
    for tokens in outputs:
        assert matches(GRAMMAR, text_of(decoder, tokens))


def test_lazy_grammar_is_free_until_triggered(decoder: Decoder) -> None:
    lazy = 'root ::= "ab" [0-9]{2}\n'
    vocab_ptr = decoder.vocab._vocab
    params = SamplingParams(temperature=0.0, logit_bias=[])
    chain = SamplerChain(vocab_ptr, decoder.vocab.n_vocab, params, lazy, grammar_triggers=["(ab)"])
    assert not chain.constrained
    piece = {decoder.vocab.piece(t): t for t in range(decoder.vocab.n_vocab)}
    grammar = chain._grammar
    assert grammar is not None
    for (
        char
    ) in "xyab":  # free text, then the trigger (greedy without penalties: only the grammar keeps state)
        grammar.accept(piece[char.encode()])
    assert chain.constrained
    tokens = decoder.run("hello", lambda: chain.sample(decoder.ctx, -1), steps=4)
    chain.close()
    assert text_of(decoder, tokens[:2]).isdigit()


def test_bad_grammars_and_triggers_are_refused(decoder: Decoder) -> None:
    vocab_ptr = decoder.vocab._vocab
    with pytest.raises(SamplerInitError):
        SamplerChain(vocab_ptr, decoder.vocab.n_vocab, SamplingParams(), "root ::= undefined-rule")
    for trigger in ["(?P<x>a)", "a{", "(?=a)", ""]:
        with pytest.raises(SamplerInitError):
            SamplerChain(
                vocab_ptr, decoder.vocab.n_vocab, SamplingParams(), 'root ::= "a"', grammar_triggers=[trigger]
            )


def test_trigger_replay_the_grammar_rejects_is_refused(smollm2_gguf: Path) -> None:
    """A token that completes the marker and carries text the grammar rejects would abort llama.cpp."""
    vocab = Vocab.load(smollm2_gguf)
    grammar = _Grammar(vocab._vocab, 'root ::= "<tool_call>" "{" [a-z]+ "}"\n', ["(<tool_call>)"])
    ids = vocab.tokenize("<tool_call", add_special=False, parse_special=False)
    for token in ids:
        assert grammar.safe(token)
        grammar.accept(token)
    pieces = {vocab.piece(t): t for t in range(vocab.n_vocab)}
    bad = next(t for p, t in pieces.items() if p.startswith(b">") and len(p) > 1 and p[1:2] not in b"{")
    good = pieces[b">"]
    assert grammar.awaiting
    assert not grammar.safe(bad)
    assert grammar.safe(good)
    if b">{" in pieces:
        assert grammar.safe(pieces[b">{"])
    grammar.accept(good)
    assert not grammar.awaiting
    assert not grammar.safe(pieces[b"x"])
    grammar.close()


@pytest.mark.parametrize(
    ("data", "tail"),
    [
        (b"", b""),
        ("é€😀".encode(), b""),
        (b"\xc3", b"\xc3"),
        (b"\xed\x9f", b"\xed\x9f"),
        (b"\xed\xba", None),  # a surrogate
        (b"\xe0\x80", None),  # overlong
        (b"\xf4\x90", None),  # beyond U+10FFFF
        (b"\x80", None),
        (b"a\xc3x", None),
    ],
)
def test_utf8_is_checked_byte_by_byte(data: bytes, tail: bytes | None) -> None:
    assert utf8_tail(data) == tail
