"""Per-sequence llama.cpp sampler chains, grammar-constrained sampling, and log-probabilities.

Without a grammar the chain runs in C (`llama_sampler_sample` applies it to one batch row and accepts
the token): one foreign call per sequence per step. Seeds are per request: each sequence owns its `dist`
sampler state, so a seeded request draws the same tokens whatever else is batched beside it.

With a grammar, masking the whole vocabulary costs ~20 ms a token on a 262k vocab (Gemma 3), more than
the decode. So, as llama.cpp's common sampler does, the chain first samples without the grammar and the
grammar checks only the chosen token (a one-candidate array). Only when it refuses: a sampling request
draws again from the same distribution until a draw is allowed (rejection sampling, exact for the
constrained distribution), and greedy (or sampling after 64 refused draws) lets the grammar mask the
best 1024 candidates, then the whole vocabulary only if that cannot decide. Greedy output is exactly
that of full masking. Measured on Gemma 3 270M with a JSON schema: ~1 ms a token greedy, ~5 ms at
temperature 1, against ~20 ms for full masking. A token is accepted into the grammar only after the
grammar allowed it: llama.cpp aborts the process when a rejected token is accepted. Tokens that would
make the constrained text invalid UTF-8 are refused too (llama.cpp's grammar does not check UTF-8
continuation bytes, so byte-fallback tokens could otherwise produce replacement characters).

Lazy grammars (`grammar_triggers`, e.g. a tool-call marker) stay inactive until a trigger regex matches
the generated text; llama.cpp then replays the text from the match into the grammar. That replay could
include characters the grammar rejects (a token like `>.` completing `<tool_call>`), which would abort
the process, so the trigger is tracked here too and a token whose replay the grammar would reject is
refused like any other rejected token.
"""

from __future__ import annotations

import ctypes
import logging
import random
import re

import llama_cpp
import numpy as np
import numpy.typing as npt

from shared.protocol import SamplingParams, TokenLogprob
from worker.budget import BudgetCloser, new_closer
from worker.step import SamplerInitError

log = logging.getLogger(__name__)

# Same layout as llama_token_data {int32 id; float logit; float p}.
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
_MAX_RESAMPLES = 64  # refusals after grammar masking (invalid UTF-8, trigger replays) per token
_SHORTLIST = 1024  # best candidates the grammar masks first after a rejection
_DRAWS = 64  # sampling: extra draws from the unconstrained distribution before masking
_TAIL_RATIO = 1e-3  # sampling: mass outside the shortlist must be this small against the allowed mass
# A trigger regex must mean the same to Python's `re` and to C++ std::regex (ECMAScript) — and an
# invalid ECMAScript regex aborts the process — so only a common subset is allowed.
_TRIGGER_SYNTAX = re.compile(r"(?:\\[sSdDwWnrt.^$|()*+?\[\]{}\\/]|\(\?:|\((?!\?)|[^\\({}])*")


class _Candidates:
    """A reusable llama_token_data_array over a whole vocabulary (refilled from logits per use)."""

    def __init__(self, n_vocab: int) -> None:
        self.n_vocab = n_vocab
        self.data = np.zeros(n_vocab, dtype=_TOKEN_DATA)
        self._ids = np.arange(n_vocab, dtype=np.int32)
        pointer = self.data.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data))
        self.array = llama_cpp.llama_token_data_array(pointer, n_vocab, -1, False)
        self.ref = ctypes.pointer(self.array)

    def fill(self, logits: npt.NDArray[np.float32]) -> None:
        self.data["id"] = self._ids
        self.data["logit"] = logits
        self.data["p"] = 0.0
        self.array.size = self.n_vocab
        self.array.selected = -1
        self.array.sorted = False

    def selected(self) -> tuple[int, float]:
        index = int(self.array.selected)
        if not 0 <= index < int(self.array.size):
            return -1, float("-inf")
        entry = self.data[index]
        return int(entry["id"]), float(entry["logit"])


_scratch: dict[int, _Candidates] = {}


def _candidates(n_vocab: int) -> _Candidates:
    """One scratch array per vocabulary size: the engine samples its sequences one at a time."""
    found = _scratch.get(n_vocab)
    if found is None:
        found = _scratch[n_vocab] = _Candidates(n_vocab)
    return found


_piece_indexes: dict[int, tuple[dict[bytes, int], int]] = {}


