"""The typed messages of one engine step, and what the scheduler needs of a model runner.

A step is plan -> run -> commit (as in vLLM V1): the scheduler's `plan()` says which sequences get which
tokens at which positions and who samples from which logits; a runner (worker/runner.py, or a fake in
the scheduler's unit tests) writes the llama_batch, decodes, samples and returns a `StepOutput`; the
scheduler's `commit()` turns that into frame items and finishes requests. Nothing here touches llama.cpp,
so the scheduler can be driven and tested without a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from shared.protocol import SubmitRequest, TokenLogprob


class SamplerInitError(ValueError):
    """The request's sampling options (e.g. its grammar) could not be turned into a sampler."""


class Sampler(Protocol):
    """One sequence's sampling state, built by the runner; the scheduler only frees it."""

    def close(self) -> None: ...


@dataclass(slots=True)
class SampleTask:
    """One sequence sampling from the logits of a work item's last row."""

    seq_id: int
    sampler: Sampler
    top_logprobs: int | None  # alternatives to return with each token; None: no logprobs


@dataclass(slots=True)
class SeqWork:
    """Tokens fed to one sequence this step: `tokens` at positions `position`, `position + 1`, ..."""

    rid: str
    seq_id: int
    tokens: list[int] | npt.NDArray[np.int32]
    position: int
    # Rows at the end of `tokens` whose logits are needed: 1 for the last prompt chunk and for a decode
    # row, 0 for a prompt chunk that is not the last, more once drafted tokens are verified.
    n_logits: int
    samples: list[SampleTask] = field(default_factory=list)  # who samples from the last row
    # Sequences that receive this one's KV once it is decoded: n > 1 choices share their prompt.
    copy_to: list[int] = field(default_factory=list)


@dataclass
class StepPlan:
    """Everything one llama_decode computes. Work items are in sequence-id order (see README: with
    per-sequence KV streams llama.cpp batches only consecutive ids into one ubatch)."""

    work: list[SeqWork] = field(default_factory=list)
    # The named LoRA adapters (name, scale) every row runs with (shared/lora.py; empty: the base model), and
    # room for what is coming: media embeddings to feed.
    adapters: tuple[tuple[str, float], ...] = ()
    media: list[object] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return sum(len(w.tokens) for w in self.work)


@dataclass(slots=True)
class SeqResult:
    """What one sequence sampled this step."""

    tokens: list[int]
    logprobs: list[TokenLogprob] | None = None
    budget_closed: bool = False  # the sampler steered the sequence onto a complete document


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a sequence (and so its request) failed this step; `status` is the HTTP status for the client."""

    status: int
    kind: str
    message: str


@dataclass
class StepOutput:
    sampled: dict[int, SeqResult] = field(default_factory=dict)  # by sequence id
    # By sequence id: its request fails; the runner has already undone the step's KV for it.
    failures: dict[int, Failure] = field(default_factory=dict)
    decode_failures: int = 0  # llama_decode calls that failed (a failed batch is retried request by request)
    # Seconds the step's batch took in llama_decode when it went through whole (speculation's cost model
    # learns from them); None when the runner does not time it or the batch failed.
    decode_seconds: float | None = None


class ModelShape(Protocol):
    """The model and context sizes the scheduler plans with (worker.engine.EngineInfo has them)."""

    @property
    def n_ctx(self) -> int: ...
    @property
    def n_ctx_seq(self) -> int: ...
    @property
    def n_seq_max(self) -> int: ...
    @property
    def n_batch(self) -> int: ...
    @property
    def n_vocab(self) -> int: ...
    @property
    def recurrent(self) -> bool: ...


class KVMemory(Protocol):
    """Sequence-level KV operations (llama_memory_seq_*), used by the slot table at admission."""

    def seq_rm(self, seq_id: int, start: int = -1, end: int = -1) -> bool: ...
    def seq_cp(self, src: int, dst: int, start: int = -1, end: int = -1) -> None: ...
    def seq_pos_min(self, seq_id: int) -> int: ...


class Runner(KVMemory, Protocol):
    """Executes step plans on a model; owns every llama.cpp call of a step."""

    @property
    def info(self) -> ModelShape: ...
    @property
    def kv_unified(self) -> bool: ...
    @property
    def prefix_cache(self) -> bool: ...
    @property
    def eog_ids(self) -> frozenset[int]: ...

    def new_sampler(self, submit: SubmitRequest, choice: int) -> Sampler:
        """A sampler for one choice; raises SamplerInitError for options that cannot be sampled."""
        ...

    def execute(self, plan: StepPlan) -> StepOutput: ...


class PrefixTier(Protocol):
    """A prefix store beside the slots (memory checkpoints, disk): save after prefill, restore at start."""

    def save(self, slot: int, prompt: list[int]) -> None: ...
    def restore(self, slot: int, prompt: list[int], held: int) -> int: ...
