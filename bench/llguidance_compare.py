"""Our JSON Schema -> GBNF converter + llama.cpp's grammar sampler against llguidance (measurement only).

`python -m bench.llguidance_compare` (needs the test-only `llguidance` package; Gemma 3 270M's 262k vocab):

1. coverage: which schemas of the test sets (tests/unit/json_schema_cases.py, tests/integration/
   structured_cases.py) each engine compiles;
2. per-token cost over the tokens of valid documents: llama.cpp's grammar checking one sampled token (the
   common, accepted path), llama.cpp masking the whole vocabulary (what a rejected token costs), and
   llguidance computing the whole-vocabulary mask;
3. the budget tracker's per-token cost (shared/gbnf_automaton.py: advance + shortest-completion length).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import time
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from router.structured import schema_to_gbnf
from router.structured.json_schema import UnsupportedSchemaError
from shared.gbnf_automaton import Automaton
from shared.vocab import Vocab
from tests.integration.structured_cases import SCHEMAS
from tests.unit.json_schema_cases import CASES

_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


def coverage(schemas: list[tuple[str, Any, bool]]) -> None:
    import llguidance

    ours = theirs = 0
    differ: list[str] = []
    for name, schema, strict in schemas:
        try:
            schema_to_gbnf(schema, strict=strict)
            ok_ours = True
        except (UnsupportedSchemaError, ValueError):
            ok_ours = False
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
        is_error, _ = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
        ok_theirs = not is_error
        ours += ok_ours
        theirs += ok_theirs
        if ok_ours != ok_theirs:
            differ.append(f"{name} (ours {ok_ours}, llguidance {ok_theirs})")
    print(f"coverage: {len(schemas)} schemas; ours {ours}, llguidance {theirs}")
    for line in differ:
        print(f"  differs: {line}")


class LlamaGrammar:
    def __init__(self, vocab: Any, n_vocab: int, grammar: str) -> None:
        self.vocab, self.n_vocab = vocab, n_vocab
        self.sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
        self.one = np.zeros(1, dtype=_DATA)
        self.one_array = llama_cpp.llama_token_data_array(
            self.one.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data)), 1, -1, False
        )
        self.all = np.zeros(n_vocab, dtype=_DATA)
        self.all_array = llama_cpp.llama_token_data_array(
            self.all.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data)), n_vocab, -1, False
        )

    def check_one(self, token: int) -> float:
        self.one[0] = (token, 0.0, 0.0)
        started = time.perf_counter()
        llama_cpp.llama_sampler_apply(self.sampler, ctypes.byref(self.one_array))
        return time.perf_counter() - started

    def mask_all(self) -> float:
        self.all["id"] = np.arange(self.n_vocab, dtype=np.int32)
        self.all["logit"] = 0.0
        self.all_array.size, self.all_array.selected, self.all_array.sorted = self.n_vocab, -1, False
        started = time.perf_counter()
        llama_cpp.llama_sampler_apply(self.sampler, ctypes.byref(self.all_array))
        return time.perf_counter() - started

    def accept(self, token: int) -> None:
        llama_cpp.llama_sampler_accept(self.sampler, token)

    def close(self) -> None:
        llama_cpp.llama_sampler_free(self.sampler)


def per_token(vocab: Vocab, documents: list[tuple[str, Any, bool, str]]) -> None:
    import llguidance
    import llguidance.llamacpp

    raw = vocab._vocab
    tokenizer = llguidance.llamacpp.lltokenizer_from_vocab(raw)
    one: list[float] = []
    full: list[float] = []
    guided: list[float] = []
    tracked: list[float] = []
    for _, schema, strict, text in documents:
        grammar = schema_to_gbnf(schema, strict=strict)
        tokens = vocab.tokenize(text, add_special=False, parse_special=False)
        llama = LlamaGrammar(raw, vocab.n_vocab, grammar)
        matcher = llguidance.LLMatcher(tokenizer, llguidance.LLMatcher.grammar_from_json_schema(schema))
        automaton = Automaton(grammar)
        state = automaton.initial
        for token in tokens:
            one.append(llama.check_one(token))
            full.append(llama.mask_all())
            llama.accept(token)
            started = time.perf_counter()
            matcher.compute_bitmask()
            guided.append(time.perf_counter() - started)
            if not matcher.consume_token(token):
                break
            started = time.perf_counter()
            state = automaton.advance(state, vocab.piece(token))
            automaton.completion_cost(state)
            tracked.append(time.perf_counter() - started)
        llama.close()

    def ms(values: list[float]) -> str:
        return f"{1000 * float(np.mean(values)):.3f} ms mean, {1000 * float(np.median(values)):.3f} ms median"

    print(f"per token over {len(one)} tokens of {len(documents)} valid documents (Gemma 3, 262k vocab):")
    print(f"  llama.cpp grammar, check the sampled token : {ms(one)}")
    print(f"  llama.cpp grammar, mask the whole vocab    : {ms(full)}  (a rejected token's cost)")
    print(f"  llguidance, whole-vocab mask               : {ms(guided)}")
    print(f"  budget tracking (advance + shortest length): {ms(tracked)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=".models/gemma-3-270m-q4_k_m.gguf")
    args = parser.parse_args(argv)
    try:
        import llguidance  # noqa: F401
    except ImportError:
        print("llguidance is not installed (pip install llguidance): skipped")
        return
    schemas = [(name, schema, strict) for name, schema, strict, _, _ in CASES]
    schemas += [(name, schema, True) for name, _, schema in SCHEMAS]
    coverage(schemas)
    documents = [
        (name, schema, strict, json.dumps(value, ensure_ascii=False))
        for name, schema, strict, valid, _ in CASES
        for value in valid[:1]
    ]
    vocab = Vocab.load(Path(args.model))
    try:
        per_token(vocab, documents)
    finally:
        vocab.close()


if __name__ == "__main__":
    main()
