"""Continuous batching: admit requests into sequence slots, then run steps of ONE llama_decode each.

Each step carries one decode row for every running sequence plus prefill chunks of admitted prompts, within
`n_batch`, so a long prompt stalls running streams for at most one chunk. Admission reserves KV cells for the
prompt and every choice's `max_tokens` up front, so llama_decode never runs out of cells under load; a
request that could never fit is refused at submit rather than blocking the queue. One request's failure
(start, sampler, decode) is isolated to that request.

A step is `plan()` -> the runner's `execute()` -> `commit()` (worker/step.py has the messages). This module
decides only: it never touches llama.cpp, so tests/unit/test_scheduler.py drives it with a fake runner.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from shared.lora import BASE, AdapterSet, adapter_set
from shared.protocol import (
    FINISH_BUDGET,
    FINISH_LENGTH,
    FINISH_STOP,
    Error,
    FrameItem,
    SubmitRequest,
    TokenLogprob,
    WorkerStats,
)
from worker.adapter_policy import AdapterRotation
from worker.faults import FaultInjector
from worker.media import plan_take
from worker.slots import ReusePlan, SlotTable
from worker.speculative.control import Candidate, Speculation
from worker.stats_copy import copy_checkpoints, copy_disk, copy_speculation
from worker.step import (
    PrefixTier,
    Runner,
    Sampler,
    SamplerInitError,
    SampleTask,
    SeqResult,
    SeqWork,
    StepOutput,
    StepPlan,
)

if TYPE_CHECKING:
    from worker.checkpoints import MemoryCheckpoints
    from worker.disk_tier import DiskTier
    from worker.media import MediaSpan, RequestMedia

log = logging.getLogger(__name__)

_BUSY_GAP = 0.2  # seconds: a longer time between two steps was idle, not per-step overhead


class RequestRejected(ValueError):
    """A submit that can never be served; `status` is the HTTP status for the client."""

    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


@dataclass
class Sequence:
    """One choice of a request, bound to a llama.cpp sequence id while it runs."""

    request: ActiveRequest
    choice: int
    seq_id: int
    sampler: Sampler
    n_past: int = 0  # tokens of this sequence already in the KV cache
    last_token: int = -1  # sampled, not yet decoded
    generated: int = 0
    finished: bool = False
    tokens: list[int] = field(default_factory=list)  # generated so far (the last one not yet decoded)

    @property
    def prefilling(self) -> bool:
        return self.choice == 0 and self.n_past < len(self.request.prompt)

    def kv_tokens(self) -> list[int]:
        """The tokens whose KV this sequence's slot holds."""
        prompt = self.request.prompt_list
        if self.n_past <= len(prompt):
            return prompt[: self.n_past]
        return prompt + self.tokens[: self.n_past - len(prompt)]


@dataclass
class ActiveRequest:
    submit: SubmitRequest
    prompt: npt.NDArray[np.int32]
    reserved_cells: int
    stop_ids: frozenset[int]
    sequences: list[Sequence] = field(default_factory=list)
    cached_tokens: int = 0
    media: RequestMedia | None = None  # image / audio spans in the prompt (worker/media.py)

    @property
    def has_media(self) -> bool:
        """Speculative decoding skips requests with media."""
        return self.media is not None

    # Drafts from the request's predicted output that the target accepted / rejected.
    prediction_accepted: int = 0
    prediction_rejected: int = 0
    adapters: AdapterSet = BASE  # the LoRA set its KV is computed under (shared/lora.py)

    @property
    def prompt_list(self) -> list[int]:
        return self.submit.prompt

    @property
    def leader(self) -> Sequence:
        return self.sequences[0]

    @property
    def prefilling(self) -> bool:
        return self.leader.n_past < len(self.prompt)


@dataclass
class StepResult:
    items: list[FrameItem]
    # Requests that failed during the step, with the HTTP status the router answers with.
    errors: list[Error]


