"""Runs a step plan on the llama.cpp context: batch fill, llama_decode, logits, sampler calls.

The scheduler (worker/scheduler.py) decides; this module executes. It owns the llama_batch buffer, the
decode (with a per-request retry when a batch fails, so one bad request fails alone), the per-sequence
sampler calls and logprobs, and copies a finished prompt's KV to the request's other choices. Plain
greedy sequences skip llama_sampler_sample: one argmax over the logits row picks the same token (the
first best) at a fraction of the cost of filling a candidate array over the whole vocabulary.
"""

from __future__ import annotations

import ctypes
import logging
import time
from typing import cast

import llama_cpp
import numpy as np
import numpy.typing as npt

from shared.protocol import SubmitRequest
from worker.adapters import AdapterStore
from worker.checkpoints import MemoryCheckpoints
from worker.disk_tier import DiskTier
from worker.engine import EngineInfo, LlamaEngine
from worker.faults import FaultInjector
from worker.media import MediaEncoder, MediaSpan
from worker.media_decode import decode_media
from worker.sampling import SamplerChain, token_logprob
from worker.scheduler import Scheduler
from worker.speculative.base import Drafter, TargetRows
from worker.speculative.control import Speculation
from worker.step import Failure, Sampler, SampleTask, SeqResult, SeqWork, StepOutput, StepPlan

log = logging.getLogger(__name__)