def _piece_index(vocab: llama_cpp.llama_vocab_p) -> tuple[dict[bytes, int], int]:
    """Every non-empty piece (control tokens' text included) -> a token id, and the longest length.

    Built once per vocabulary, the first time a trigger replay cannot be tokenized back exactly."""
    key = ctypes.cast(vocab, ctypes.c_void_p).value or 0
    found = _piece_indexes.get(key)
    if found is None:
        pieces: dict[bytes, int] = {}
        buf = ctypes.create_string_buffer(256)
        for token in range(int(llama_cpp.llama_vocab_n_tokens(vocab))):
            n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, True)
            if n > 0:
                pieces.setdefault(buf.raw[:n], token)
        found = _piece_indexes[key] = (pieces, max((len(p) for p in pieces), default=1))
    return found


# Second-byte ranges by lead byte (RFC 3629: no overlongs, no surrogates, nothing past U+10FFFF).
_UTF8_SECOND = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}


def _utf8_length(lead: int) -> int:
    if lead < 0x80:
        return 1
    if 0xC2 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF4:
        return 4
    return 0


def utf8_tail(data: bytes) -> bytes | None:
    """The unfinished character at the end of `data`, or None when `data` is not valid UTF-8 so far.

    Checks every byte eagerly (Python's incremental decoder only reports a bad continuation byte
    once the character is complete)."""
    at = 0
    while at < len(data):
        size = _utf8_length(data[at])
        if size == 0:
            return None
        for offset in range(1, size):
            if at + offset == len(data):
                return data[at:]
            lo, hi = _UTF8_SECOND.get(data[at], (0x80, 0xBF)) if offset == 1 else (0x80, 0xBF)
            if not lo <= data[at + offset] <= hi:
                return None
        at += size
    return b""


def check_trigger(pattern: str) -> re.Pattern[bytes]:
    """Compiles a lazy-grammar trigger regex, refusing syntax outside the Python/ECMAScript subset."""
    if not pattern or _TRIGGER_SYNTAX.fullmatch(pattern) is None:
        raise SamplerInitError(f"unsupported grammar trigger pattern {pattern!r}")
    try:
        return re.compile(pattern.encode("utf-8"))
    except re.error as error:
        raise SamplerInitError(f"invalid grammar trigger pattern {pattern!r}: {error}") from error


def _trigger_start(patterns: list[re.Pattern[bytes]], text: bytes) -> int | None:
    """Where llama.cpp starts the grammar for `text`: the first non-empty group of the first match."""
    for pattern in patterns:
        match = pattern.search(text)
        if match is None:
            continue
        for group in range(1, (pattern.groups or 0) + 1):
            if match.start(group) >= 0 and match.end(group) > match.start(group):
                return match.start(group)
        return match.start()
    return None


