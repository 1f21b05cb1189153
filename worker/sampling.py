"""Per-sequence llama.cpp sampler chains, and log-probabilities for the sequences that ask for them.

The chain runs in C (`llama_sampler_sample` applies it to one batch row and accepts the token), so sampling
costs one foreign call per sequence per step. Seeds are per request: each sequence owns its `dist` sampler
state, so a seeded request draws the same tokens whatever else is batched beside it.
"""

from __future__ import annotations

import random

import llama_cpp
import numpy as np
import numpy.typing as npt

from shared.protocol import SamplingParams, TokenLogprob


class SamplerInitError(ValueError):
    """The request's sampling options (e.g. its grammar) could not be turned into a sampler."""


class SamplerChain:
    """Owns one `llama_sampler` chain; `close()` frees it (idempotent)."""

    def __init__(
        self,
        vocab: llama_cpp.llama_vocab_p,
        n_vocab: int,
        params: SamplingParams,
        grammar: str | None = None,
        seed_offset: int = 0,
    ) -> None:
        chain_params = llama_cpp.llama_sampler_chain_default_params()
        chain_params.no_perf = True
        self._chain = llama_cpp.llama_sampler_chain_init(chain_params)
        try:
            self._build(vocab, n_vocab, params, grammar, seed_offset)
        except Exception:
            self.close()
            raise

    def _add(self, sampler: llama_cpp.llama_sampler_p) -> None:
        if not sampler:
            raise SamplerInitError("llama.cpp refused a sampler")
        llama_cpp.llama_sampler_chain_add(self._chain, sampler)

    def _build(
        self,
        vocab: llama_cpp.llama_vocab_p,
        n_vocab: int,
        params: SamplingParams,
        grammar: str | None,
        seed_offset: int,
    ) -> None:
        if params.logit_bias:
            biases = (llama_cpp.llama_logit_bias * len(params.logit_bias))()
            for i, (token, bias) in enumerate(params.logit_bias):
                biases[i].token = token  # type: ignore[assignment]
                biases[i].bias = bias
            self._add(llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(params.logit_bias), biases))
        if params.repeat_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0:
            self._add(
                llama_cpp.llama_sampler_init_penalties(
                    params.penalty_last_n,
                    params.repeat_penalty,
                    params.frequency_penalty,
                    params.presence_penalty,
                )
            )
        if grammar is not None:
            grammar_sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
            if not grammar_sampler:
                raise SamplerInitError("the grammar could not be parsed by llama.cpp")
            self._add(grammar_sampler)
        if params.temperature <= 0.0:
            self._add(llama_cpp.llama_sampler_init_greedy())
            return
        if params.top_k > 0:
            self._add(llama_cpp.llama_sampler_init_top_k(params.top_k))
        if params.typical_p < 1.0:
            self._add(llama_cpp.llama_sampler_init_typical(params.typical_p, 1))
        if params.top_p < 1.0:
            self._add(llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
        if params.min_p > 0.0:
            self._add(llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
        self._add(llama_cpp.llama_sampler_init_temp(params.temperature))
        seed = params.seed + seed_offset if params.seed is not None else random.getrandbits(32)
        self._add(llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))

    def sample(self, ctx: llama_cpp.llama_context_p, row: int) -> int:
        """Samples from batch row `row` and accepts the token into the chain's state."""
        return int(llama_cpp.llama_sampler_sample(self._chain, ctx, row))

    def accept(self, token: int) -> None:
        llama_cpp.llama_sampler_accept(self._chain, token)

    def close(self) -> None:
        if self._chain:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None


def token_logprob(logits: npt.NDArray[np.float32], token: int, top_n: int) -> TokenLogprob:
    """Log-softmax of the raw logits: the chosen token's logprob and the `top_n` best alternatives."""
    shifted = logits.astype(np.float64) - float(logits.max())
    log_norm = float(np.log(np.exp(shifted).sum()))
    chosen = float(shifted[token] - log_norm)
    top: list[tuple[int, float]] = []
    if top_n > 0:
        best = np.argpartition(-shifted, top_n - 1)[:top_n]
        best = best[np.argsort(-shifted[best], kind="stable")]
        top = [(int(t), float(shifted[t] - log_norm)) for t in best]
    return TokenLogprob(chosen, top)
