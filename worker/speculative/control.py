"""Which sequences speculate, how many tokens each drafts, and the speculation counters.

The scheduler asks `Speculation.propose()` once per step for its decoding sequences and reports each
verification back with `verified()`. This module decides only (no llama.cpp): speculation is off above
`max_batch` running sequences (the batch is compute-bound there and extra rows cost more than they save),
a request can opt out, and each sequence's draft length adapts to its recent acceptance: it grows fourfold
after a fully accepted draft (copying resumes quickly after a divergence) and drops to one more than what was
accepted after a rejection, between 1 and `k_max`.

`DEFAULT_MAX_BATCH` is the cut-off when `draft_model_max_batch_size` is unset. Measured on this CPU with
Gemma 3 270M: a 17-row decode costs about 3x a 1-row decode, so a few sequences' drafts are cheap, but
beyond a handful of rows a decode's cost grows with its rows and wrong drafts cost as much as real work.
GPUs (decode cost nearly flat in the rows) should set a higher limit.
Requests carrying a predicted output draft from it (worker/speculative/prediction.py) instead of the
configured provider.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from worker.speculative.base import Drafter, DraftSeq


@dataclass(slots=True)
class Candidate:
    """A decoding sequence the scheduler could let speculate this step."""

    seq_id: int
    tokens: Sequence[int]  # prompt + generated, the pending token last
    prompt_len: int
    room: int  # most draft tokens its limits allow (max_tokens, context)
    prediction: Sequence[int] | None
    opted_out: bool
    stop_ids: frozenset[int]


@dataclass
class SpecCounters:
    """Totals for /metrics, by provider name."""

    drafted: dict[str, int] = field(default_factory=dict)
    accepted: dict[str, int] = field(default_factory=dict)
    # Index i: drafts verified / accepted at draft position i + 1.
    drafted_at: list[int] = field(default_factory=list)
    accepted_at: list[int] = field(default_factory=list)
    steps: int = 0  # steps in which at least one sequence speculated


DEFAULT_MAX_BATCH = 4


@dataclass(slots=True)
class _SeqState:
    k: int
    provider: str


class Speculation:
    """Per-sequence draft lengths, provider choice and counters for one scheduler."""

    def __init__(
        self,
        drafter: Drafter | None,
        k_max: int,
        max_batch: int | None,
        prediction: Drafter | None = None,
    ) -> None:
        self.drafter = drafter
        self.prediction = prediction
        self.k_max = k_max
        self.max_batch = max_batch
        self.counters = SpecCounters()
        self._state: dict[int, _SeqState] = {}

    def providers(self) -> list[Drafter]:
        return [d for d in (self.drafter, self.prediction) if d is not None]

    def wants(self, predicted: bool, speculative: bool) -> bool:
        """Whether a request (with a prediction or not, opted out or not) could draft at all."""
        return speculative and (predicted or self.drafter is not None)

    def propose(self, candidates: list[Candidate], running: int) -> dict[int, list[int]]:
        """Drafts by sequence id for the candidates that speculate this step (none above `max_batch`)."""
        if self.max_batch is not None and running > self.max_batch:
            return {}
        asks: dict[str, tuple[Drafter, list[DraftSeq]]] = {}
        stops: dict[int, frozenset[int]] = {}
        for cand in candidates:
            drafter = self.prediction if cand.prediction is not None else self.drafter
            if drafter is None or cand.opted_out or cand.room < 1:
                continue
            state = self._state.get(cand.seq_id)
            if state is None:
                state = self._state[cand.seq_id] = _SeqState(self.k_max, drafter.name)
            k = min(state.k, cand.room)
            ask = DraftSeq(cand.seq_id, cand.tokens, k, cand.prompt_len, cand.prediction)
            asks.setdefault(drafter.name, (drafter, []))[1].append(ask)
            stops[cand.seq_id] = cand.stop_ids
        drafts: dict[int, list[int]] = {}
        for drafter, seqs in asks.values():
            for ask, proposed in zip(seqs, drafter.draft(seqs), strict=True):
                kept: list[int] = []
                for token in proposed[: ask.k]:
                    if token in stops[ask.seq_id]:  # a stop token ends the sequence: never draft past one
                        break
                    kept.append(int(token))
                if kept:
                    drafts[ask.seq_id] = kept
        if drafts:
            self.counters.steps += 1
        return drafts

    def verified(self, seq_id: int, drafted: int, accepted: int) -> str:
        """Records one verification; adapts the sequence's draft length; returns the provider's name."""
        state = self._state[seq_id]
        c = self.counters
        c.drafted[state.provider] = c.drafted.get(state.provider, 0) + drafted
        c.accepted[state.provider] = c.accepted.get(state.provider, 0) + accepted
        while len(c.drafted_at) < drafted:
            c.drafted_at.append(0)
            c.accepted_at.append(0)
        for i in range(drafted):
            c.drafted_at[i] += 1
            if i < accepted:
                c.accepted_at[i] += 1
        state.k = min(self.k_max, state.k * 4) if accepted == drafted else max(1, accepted + 1)
        return state.provider

    def rollback(self, seq_id: int, n_past: int) -> None:
        for drafter in self.providers():
            drafter.rollback(seq_id, n_past)

    def release(self, seq_id: int) -> None:
        self._state.pop(seq_id, None)
        for drafter in self.providers():
            drafter.release(seq_id)

    def close(self) -> None:
        for drafter in self.providers():
            drafter.close()