class _Grammar:
    """A (possibly lazy) llama.cpp grammar sampler plus what it takes to use it without aborting."""

    def __init__(self, vocab: llama_cpp.llama_vocab_p, grammar: str, triggers: list[str]) -> None:
        self._vocab = vocab
        self._text = grammar.encode("utf-8")
        self._patterns = [check_trigger(t) for t in triggers]
        self.awaiting = bool(triggers)
        self._buffer = b""
        self._utf8 = b""  # an unfinished UTF-8 character at the end of the constrained text
        self._single_data = np.zeros(1, dtype=_TOKEN_DATA)
        pointer = self._single_data.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data))
        self._single = llama_cpp.llama_token_data_array(pointer, 1, -1, False)
        if triggers:
            encoded = [p.encode("utf-8") for p in triggers]
            patterns = (ctypes.c_char_p * len(encoded))(*encoded)
            self.sampler = llama_cpp.llama_sampler_init_grammar_lazy_patterns(
                vocab, self._text, b"root", patterns, len(encoded), None, 0
            )
        else:
            self.sampler = llama_cpp.llama_sampler_init_grammar(vocab, self._text, b"root")
        if not self.sampler:
            raise SamplerInitError("the grammar could not be parsed by llama.cpp")

    def close(self) -> None:
        if self.sampler:
            llama_cpp.llama_sampler_free(self.sampler)
            self.sampler = None

    def piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, True)
        return buf.raw[: max(n, 0)]

    def allows(self, token: int, sampler: llama_cpp.llama_sampler_p | None = None) -> bool:
        """Whether the grammar accepts `token` next (always true while a lazy grammar waits)."""
        self._single_data[0] = (token, 0.0, 0.0)
        self._single.size = 1
        self._single.selected = -1
        self._single.sorted = False
        llama_cpp.llama_sampler_apply(sampler or self.sampler, ctypes.byref(self._single))
        return bool(np.isfinite(self._single_data[0]["logit"]))

    def _utf8_continues(self, token: int) -> bool:
        """Whether the token keeps the constrained text valid UTF-8 (llama.cpp's grammar does not
        check continuation bytes, so byte-fallback tokens could otherwise form invalid text)."""
        if llama_cpp.llama_vocab_is_eog(self._vocab, token):
            return not self._utf8
        return utf8_tail(self._utf8 + self.piece(token)) is not None

    def safe(self, token: int) -> bool:
        """Allowed now, and (lazy grammar) any replay its trigger causes is allowed too."""
        if not self.allows(token):
            return False
        if not self.awaiting:
            return self._utf8_continues(token)
        text = self._buffer + self.piece(token)
        start = _trigger_start(self._patterns, text)
        if start is None:
            return True
        return utf8_tail(text[start:]) is not None and self._accepts_prefix(text[start:])

    def spell(self, text: bytes) -> list[int] | None:
        """Token ids whose pieces concatenate to exactly `text` (None if none found).

        The tokenizer usually gives them; vocabularies that add a leading space (SentencePiece) do
        not, so then the longest pieces are matched greedily."""
        n_max = len(text) + 8
        ids = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(self._vocab, text, len(text), ids, n_max, False, True)
        if n >= 0 and b"".join(self.piece(t) for t in ids[:n]) == text:
            return list(ids[:n])
        pieces, longest = _piece_index(self._vocab)
        out: list[int] = []
        at = 0
        while at < len(text):
            for size in range(min(longest, len(text) - at), 0, -1):
                token = pieces.get(text[at : at + size])
                if token is not None:
                    out.append(token)
                    at += size
                    break
            else:
                return None
        # The index is cached by address: check against the live vocabulary.
        return out if b"".join(self.piece(t) for t in out) == text else None

    def _accepts_prefix(self, text: bytes) -> bool:
        """Whether `text` is a valid start of the grammar, checked on a fresh non-lazy copy."""
        tokens = self.spell(text)
        if tokens is None:
            return False
        probe = llama_cpp.llama_sampler_init_grammar(self._vocab, self._text, b"root")
        if not probe:
            return False
        try:
            for token in tokens:
                if not self.allows(token, probe):
                    return False
                llama_cpp.llama_sampler_accept(probe, token)
            return True
        finally:
            llama_cpp.llama_sampler_free(probe)

    def accept(self, token: int) -> None:
        """Accepts a token that `safe` allowed."""
        if self.awaiting:
            self._buffer += self.piece(token)
            start = _trigger_start(self._patterns, self._buffer)
            if start is not None:
                self.awaiting = False
                self._utf8 = utf8_tail(self._buffer[start:]) or b""
                self._buffer = b""
        elif not llama_cpp.llama_vocab_is_eog(self._vocab, token):
            self._utf8 = utf8_tail(self._utf8 + self.piece(token)) or b""
        llama_cpp.llama_sampler_accept(self.sampler, token)


class _Chain:
    """A llama.cpp sampler chain being built; `close()` frees it (idempotent)."""

    def __init__(self) -> None:
        params = llama_cpp.llama_sampler_chain_default_params()
        params.no_perf = True
        self.sampler = llama_cpp.llama_sampler_chain_init(params)

    def add(self, sampler: llama_cpp.llama_sampler_p) -> None:
        if not sampler:
            raise SamplerInitError("llama.cpp refused a sampler")
        llama_cpp.llama_sampler_chain_add(self.sampler, sampler)

    def close(self) -> None:
        if self.sampler:
            llama_cpp.llama_sampler_free(self.sampler)
            self.sampler = None


def _add_logit_samplers(chain: _Chain, n_vocab: int, params: SamplingParams) -> None:
    """Samplers that change logits in place, never reordering or dropping candidates."""
    if params.logit_bias:
        biases = (llama_cpp.llama_logit_bias * len(params.logit_bias))()
        for i, (token, bias) in enumerate(params.logit_bias):
            biases[i].token = token  # type: ignore[assignment]
            biases[i].bias = bias
        chain.add(llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(params.logit_bias), biases))
    if params.repeat_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0:
        chain.add(
            llama_cpp.llama_sampler_init_penalties(
                n_vocab,
                params.penalty_last_n,
                params.repeat_penalty,
                params.frequency_penalty,
                params.presence_penalty,
            )
        )


