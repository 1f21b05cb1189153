"""The drafting interface: what a speculative-decoding provider offers the scheduler and the runner.

How a step uses it (worker/scheduler.py plans, worker/runner.py executes):

1. `Scheduler.plan()` picks the decoding sequences that speculate this step (speculation on, the request did
   not opt out, few enough sequences running, room left before `max_tokens` and the context) and calls
   `Drafter.draft()` ONCE with all of them (`DraftSeq`: the sequence's whole token history, its pending
   token last, and the most tokens to propose). A provider returns up to `k` tokens per sequence (fewer or
   none is fine).
2. Each speculating sequence's work item carries `[pending, d1 .. dk]` at positions `n_past ..`, with
   `n_logits = k + 1`, in the same llama_decode as every other sequence's rows.
3. The runner samples row by row with the target's own sampler chain: row i's token is accepted while it
   equals draft d(i+1); the first mismatch's sample (or the bonus token after the last draft) ends it. So
   the sampler state (penalties, grammar, RNG) sees exactly the emitted tokens.
4. Right after that verification, and before the step's output goes back, the runner calls
   `Drafter.after_target_decode(ctx, rows)` when `observes_target` is True: `rows` names, for EVERY work
   item of the step (prefill chunks included), the sequence, the item's first batch row, its positions and
   how many of its rows stay in the KV. This is where the MTP provider reads the target's hidden states
   (`llama_cpp_ext.llama_get_embeddings_nextn_ith(ctx, row)`) for the kept rows. A provider that needs an
   output for every row (not only the rows sampled from) sets `target_outputs = True`: the runner then asks
   llama.cpp for every row's output (the MTP provider also turns on `llama_set_embeddings_nextn` on the
   target context itself, once, at start).
5. `Scheduler.commit()` removes the rejected rows' KV from the target (`llama_memory_seq_rm`) and calls
   `Drafter.rollback(seq_id, n_past)`: the target's KV for the sequence now holds exactly `n_past` tokens of
   its history; a provider with its own KV (draft model, MTP) drops whatever it holds beyond that.
6. `Drafter.release(seq_id)` when the sequence ends (finished, failed, cancelled): free its state. A later
   sequence can get the same id with another history; providers key their state by id and must rebuild
   from `DraftSeq.tokens` whatever does not match (e.g. after a prefix-cache reuse).

A provider never sees requests or frames; the scheduler never sees llama.cpp. Predicted outputs (OpenAI's
`prediction`) are a provider too (worker/speculative/prediction.py), used for the requests that carry one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class SpeculationConfigError(ValueError):
    """A speculative-decoding setting that cannot work; the message names the config field."""


@dataclass(slots=True)
class DraftSeq:
    """One sequence asking for drafts this step."""

    seq_id: int
    # The sequence's whole history: prompt, then generated tokens; the last one is the pending token (sampled,
    # not yet decoded by the target). The target's KV holds `len(tokens) - 1` of them.
    tokens: Sequence[int]
    k: int  # the most tokens to propose (>= 1)
    prompt_len: int  # how many of `tokens` are the prompt
    prediction: Sequence[int] | None = None  # the request's predicted output, if it has one


@dataclass(slots=True)
class TargetRows:
    """One work item of a target decode, for providers that read the target's outputs (MTP)."""

    seq_id: int
    first_row: int  # batch index of the item's first row
    position: int  # position of that row
    tokens: Sequence[int]  # the item's tokens, in batch order
    n_kept: int  # rows (from the first) whose KV stays: all of a prefill chunk; 1 + accepted drafts
    n_outputs: int  # rows at the end of the item that had outputs (logits) computed


class Drafter:
    """Base of the providers; the defaults suit a provider with no state of its own (prompt lookup)."""

    name = "none"  # metrics label: the provider's config name
    observes_target = False  # True: call `after_target_decode` after every target decode
    target_outputs = False  # True: the runner asks for every row's output (the MTP provider's hidden states)
    # True: drafting costs next to nothing (no decode), so the controller may ask for the longest draft every
    # step and decide from the cost curve how much of it to verify (worker/speculative/control.py).
    cheap = False

    def draft(self, seqs: list[DraftSeq]) -> list[list[int]]:
        """Up to `seq.k` proposed tokens for each sequence, in order (empty: no speculation for it)."""
        raise NotImplementedError

    def after_target_decode(self, ctx: object, rows: list[TargetRows]) -> None:
        """Called by the runner after each successful target llama_decode and its sampling (`ctx` is the
        target's llama_context)."""

    def rollback(self, seq_id: int, n_past: int) -> None:
        """The target holds exactly `n_past` tokens of this sequence's history: drop anything beyond."""

    def release(self, seq_id: int) -> None:
        """The sequence ended: free what the provider holds for it."""

    def close(self) -> None:
        """The worker stops: free models and contexts."""