class ModelRunner:
    """The scheduler's `Runner` on a real LlamaEngine."""

    def __init__(
        self,
        engine: LlamaEngine,
        faults: FaultInjector | None = None,
        media: MediaEncoder | None = None,
        drafters: list[Drafter] | None = None,
        adapters: AdapterStore | None = None,
    ) -> None:
        self.engine = engine
        self.media = media
        self.faults = faults or FaultInjector()
        # Speculation providers that read the target's outputs after each decode (MTP's hidden states).
        self.observers = [d for d in drafters or [] if d.observes_target]
        self.all_outputs = any(d.target_outputs for d in self.observers)
        self.adapters = adapters
        self._eog = engine.vocab.eog_ids
        self._get_logits = llama_cpp.llama_get_logits
        self._logits_key = (0, 0)
        self._logits_view: npt.NDArray[np.float32] = np.zeros((0, 0), dtype=np.float32)

    # -- what the scheduler reads -------------------------------------------------------------------

    @property
    def info(self) -> EngineInfo:
        return self.engine.info

    @property
    def kv_unified(self) -> bool:
        return self.engine.options.kv_unified

    @property
    def prefix_cache(self) -> bool:
        return self.engine.options.prefix_cache

    @property
    def eog_ids(self) -> frozenset[int]:
        return self._eog

    def seq_rm(self, seq_id: int, start: int = -1, end: int = -1) -> bool:
        return self.engine.seq_rm(seq_id, start, end)

    def seq_cp(self, src: int, dst: int, start: int = -1, end: int = -1) -> None:
        self.engine.seq_cp(src, dst, start, end)

    def seq_pos_min(self, seq_id: int) -> int:
        return self.engine.seq_pos_min(seq_id)

    def new_sampler(self, submit: SubmitRequest, choice: int) -> Sampler:
        return SamplerChain(
            self.engine.vocab._vocab,
            self.engine.vocab.n_vocab,
            submit.sampling,
            submit.grammar,
            choice,
            grammar_triggers=submit.grammar_triggers,
            budget=submit.max_tokens if submit.budget_close and not submit.ignore_eos else 0,
            repeat_limit=submit.string_repeat_limit,
        )

    # -- the step -----------------------------------------------------------------------------------

    def _n_outputs(self, item: SeqWork) -> int:
        """Rows at the end of the item that get outputs: what it samples from, or all for an observer."""
        return len(item.tokens) if self.all_outputs else item.n_logits

    def _fill(self, work: list[SeqWork]) -> list[int]:
        """Writes the work items into the batch; returns each item's last row."""
        batch = self.engine.batch
        batch.clear()
        rows: list[int] = []
        for item in work:
            n_out = self._n_outputs(item)
            if len(item.tokens) == 1:
                rows.append(batch.add_token(item.tokens[0], item.position, item.seq_id, n_out > 0))
            else:
                rows.append(batch.add_chunk(item.tokens, item.position, item.seq_id, n_out > 0))
                if n_out > 1:  # verified drafts (or every row for an observing provider)
                    batch.want_logits[rows[-1] - n_out + 1 : rows[-1] + 1] = 1
        return rows

    def execute(self, plan: StepPlan) -> StepOutput:
        output = StepOutput()
        work = plan.work
        if self.adapters is not None:  # one LoRA set per step, media spans included (set only on a change)
            self.adapters.apply(plan.adapters)
        if plan.media:  # media spans first, each in a decode of its own (worker/media_decode.py)
            # (sequence id, MediaSpan) pairs: worker/scheduler.py plans them
            spans: dict[int, MediaSpan] = dict(cast("list[tuple[int, MediaSpan]]", plan.media))
            work = [item for item in plan.work if item.seq_id not in spans]
            for item in plan.work:
                span = spans.get(item.seq_id)
                if span is not None and self.media is not None:
                    failure = decode_media(self.engine.ctx, self.media, item, span)
                    if failure is not None:
                        self.engine.seq_rm(item.seq_id, item.position, -1)
                        output.failures[item.seq_id] = failure
            if not work:
                return output
        groups: dict[str, list[SeqWork]] = {}
        for item in work:
            groups.setdefault(item.rid, []).append(item)
        injected = (
            {rid for rid in groups if self.faults.triggered("decode", rid)} if self.faults.rules else set()
        )
        rows = self._fill(work)
        started = time.perf_counter()
        status = 1 if injected else self.engine.decode(self.engine.batch.size)
        if status == 0:
            output.decode_seconds = time.perf_counter() - started
            self._after_decode(work, rows, output)
            return output
        output.decode_failures += 1
        log.warning("llama_decode failed (status %d) for a batch of %d requests", status, len(groups))
        for item in work:
            self.engine.seq_rm(item.seq_id, item.position, -1)
        for rid, items in groups.items():  # one request at a time: only the bad one fails
            if rid not in injected:
                rows = self._fill(items)
                if self.engine.decode(self.engine.batch.size) == 0:
                    self._after_decode(items, rows, output)
                    continue
                for item in items:
                    self.engine.seq_rm(item.seq_id, item.position, -1)
            failure = Failure(500, "server_error", f"llama_decode failed (status {status})")
            for item in items:
                output.failures[item.seq_id] = failure
        return output

    def _after_decode(self, work: list[SeqWork], rows: list[int], output: StepOutput) -> None:
        """Shares finished prompts with sibling choices, then samples every sequence that asked to."""
        ctx = self.engine.ctx
        faults = self.faults if self.faults.rules else None
        logits: npt.NDArray[np.float32] | None = None
        out_index = -1  # llama.cpp keeps the output rows' logits contiguous, in batch order
        failed: set[str] = set()
        observed: list[TargetRows] = []
        for item, row in zip(work, rows, strict=True):
            n_out = self._n_outputs(item)
            out_index += n_out
            if self.observers:
                observed.append(
                    TargetRows(
                        item.seq_id,
                        row - len(item.tokens) + 1,
                        item.position,
                        np.asarray(item.tokens).tolist(),
                        0,
                        n_out,
                    )
                )
            if item.n_logits > 1 and item.samples:  # drafted tokens to verify
                if item.rid in failed or not self._verify(item, row, out_index, output, failed):
                    continue
                if self.observers:
                    observed[-1].n_kept = len(output.sampled[item.seq_id].tokens)
                continue
            if self.observers:
                observed[-1].n_kept = len(item.tokens)
            for sibling in item.copy_to:
                self.engine.seq_cp(item.seq_id, sibling)
            for task in item.samples:
                if item.rid in failed:
                    break
                sampler = task.sampler
                assert isinstance(sampler, SamplerChain)
                try:
                    if faults is not None:
                        faults.bug("sample", item.rid)
                    if sampler.plain_greedy:
                        if logits is None:
                            logits = self._output_logits()
                        token = int(logits[out_index].argmax())
                    else:
                        token = sampler.sample(ctx, row)
                    result = SeqResult([token], budget_closed=sampler.budget_closed)
                    if task.top_logprobs is not None:
                        result.logprobs = [
                            token_logprob(self.engine.logits_row(row), token, task.top_logprobs)
                        ]
                except Exception as error:  # one request's sampler bug must not take the worker down
                    log.exception("sampling for request %s failed", item.rid)
                    output.failures[task.seq_id] = Failure(
                        500, "server_error", f"internal error while sampling: {error}"
                    )
                    failed.add(item.rid)
                    continue
                output.sampled[task.seq_id] = result
        if observed:
            observed = [rows for rows in observed if rows.n_kept]
            for drafter in self.observers:
                drafter.after_target_decode(ctx, observed)

    def _verify(self, item: SeqWork, row: int, out_index: int, output: StepOutput, failed: set[str]) -> bool:
        """Samples the rows of `[pending, d1 .. dk]` in order with the sequence's own sampler: accepts while
        the sample equals the next draft; the first mismatch's sample (or the bonus token after the last
        draft) ends it. The sampler accepts exactly the tokens returned. False if the sampler failed."""
        task: SampleTask = item.samples[0]
        sampler = task.sampler
        assert isinstance(sampler, SamplerChain)
        n = len(item.tokens)
        first_row, first_out = row - n + 1, out_index - n + 1
        logits = self._output_logits() if sampler.plain_greedy else None
        result = SeqResult([], [] if task.top_logprobs is not None else None)
        try:
            if self.faults.rules:
                self.faults.bug("sample", item.rid)
            for i in range(n):
                if logits is not None:
                    token = int(logits[first_out + i].argmax())
                else:
                    token = sampler.sample(self.engine.ctx, first_row + i)
                result.tokens.append(token)
                if result.logprobs is not None and task.top_logprobs is not None:
                    row_logits = self.engine.logits_row(first_row + i)
                    result.logprobs.append(token_logprob(row_logits, token, task.top_logprobs))
                if i + 1 >= n or token != int(item.tokens[i + 1]):
                    break
        except Exception as error:  # one request's sampler bug must not take the worker down
            log.exception("sampling for request %s failed", item.rid)
            output.failures[task.seq_id] = Failure(
                500, "server_error", f"internal error while sampling: {error}"
            )
            failed.add(item.rid)
            return False
        output.sampled[task.seq_id] = result
        return True

    def _output_logits(self) -> npt.NDArray[np.float32]:
        """Every output row's logits as one (rows, n_vocab) view (kept while llama.cpp's buffer stays)."""
        batch = self.engine.batch
        n_outputs = int(np.count_nonzero(batch.want_logits[: batch.size]))
        address = ctypes.cast(self._get_logits(self.engine.ctx), ctypes.c_void_p).value or 0
        key = (address, n_outputs)
        if self._logits_key != key:
            pointer = ctypes.cast(address, ctypes.POINTER(ctypes.c_float))
            self._logits_view = np.ctypeslib.as_array(pointer, shape=(n_outputs, self.engine.vocab.n_vocab))
            self._logits_key = key
        return self._logits_view


def build_scheduler(
    engine: LlamaEngine,
    faults: FaultInjector | None = None,
    disk: DiskTier | None = None,
    media: MediaEncoder | None = None,
    speculation: Speculation | None = None,
    adapters: AdapterStore | None = None,
) -> Scheduler:
    """A scheduler on a ModelRunner for `engine`, with memory checkpoints when its memory cannot be
    truncated (recurrent / hybrid models), the disk tier when one is given, media spans decoded with the
    projector, speculative decoding and LoRA adapters."""
    drafters = speculation.providers() if speculation is not None else None
    runner = ModelRunner(engine, faults, media, drafters, adapters)
    checkpoints = None
    if engine.options.prefix_cache and engine.info.recurrent:
        checkpoints = MemoryCheckpoints(engine, engine.options.checkpoint_max_bytes)
    return Scheduler(
        runner,
        runner.faults,
        disk=disk,
        checkpoints=checkpoints,
        speculation=speculation,
        adapter_quantum=engine.options.lora_switch_steps,
    )