class Scheduler:
    """Owns the waiting queue, the running requests and the free sequence ids of one engine."""

    def __init__(
        self,
        runner: Runner,
        faults: FaultInjector | None = None,
        disk: DiskTier | None = None,
        checkpoints: MemoryCheckpoints | None = None,
        speculation: Speculation | None = None,
        adapter_quantum: int = 4,
    ) -> None:
        self.runner = runner
        self.spec = speculation
        self._last_step_end: float | None = None  # for speculation's per-step overhead
        self.disk = disk
        self.checkpoints = checkpoints
        self.faults = faults or FaultInjector()
        info = runner.info
        self.info = info
        self.n_ctx_seq = info.n_ctx_seq
        self.n_batch = info.n_batch
        self.kv_unified = runner.kv_unified
        self.kv_capacity = info.n_ctx if self.kv_unified else info.n_ctx_seq * info.n_seq_max
        self.slots = SlotTable(
            runner, info.n_seq_max, info.recurrent, self.kv_unified, enabled=runner.prefix_cache
        )
        # Prefix stores beside the slots, tried in order: state checkpoints for models whose memory
        # cannot be truncated, then the disk.
        self.tiers: list[PrefixTier] = [t for t in (checkpoints, disk) if t is not None]
        self.waiting: deque[ActiveRequest] = deque()
        self.running: dict[str, ActiveRequest] = {}
        self.reserved = 0
        self.stats = WorkerStats(kv_cells_total=self.kv_capacity)  # what heartbeats send
        self._eog = runner.eog_ids
        # Sequence id -> sequence for the plan being run: `commit()` takes the output of the last `plan()`.
        self._planned: dict[int, Sequence] = {}
        # One LoRA adapter set per step; which one is worker/adapter_policy.py's choice.
        self.rotation: AdapterRotation[AdapterSet] = AdapterRotation(adapter_quantum)

    # -- intake -------------------------------------------------------------------------------

    def _check(self, submit: SubmitRequest) -> None:
        info = self.info
        if not submit.prompt:
            raise RequestRejected("the prompt is empty")
        bad = next((t for t in submit.prompt if not 0 <= t < info.n_vocab), None)
        if bad is not None:
            raise RequestRejected(f"prompt token id {bad} is out of range [0, {info.n_vocab})")
        if submit.n < 1 or submit.n > info.n_seq_max:
            raise RequestRejected(f"n={submit.n} exceeds this worker's n_seq_max {info.n_seq_max}")
        if submit.max_tokens < 1:
            raise RequestRejected("max_tokens must be at least 1")
        if len(submit.prompt) + submit.max_tokens > self.n_ctx_seq:
            raise RequestRejected(
                f"prompt ({len(submit.prompt)} tokens) plus max_tokens ({submit.max_tokens}) "
                f"exceeds the context length {self.n_ctx_seq}"
            )
        if self._cells_needed(submit) > self.kv_capacity:
            raise RequestRejected("the request needs more KV cells than this worker has")
        # The penalty sampler allocates a ring of penalty_last_n tokens: no sequence holds more than the
        # context, and -1 (llama-server's "the whole context") means exactly that.
        last_n = submit.sampling.penalty_last_n
        submit.sampling.penalty_last_n = self.n_ctx_seq if last_n < 0 else min(last_n, self.n_ctx_seq)

    def _cells_needed(self, submit: SubmitRequest) -> int:
        if self.kv_unified:  # siblings share the prompt's cells
            return len(submit.prompt) + submit.n * submit.max_tokens
        return submit.n * (len(submit.prompt) + submit.max_tokens)

    def submit(self, submit: SubmitRequest, media: RequestMedia | None = None) -> None:
        """Queues a request (its prompt already expanded with `media`); raises RequestRejected for one
        that could never run."""
        self._check(submit)
        if submit.rid in self.running or any(r.submit.rid == submit.rid for r in self.waiting):
            raise RequestRejected(f"duplicate request id {submit.rid}")
        stop_ids = frozenset() if submit.ignore_eos else self._eog
        request = ActiveRequest(
            submit=submit,
            prompt=np.asarray(submit.prompt, dtype=np.int32),
            reserved_cells=self._cells_needed(submit),
            stop_ids=stop_ids,
            media=media,
            adapters=adapter_set(submit.lora, submit.lora_scale),
        )
        self.waiting.append(request)

    def cancel(self, rid: str) -> bool:
        """Drops a request wherever it is; its sequence ids and KV cells are free on return."""
        for request in self.waiting:
            if request.submit.rid == rid:
                self.waiting.remove(request)
                if request.media is not None:
                    request.media.close()
                return True
        running = self.running.get(rid)
        if running is None:
            return False
        self._release(running)
        return True

    def request_ids(self) -> list[str]:
        """Every request held, running or waiting."""
        return [*self.running, *(r.submit.rid for r in self.waiting)]

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting

    # -- admission and release ------------------------------------------------------------------

    def _admit(self, errors: list[Error]) -> None:
        while self.waiting:
            request = self.waiting[0]
            n = request.submit.n
            if self.slots.available < n:
                return
            plan = self.slots.plan(request.prompt_list, request.adapters)
            if plan.wait and self.running:
                return  # the shared prefix is being prefilled right now: copy it in a step or two
            slots, cells = n, request.reserved_cells
            if plan.takeover:
                slots, cells = n - 1, cells - self.slots.cached[plan.source]
            if not self.slots.make_room(slots, cells, self.reserved, self.kv_capacity, keep=plan.source):
                if self.running or not plan.length:
                    return
                plan = ReusePlan()  # nothing runs: give up the reuse rather than wait forever
                if not self.slots.make_room(n, request.reserved_cells, self.reserved, self.kv_capacity):
                    return
            self.waiting.popleft()
            try:
                self._start(request, plan)
            except SamplerInitError as error:
                errors.append(Error(request.submit.rid, 400, "invalid_request_error", str(error)))
                self.stats.requests_failed_total += 1
            except Exception as error:  # a bug met by one request fails that request, not the worker
                log.exception("starting request %s failed", request.submit.rid)
                self._release(request, keep_kv=False)
                errors.append(Error(request.submit.rid, 500, "server_error", f"internal error: {error}"))
                self.stats.requests_failed_total += 1

    def _start(self, request: ActiveRequest, plan: ReusePlan) -> None:
        submit = request.submit
        self.faults.check("sampler", submit.rid)
        self.faults.bug("start", submit.rid)
        samplers: list[Sampler] = []
        try:
            for choice in range(submit.n):
                samplers.append(self.runner.new_sampler(submit, choice))
        except Exception:
            for sampler in samplers:
                sampler.close()
            raise
        for choice, sampler in enumerate(samplers):
            seq = Sequence(request, choice, -1, sampler)
            if choice == 0:
                seq.seq_id = self.slots.acquire(plan, request.prompt_list, seq, request.adapters)
                seq.n_past = plan.length
                for tier in self._tiers_for(request):  # checkpoints or the disk may hold a longer prefix
                    seq.n_past = tier.restore(seq.seq_id, request.prompt_list, seq.n_past)
                if request.media is not None:  # never reuse part of an image
                    reused = request.media.clamp_reuse(seq.n_past)
                    if reused < seq.n_past:
                        self.runner.seq_rm(seq.seq_id, reused, -1)
                        seq.n_past = reused
            else:
                seq.seq_id = self.slots.acquire_empty(seq, request.adapters)
            request.sequences.append(seq)
        request.cached_tokens = request.leader.n_past
        self.reserved += request.reserved_cells
        self.running[submit.rid] = request
        self.stats.prompt_tokens_total += len(request.prompt)
        per_adapter = self.stats.adapter_requests_total
        per_adapter[submit.lora] = per_adapter.get(submit.lora, 0) + 1

    def _tiers_for(self, request: ActiveRequest) -> list[PrefixTier]:
        """The prefix tiers hold base-model KV only (their keys are tokens): named adapters bypass them."""
        return self.tiers if request.adapters == BASE else []

    def uses_adapter(self, name: str) -> bool:
        """Whether a waiting or running request runs with the named adapter."""
        requests = [*self.running.values(), *self.waiting]
        return any(r.submit.lora == name for r in requests)

    def _finish_sequence(self, seq: Sequence, keep_kv: bool = True) -> None:
        """Ends a sequence; its slot's KV stays as prefix cache unless `keep_kv` is False."""
        if seq.finished:
            return
        seq.finished = True
        seq.sampler.close()
        if self.spec is not None:
            self.spec.release(seq.seq_id)
        held = seq.kv_tokens() if keep_kv else None
        if held is not None and len(held) < seq.n_past:  # verified drafts past a stop token
            self.runner.seq_rm(seq.seq_id, len(held), -1)
            seq.n_past = len(held)
        self.slots.release(seq.seq_id, held)

    def _release(self, request: ActiveRequest, keep_kv: bool = True) -> None:
        for seq in request.sequences:
            self._finish_sequence(seq, keep_kv)
        if request.media is not None:
            request.media.close()
        if self.running.pop(request.submit.rid, None) is not None:
            self.reserved -= request.reserved_cells

    # -- the step: plan -> run -> commit -------------------------------------------------------------

    def step(self) -> StepResult:
        """Admits what fits, then runs one step: `plan()`, the runner's `execute()`, `commit()`."""
        errors: list[Error] = []
        self._admit(errors)
        if not self.running:
            self._last_step_end = None
            self._refresh_stats()
            return StepResult([], errors)
        plan = self.plan()
        output = self.runner.execute(plan)
        result = self.commit(plan, output)
        result.errors[:0] = errors
        if self.spec is not None:
            self._observe_costs(plan, output.decode_seconds)
        return result

    def _observe_costs(self, plan: StepPlan, timed: float | None) -> None:
        """Tells speculation's cost model what this step's llama_decode took (`timed`, for a step of decode
        and verification rows only) and the time between two busy steps spent outside llama_decode."""
        assert self.spec is not None
        now = time.perf_counter()
        last, self._last_step_end = self._last_step_end, now
        if timed is None or plan.media:  # a failed batch, or image decodes: their time is not overhead
            return
        if all(len(w.tokens) == w.n_logits for w in plan.work):
            self.spec.observe_decode(sum(item.n_logits for item in plan.work), timed)
        if last is not None and now - last < _BUSY_GAP:
            self.spec.observe_overhead(max(now - last - timed, 0.0))

    def plan(self) -> StepPlan:
        """One decode row for every running sequence, then prefill chunks in arrival order within
        `n_batch`; work items in sequence-id order."""
        planned = self._planned
        planned.clear()
        ready = list(dict.fromkeys(r.adapters for r in self.running.values()))
        adapters = self.rotation.choose(ready)
        self.stats.adapter_switches_total = self.rotation.switches
        chosen = [r for r in self.running.values() if r.adapters == adapters]
        decoding = sorted(
            (seq for r in chosen if not r.prefilling for seq in r.sequences if not seq.finished),
            key=lambda seq: seq.seq_id,
        )
        budget = self.n_batch - len(decoding)
        # No drafts while prompts wait for prefill: their rows would take the prefill's budget and compute.
        speculate = (
            self.spec is not None and decoding and not any(r.prefilling for r in self.running.values())
        )
        drafts = self._drafts(decoding, budget) if speculate else {}
        work: list[SeqWork] = []
        media: list[tuple[int, MediaSpan]] = []
        for seq in decoding:
            planned[seq.seq_id] = seq
            sample = SampleTask(seq.seq_id, seq.sampler, seq.request.submit.logprobs)
            draft = drafts.get(seq.seq_id, ())
            budget -= len(draft)
            tokens = [seq.last_token, *draft]
            work.append(
                SeqWork(seq.request.submit.rid, seq.seq_id, tokens, seq.n_past, len(tokens), [sample])
            )
        for request in chosen:  # prefill budget in arrival order
            if not request.prefilling or budget <= 0:
                continue
            leader = request.leader
            take, span = plan_take(
                request.media, leader.n_past, min(len(request.prompt) - leader.n_past, budget)
            )
            if span is not None:  # decoded in a llama_decode of its own: one media span per step
                if media:
                    continue
                media.append((leader.seq_id, span))
            budget -= take
            chunk = request.prompt[leader.n_past : leader.n_past + take]
            item = SeqWork(request.submit.rid, leader.seq_id, chunk, leader.n_past, 0)
            if leader.n_past + take == len(request.prompt):  # the last chunk: every choice samples from it
                item.n_logits = 1
                item.samples = [
                    SampleTask(s.seq_id, s.sampler, request.submit.logprobs) for s in request.sequences
                ]
                item.copy_to = [s.seq_id for s in request.sequences[1:]]
                for seq in request.sequences:
                    planned[seq.seq_id] = seq
            planned[leader.seq_id] = leader
            work.append(item)
        # Rows go in sequence-id order: with per-sequence KV streams llama.cpp only batches consecutive
        # ids into one ubatch, so this keeps a decode step to as few ubatches as the ids allow.
        work.sort(key=lambda item: item.seq_id)
        return StepPlan(work, adapters=adapters, media=list(media))

    def _drafts(self, decoding: list[Sequence], budget: int) -> dict[int, list[int]]:
        """Draft tokens for the decoding sequences that speculate, within `budget` extra rows; a draft
        never takes a sequence past its `max_tokens` or its context (see worker/speculative/)."""
        assert self.spec is not None
        if self.spec.paused(len(decoding)):  # before building candidates: their histories are long lists
            return {}
        candidates = []
        for seq in decoding:
            submit = seq.request.submit
            if seq.request.has_media or not self.spec.wants(
                submit.prediction is not None, submit.speculative
            ):
                continue  # media requests never speculate (their placeholder tokens are not text)
            room = min(submit.max_tokens - seq.generated - 1, self.n_ctx_seq - seq.n_past - 2)
            candidates.append(
                Candidate(
                    seq.seq_id,
                    seq.request.prompt_list + seq.tokens,
                    len(seq.request.prompt),
                    room,
                    submit.prediction,
                    not submit.speculative,
                    seq.request.stop_ids,
                )
            )
        drafts = self.spec.propose(candidates, len(decoding))
        for seq_id in sorted(drafts):  # the batch is full: later sequences draft less
            drafts[seq_id] = drafts[seq_id][: max(budget, 0)]
            budget -= len(drafts[seq_id])
        return {seq_id: draft for seq_id, draft in drafts.items() if draft}

    def commit(self, plan: StepPlan, output: StepOutput) -> StepResult:
        """Fails the requests the runner reports failed, advances positions, saves finished prompts to the
        prefix tiers, turns sampled tokens into frame items and finishes requests."""
        items: list[FrameItem] = []
        errors: list[Error] = []
        stats = self.stats
        stats.steps_total += 1
        stats.decode_failures_total += output.decode_failures
        planned = self._planned
        for seq_id, failure in output.failures.items():
            request = planned[seq_id].request
            if self.running.get(request.submit.rid) is request:
                errors.append(Error(request.submit.rid, failure.status, failure.kind, failure.message))
                stats.requests_failed_total += 1
                self._release(request, keep_kv=False)
        sampled = output.sampled
        for work in plan.work:
            seq = planned[work.seq_id]
            request = seq.request
            if seq.finished:  # failed this step (or a bug): nothing to advance
                continue
            seq.n_past = work.position + len(work.tokens)
            if len(work.tokens) > 1 and work.n_logits == len(work.tokens) and work.samples:
                self._verified(seq, work, sampled.get(seq.seq_id))
            if work.copy_to:
                for sibling in request.sequences[1:]:
                    sibling.n_past = seq.n_past
            if work.position < len(request.prompt) and seq.n_past == len(request.prompt):
                for tier in self._tiers_for(request):  # the slot holds exactly the prompt right now
                    tier.save(seq.seq_id, request.prompt_list)
            for task in work.samples:
                result = sampled.get(task.seq_id)
                if result is not None:
                    self._accept(planned[task.seq_id], result, items)
        self._refresh_stats()
        return StepResult(items, errors)

    def _verified(self, seq: Sequence, work: SeqWork, result: SeqResult | None) -> None:
        """A verification row set ran: drop the rejected drafts' KV and count what was accepted."""
        assert self.spec is not None
        if result is None:  # the sampler failed: the request fails in this commit anyway
            return
        kept = work.position + len(result.tokens)  # the pending token plus the accepted drafts
        if kept < seq.n_past:
            self.runner.seq_rm(seq.seq_id, kept, -1)
            seq.n_past = kept
        drafted, accepted = len(work.tokens) - 1, len(result.tokens) - 1
        if self.spec.verified(seq.seq_id, drafted, accepted) == "prediction":
            seq.request.prediction_accepted += accepted
            seq.request.prediction_rejected += drafted - accepted
        self.spec.rollback(seq.seq_id, seq.n_past)

    def _accept(self, seq: Sequence, result: SeqResult, items: list[FrameItem]) -> None:
        """Appends a sequence's sampled tokens, up to a stop token or its length limit."""
        request = seq.request
        submit = request.submit
        if seq.finished:
            return
        finish: str | None = None
        tokens: list[int] = []
        logprobs: list[TokenLogprob] | None = [] if submit.logprobs is not None else None
        base = seq.n_past - (len(result.tokens) - 1)  # KV after the step's first row (before drafts)
        per_adapter = self.stats.adapter_tokens_total
        per_adapter[submit.lora] = per_adapter.get(submit.lora, 0) + len(result.tokens)
        for index, token in enumerate(result.tokens):
            seq.generated += 1
            self.stats.generated_tokens_total += 1
            if token in request.stop_ids:
                finish = FINISH_BUDGET if result.budget_closed else FINISH_STOP
                break
            tokens.append(token)
            seq.last_token = token
            seq.tokens.append(token)
            if logprobs is not None and result.logprobs is not None:
                logprobs.append(result.logprobs[index])
            if seq.generated >= submit.max_tokens or base + len(tokens) >= self.n_ctx_seq:
                finish = FINISH_LENGTH
                break
        cached_tokens = None  # set on the request's last item
        # On the request's first item, so the router counts it even when a stop string ends it early.
        media_tokens = request.media.report_added() if request.media is not None else None
        prediction = None  # running totals: a stop string can end the request at any item
        if submit.prediction is not None:
            prediction = (request.prediction_accepted, request.prediction_rejected)
        if finish is not None:
            self._finish_sequence(seq)
            if all(s.finished for s in request.sequences):
                cached_tokens = request.cached_tokens
                self._release(request)
        items.append(
            FrameItem(
                submit.rid,
                seq.choice,
                tokens,
                logprobs or None,
                finish,
                cached_tokens,
                media_tokens,
                prediction_tokens=prediction,
            )
        )

    def _refresh_stats(self) -> None:
        stats = self.stats
        stats.running_requests = len(self.running)
        stats.running_sequences = sum(1 for r in self.running.values() for s in r.sequences if not s.finished)
        stats.queued_requests = len(self.waiting)
        stats.kv_cells_reserved = self.reserved
        if self.kv_unified:  # siblings share the prompt's cells
            stats.kv_cells_used = sum(
                r.leader.n_past + sum(max(0, q.n_past - len(r.prompt)) for q in r.sequences[1:])
                for r in self.running.values()
            )
        else:
            stats.kv_cells_used = sum(q.n_past for r in self.running.values() for q in r.sequences)
        slots = self.slots
        stats.seq_ids_free = slots.available
        stats.seq_ids_cached = len(slots.cached)
        stats.kv_cells_cached = slots.cached_cells
        stats.prefix_cache_lookups_total = slots.stats.lookups
        stats.prefix_cache_hits_total = slots.stats.hits
        stats.prefix_cache_reused_tokens_total = slots.stats.reused_tokens
        stats.prefix_cache_evictions_total = slots.stats.evictions
        if self.spec is not None:
            copy_speculation(stats, self.spec)
        if self.checkpoints is not None:
            copy_checkpoints(stats, self.checkpoints)
        if self.disk is not None:
            copy_disk(stats, self.disk)

    def close(self) -> None:
        """Ends every request and waits for pending disk-cache writes."""
        for request in list(self.running.values()):
            self._release(request, keep_kv=False)
        if self.spec is not None:
            self.spec.close()
        if self.disk is not None:
            self.disk.close()