def _add_selectors(chain: _Chain, params: SamplingParams, seed_offset: int) -> None:
    """Truncation, temperature and the final pick (greedy or a seeded draw)."""
    if params.temperature <= 0.0:
        chain.add(llama_cpp.llama_sampler_init_greedy())
        return
    if params.top_k > 0:
        chain.add(llama_cpp.llama_sampler_init_top_k(params.top_k))
    if params.typical_p < 1.0:
        chain.add(llama_cpp.llama_sampler_init_typical(params.typical_p, 1))
    if params.top_p < 1.0:
        chain.add(llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
    if params.min_p > 0.0:
        chain.add(llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
    chain.add(llama_cpp.llama_sampler_init_temp(params.temperature))
    seed = params.seed + seed_offset if params.seed is not None else random.getrandbits(32)
    chain.add(llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))


class SamplerChain:
    """One sequence's samplers; `close()` frees them (idempotent).

    Without a grammar: one C chain. With one: a `logits` chain (bias, penalties), a `pick` chain
    (truncation, temperature, greedy or draw) and the grammar sampler, so the grammar can be applied
    between the two to as few candidates as possible.
    """

    def __init__(
        self,
        vocab: llama_cpp.llama_vocab_p,
        n_vocab: int,
        params: SamplingParams,
        grammar: str | None = None,
        seed_offset: int = 0,
        grammar_triggers: list[str] | None = None,
        budget: int = 0,
        repeat_limit: int = 0,
    ) -> None:
        """`budget` > 0: the tokens a non-lazy grammar's document must end within (worker/budget.py)."""
        self._vocab = vocab
        self._n_vocab = n_vocab
        self._greedy = params.temperature <= 0.0
        seed = params.seed + seed_offset if params.seed is not None else random.getrandbits(32)
        self._rng = np.random.default_rng(seed & 0xFFFFFFFF)
        self._grammar: _Grammar | None = None
        self._closer: BudgetCloser | None = None
        self.budget_closed = False
        # Greedy with nothing that changes logits: the token is the first best logit, and the chain keeps
        # no state, so a runner may pick it itself (one argmax) instead of calling llama_sampler_sample.
        self.plain_greedy = (
            self._greedy
            and not grammar
            and not params.logit_bias
            and params.repeat_penalty == 1.0
            and params.presence_penalty == 0.0
            and params.frequency_penalty == 0.0
        )
        self._logits = _Chain()
        self._pick: _Chain | None = None
        try:
            _add_logit_samplers(self._logits, n_vocab, params)
            if grammar:
                self._grammar = _Grammar(vocab, grammar, list(grammar_triggers or []))
                eos = int(llama_cpp.llama_vocab_eos(vocab))
                lazy = bool(grammar_triggers)
                spell = self._grammar.spell
                self._closer = new_closer(grammar, lazy, budget > 0, spell, eos, budget, repeat_limit)
                self._pick = _Chain()
                _add_selectors(self._pick, params, seed_offset)
            else:
                _add_selectors(self._logits, params, seed_offset)
        except Exception:
            self.close()
            raise

    def sample(self, ctx: llama_cpp.llama_context_p, row: int) -> int:
        """Samples from batch row `row` and accepts the token into the chain's (and grammar's) state."""
        grammar, pick = self._grammar, self._pick
        if grammar is None or pick is None:
            return int(llama_cpp.llama_sampler_sample(self._logits.sampler, ctx, row))
        closer = self._closer
        if closer is not None:
            forced = closer.forced()
            if forced is not None:
                if grammar.safe(forced):
                    return self._take(grammar, pick, forced)
                closer.abandon()
        pointer = llama_cpp.llama_get_logits_ith(ctx, row)
        logits = np.ctypeslib.as_array(pointer, shape=(self._n_vocab,))
        cand = _candidates(self._n_vocab)
        cand.fill(logits)
        llama_cpp.llama_sampler_apply(self._logits.sampler, cand.ref)
        adjusted = cand.data["logit"].copy()  # after bias and penalties; ids are still indices
        llama_cpp.llama_sampler_apply(pick.sampler, cand.ref)
        token, _ = cand.selected()
        if token < 0 or not grammar.safe(token):
            token = self._resample(grammar, pick, cand, adjusted)
            if token < 0:
                return self._dead_end()
        if closer is not None and not self._eog(token) and not closer.permits(grammar.piece(token)):
            steered = closer.steer()  # the token would leave no room to finish the document
            if steered is not None and grammar.safe(steered):
                token = steered
            elif steered is not None:
                closer.abandon()
        return self._take(grammar, pick, token)

    def _eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def _take(self, grammar: _Grammar, pick: _Chain, token: int) -> int:
        """Accepts `token` into the grammar, the chains and the budget tracking."""
        grammar.accept(token)
        llama_cpp.llama_sampler_accept(self._logits.sampler, token)
        llama_cpp.llama_sampler_accept(pick.sampler, token)
        closer = self._closer
        if closer is not None:
            closer.accept(token, grammar.piece(token), self._eog(token))
            self.budget_closed = closer.closed
        return token

    def _resample(
        self, grammar: _Grammar, pick: _Chain, cand: _Candidates, adjusted: npt.NDArray[np.float32]
    ) -> int:
        """A token the grammar allows, after the unconstrained pick was refused; -1 if none.

        Sampling first draws more tokens from the same distribution and keeps the first allowed one:
        rejection sampling, exact for the grammar-constrained distribution and cheap while the allowed
        tokens carry some mass. Then (and for greedy at once) the grammar masks the candidates.
        """
        refused: set[int] = set()
        size = int(cand.array.size)
        if not self._greedy and size > 1:
            probs = cand.data["p"][:size].astype(np.float64)
            total = float(probs.sum())
            if np.isfinite(total) and total > 0:
                ids = cand.data["id"][:size].copy()
                for index in self._rng.choice(size, size=_DRAWS, p=probs / total):
                    token = int(ids[index])
                    if token in refused:
                        continue
                    if grammar.safe(token):
                        return token
                    refused.add(token)
        for _ in range(_MAX_RESAMPLES):
            if refused:
                adjusted[list(refused)] = -np.inf
            token = self._constrained_pick(grammar, pick, adjusted)
            if token < 0 or grammar.safe(token):
                return token
            refused.add(token)  # the grammar allows it, but not its UTF-8 or its trigger replay
        return -1

    def _constrained_pick(self, grammar: _Grammar, pick: _Chain, adjusted: npt.NDArray[np.float32]) -> int:
        """Samples among the tokens the grammar allows; -1 when it allows none.

        The grammar first masks only the best `_SHORTLIST` candidates. Greedy: if one is allowed, the
        best of them is the best allowed token overall. Sampling: used when what lies outside the
        shortlist weighs under `_TAIL_RATIO` of the allowed mass, else the whole vocabulary is masked.
        """
        n = self._n_vocab
        short = min(_SHORTLIST, n)
        top = np.argpartition(adjusted, n - short)[n - short :]
        top = top[np.lexsort((top, -adjusted[top]))]
        small = _candidates(short) if short < n else None
        if small is not None:
            small.data["id"] = top
            small.data["logit"] = adjusted[top]
            small.data["p"] = 0.0
            small.array.size, small.array.selected, small.array.sorted = short, -1, False
            llama_cpp.llama_sampler_apply(grammar.sampler, small.ref)
            allowed = np.isfinite(small.data["logit"][:short])
            if allowed.any() and (self._greedy or self._tail_small(adjusted, top, allowed)):
                llama_cpp.llama_sampler_apply(pick.sampler, small.ref)
                token, logit = small.selected()
                return token if np.isfinite(logit) else -1
        cand = _candidates(n)
        cand.fill(adjusted)
        llama_cpp.llama_sampler_apply(grammar.sampler, cand.ref)
        llama_cpp.llama_sampler_apply(pick.sampler, cand.ref)
        token, logit = cand.selected()
        return token if np.isfinite(logit) else -1

    @staticmethod
    def _tail_small(
        adjusted: npt.NDArray[np.float32], top: npt.NDArray[np.intp], allowed: npt.NDArray[np.bool_]
    ) -> bool:
        finite = adjusted[np.isfinite(adjusted)]
        if finite.size == 0:
            return False
        weights = np.exp(adjusted.astype(np.float64) - float(finite.max()))
        in_top = weights[top]
        tail = float(weights.sum() - in_top.sum())
        return tail <= _TAIL_RATIO * float(in_top[allowed].sum())

    def _dead_end(self) -> int:
        """No token satisfies the grammar (or its triggers): end the sequence with end-of-generation."""
        log.warning("grammar allows no token here; ending the sequence")
        return int(llama_cpp.llama_vocab_eos(self._vocab))

    @property
    def constrained(self) -> bool:
        """True while a grammar constrains the next token (false without one or while it waits)."""
        return self._grammar is not None and not self._grammar.awaiting

    def close(self) -> None:
        if self._grammar is not None:
            self._grammar.close()
            self._grammar = None
        if self._pick is not None:
            self._pick.close()
            self._pick = None
        self._logits.close()


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
