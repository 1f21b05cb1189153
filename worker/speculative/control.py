"""Which sequences speculate, how many tokens each drafts, and the speculation counters.

The scheduler asks `Speculation.propose()` once per step for its decoding sequences and reports each
verification back with `verified()`. This module decides only (no llama.cpp): speculation is off above
`max_batch` running sequences (the batch is compute-bound there and extra rows cost more than they save),
a request can opt out, and each sequence's draft length adapts to its recent acceptance.

With a measured cost curve (`StepCosts`, worker/speculative/costs.py) and a cheap provider (prompt lookup, a
predicted output: drafting costs nothing), each sequence keeps a running estimate of its per-token acceptance
(accepted drafts against rejections, older evidence decaying) and takes, every step, the draft length with the
most expected tokens per second of step, none if no length pays. While a sequence does not speculate its
drafts are still proposed and followed as it generates ("shadow" drafts: one at a time, counted as a
verification once decided), so copying that starts late is noticed. Providers that cost a decode per draft
token (MTP, a draft model), or a worker without a cost curve, use the simpler rule: the draft length grows
fourfold after a fully accepted draft and drops to one more than what was accepted after a rejection,
between 1 and `k_max`.

`DEFAULT_MAX_BATCH` is the cut-off when `draft_model_max_batch_size` is unset. Measured on this CPU with
Gemma 3 270M: a 16-row decode costs 5-7x a 1-row decode, so beyond a handful of sequences a decode's
cost grows with its rows and wrong drafts cost as much as real work. GPUs (decode cost nearly flat in the
rows) should set a higher limit.
Requests carrying a predicted output draft from it (worker/speculative/prediction.py) instead of the
configured provider.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from worker.speculative.base import Drafter, DraftSeq
from worker.speculative.costs import StepCosts


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


# Measures step costs by output rows on a live sequence: (sequence id, its first free position) -> seconds
# by rows (worker/speculative/calibrate.py). Called once, before the first cost-aware draft.
Calibrator = Callable[[int, int], list[float]]

DEFAULT_MAX_BATCH = 4
PREDICTION_K_MAX = 32  # predicted outputs draft up to this many tokens (if n_batch allows)
_DECAY = 0.6  # weight left to older acceptance evidence at each new observation
# A new sequence's (accepted, rejected) evidence. Found drafts: p = 0.5, which does not pay on a CPU, so its
# shadow drafts have to come true first (a wrong first guess for every request cost 8% at concurrency 16).
# A predicted output is the client's word that the answer resembles it: p = 0.9, verified from the start.
_PRIOR = (1.0, 1.0)
_PRIOR_PREDICTED = (9.0, 1.0)
_SHADOW_ENOUGH = 4  # a shadow draft this many tokens right counts at once (copying starts sooner)


@dataclass(slots=True)
class _SeqState:
    k: int
    provider: str
    accepted: float  # decayed accepted draft tokens
    rejected: float  # decayed rejections (drafts that ended on a wrong token)
    # A draft proposed but not verified, followed as the sequence generates, and the history length then.
    shadow: list[int] = field(default_factory=list)
    shadow_at: int = 0

    @property
    def p(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    def observe(self, accepted: int, rejected: bool) -> None:
        self.accepted = _DECAY * self.accepted + accepted
        self.rejected = _DECAY * self.rejected + (1.0 if rejected else 0.0)

    def check_shadow(self, tokens: Sequence[int]) -> None:
        """Compares the unverified draft kept from an earlier step with the tokens generated since; once it
        is decided (a token differs, or all of it came true), it counts as a verified draft would."""
        if not self.shadow:
            return
        new = tokens[self.shadow_at : self.shadow_at + len(self.shadow)]
        matched = 0
        while matched < len(new) and new[matched] == self.shadow[matched]:
            matched += 1
        if matched < len(new):
            self.observe(matched, True)
        elif len(new) == len(self.shadow) or matched >= _SHADOW_ENOUGH:
            self.observe(matched, False)
        else:
            return  # still coming true: wait for more tokens
        self.shadow = []


class Speculation:
    """Per-sequence draft lengths, provider choice and counters for one scheduler."""

    def __init__(
        self,
        drafter: Drafter | None,
        k_max: int,
        max_batch: int | None,
        prediction: Drafter | None = None,
        *,
        costs: StepCosts | None = None,
        calibrate: Calibrator | None = None,
        prediction_k_max: int | None = None,
    ) -> None:
        """The step-cost curve is `costs`, or measured by `calibrate` on first use; with neither, draft
        lengths follow acceptance alone."""
        self.drafter = drafter
        self.prediction = prediction
        self.k_max = k_max
        self.prediction_k_max = prediction_k_max or k_max
        self.costs = costs
        self._calibrate = calibrate
        self.max_batch = max_batch
        self.counters = SpecCounters()
        self._state: dict[int, _SeqState] = {}

    def providers(self) -> list[Drafter]:
        return [d for d in (self.drafter, self.prediction) if d is not None]

    def wants(self, predicted: bool, speculative: bool) -> bool:
        """Whether a request (with a prediction or not, opted out or not) could draft at all."""
        return speculative and (predicted or self.drafter is not None)

    def paused(self, running: int) -> bool:
        """Whether speculation is off for a step with `running` decoding sequences (above `max_batch`)."""
        return self.max_batch is not None and running > self.max_batch

    def propose(self, candidates: list[Candidate], running: int) -> dict[int, list[int]]:
        """Drafts by sequence id for the candidates that speculate this step (none above `max_batch`)."""
        if self.paused(running):
            return {}
        asks: dict[str, tuple[Drafter, list[DraftSeq]]] = {}
        chosen: dict[int, tuple[Candidate, _SeqState, bool]] = {}
        for cand in candidates:
            drafter = self.prediction if cand.prediction is not None else self.drafter
            if drafter is None or cand.opted_out or cand.room < 1:
                continue
            k_max = self.prediction_k_max if drafter is self.prediction else self.k_max
            state = self._state.get(cand.seq_id)
            if state is None:
                prior = _PRIOR_PREDICTED if drafter is self.prediction else _PRIOR
                state = self._state[cand.seq_id] = _SeqState(k_max, drafter.name, *prior)
            by_cost = (self.costs is not None or self._calibrate is not None) and drafter.cheap
            k = min(k_max if by_cost else state.k, cand.room)
            ask = DraftSeq(cand.seq_id, cand.tokens, k, cand.prompt_len, cand.prediction)
            asks.setdefault(drafter.name, (drafter, []))[1].append(ask)
            chosen[cand.seq_id] = (cand, state, by_cost)
        if self._calibrate is not None:
            first = next((cand for cand, _, by_cost in chosen.values() if by_cost), None)
            if first is not None:
                self._measure(first)
        proposals: dict[int, list[int]] = {}
        for drafter, seqs in asks.values():
            for ask, proposed in zip(seqs, drafter.draft(seqs), strict=True):
                kept: list[int] = []
                stops = chosen[ask.seq_id][0].stop_ids
                for token in proposed[: ask.k]:
                    if token in stops:  # a stop token ends the sequence: never draft past one
                        break
                    kept.append(int(token))
                proposals[ask.seq_id] = kept
        drafts: dict[int, list[int]] = {}
        rows, tokens = running, float(running)  # the step's output rows and expected tokens so far
        for seq_id in sorted(proposals):
            cand, state, by_cost = chosen[seq_id]
            proposal = proposals[seq_id]
            if by_cost and self.costs is not None:
                state.check_shadow(cand.tokens)
                k, gain = self.costs.best_k(state.p, len(proposal), rows, tokens)
                if k == 0:  # not worth verifying now: see later whether it would have been
                    if not state.shadow:
                        state.shadow, state.shadow_at = proposal, len(cand.tokens)
                    continue
                state.shadow = []  # this verification tells more
                proposal = proposal[:k]
                tokens += gain
            else:
                proposal = proposal[: state.k]
            if proposal:
                drafts[seq_id] = proposal
                rows += len(proposal)
        if drafts:
            self.counters.steps += 1
        return drafts

    def _measure(self, cand: Candidate) -> None:
        """Measures the cost curve once, on the sequence about to draft (its pending token's position on
        is free KV)."""
        assert self._calibrate is not None
        calibrate, self._calibrate = self._calibrate, None
        rows = calibrate(cand.seq_id, len(cand.tokens) - 1)
        if rows:
            self.costs = StepCosts(rows)

    def observe_decode(self, n_outputs: int, seconds: float) -> None:
        """A real decode in which every row had outputs (decode and verification rows only): its time
        moves the curve's entry for that many rows, so the curve follows the machine's actual load."""
        if self.costs is not None:
            self.costs.observe_decode(n_outputs, seconds)

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
        state.observe(accepted, accepted < drafted)
        k_max = self.prediction_k_max if state.provider == "prediction" else self.k_max
        state.k = min(k_max, state.k * 4) if accepted == drafted else max(1, accepted + 1)
        return state.provider

    def observe_overhead(self, seconds: float) -> None:
        """One step's time outside llama_decode, for the cost model."""
        if self.costs is not None:
            self.costs.observe_overhead(seconds)

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
