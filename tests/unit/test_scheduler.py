"""The scheduler driven by a fake runner: no llama.cpp, no subprocess, the whole set in well under a second.

The fake keeps each sequence's KV as a token list and refuses any write that does not continue it, and
its "model" picks each next token from a hash of the sequence's whole KV, so any mistake in positions,
prefix reuse or prompt sharing changes the tokens and shows against `reference()`.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import pytest

from shared.protocol import FINISH_LENGTH, FINISH_STOP, SamplingParams, SubmitRequest, TokenLogprob
from worker.scheduler import RequestRejected, Scheduler
from worker.step import Failure, SamplerInitError, SeqResult, StepOutput, StepPlan

EOG = 0
VOCAB = 97


def next_token(kv: list[int], choice: int) -> int:
    """The fake model: never EOG, a function of everything in the sequence's KV."""
    return 1 + zlib.crc32(np.asarray([*kv, choice], dtype=np.int32).tobytes()) % (VOCAB - 1)


def reference(prompt: list[int], n: int, choice: int = 0) -> list[int]:
    kv, out = list(prompt), []
    for _ in range(n):
        out.append(next_token(kv, choice))
        kv.append(out[-1])
    return out


@dataclass(frozen=True)
class Shape:
    n_ctx: int = 4096
    n_ctx_seq: int = 4096
    n_seq_max: int = 8
    n_batch: int = 64
    n_vocab: int = VOCAB
    recurrent: bool = False


@dataclass
class FakeSampler:
    choice: int
    stop_after: int | None = None  # emit EOG as this many-th token (1-based)
    drawn: int = 0
    closed: bool = False

    def close(self) -> None:
        self.closed = True


@dataclass
class FakeRunner:
    shape: Shape = field(default_factory=Shape)
    kv_unified: bool = True
    prefix_cache: bool = True
    fail_decode: set[str] = field(default_factory=set)
    fail_sample: set[str] = field(default_factory=set)
    kv: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))
    plans: list[StepPlan] = field(default_factory=list)
    samplers: list[FakeSampler] = field(default_factory=list)
    copies: list[tuple[int, int, int, int]] = field(default_factory=list)

    @property
    def info(self) -> Shape:
        return self.shape

    @property
    def eog_ids(self) -> frozenset[int]:
        return frozenset({EOG})

    def seq_rm(self, seq_id: int, start: int = -1, end: int = -1) -> bool:
        assert end == -1, "only suffixes are removed"
        self.kv[seq_id] = self.kv[seq_id][: max(start, 0)]
        return True

    def seq_cp(self, src: int, dst: int, start: int = -1, end: int = -1) -> None:
        assert start <= 0
        self.copies.append((src, dst, start, end))
        self.kv[dst] = list(self.kv[src][: end if end >= 0 else None])

    def seq_pos_min(self, seq_id: int) -> int:
        return 0 if self.kv[seq_id] else -1

    def new_sampler(self, submit: SubmitRequest, choice: int) -> FakeSampler:
        if submit.grammar == "bad":
            raise SamplerInitError("bad grammar")
        if submit.grammar == "bug":
            raise RuntimeError("bug while building a sampler")
        stop = submit.sampling.seed  # tests say "stop after k tokens" through the seed
        sampler = FakeSampler(choice, stop)
        self.samplers.append(sampler)
        return sampler

    def execute(self, plan: StepPlan) -> StepOutput:
        self.plans.append(plan)
        assert 0 < plan.n_tokens <= self.shape.n_batch
        ids = [w.seq_id for w in plan.work]
        assert ids == sorted(ids) and len(set(ids)) == len(ids), "rows in sequence-id order, one item each"
        out = StepOutput()
        for work in plan.work:
            if work.rid in self.fail_decode:
                out.decode_failures = 1
                for seq_id in {work.seq_id, *(t.seq_id for t in work.samples)}:
                    out.failures[seq_id] = Failure(500, "server_error", "llama_decode failed (status 1)")
                continue
            held = self.kv[work.seq_id]
            assert work.position == len(held), (
                f"seq {work.seq_id} writes at {work.position}, holds {len(held)}"
            )
            held.extend(int(t) for t in work.tokens)
            for sibling in work.copy_to:
                self.kv[sibling] = list(held)
            for task in work.samples:
                sampler = task.sampler
                assert isinstance(sampler, FakeSampler) and not sampler.closed
                if work.rid in self.fail_sample:
                    out.failures[task.seq_id] = Failure(500, "server_error", "internal error while sampling")
                    continue
                sampler.drawn += 1
                token = (
                    EOG
                    if sampler.drawn == sampler.stop_after
                    else next_token(self.kv[task.seq_id], sampler.choice)
                )
                logprobs = [TokenLogprob(-1.0, [])] if task.top_logprobs is not None else None
                out.sampled[task.seq_id] = SeqResult([token], logprobs)
        return out


@dataclass
class Run:
    tokens: dict[tuple[str, int], list[int]] = field(default_factory=lambda: defaultdict(list))
    finish: dict[tuple[str, int], str] = field(default_factory=dict)
    cached: dict[str, int] = field(default_factory=dict)  # from a request's last item: it finished
    errors: dict[str, tuple[int, str, str]] = field(default_factory=dict)
    first_step: dict[str, int] = field(default_factory=dict)
    done_step: dict[str, int] = field(default_factory=dict)
    steps: int = 0


def step(sched: Scheduler, run: Run) -> None:
    result = sched.step()
    run.steps += 1
    for error in result.errors:
        run.errors[error.rid] = (error.status, error.kind, error.message)
        run.done_step[error.rid] = run.steps
    for item in result.items:
        key = (item.rid, item.choice)
        run.tokens[key] += item.token_ids
        run.first_step.setdefault(item.rid, run.steps)
        if item.finish is not None:
            run.finish[key] = item.finish
        if item.cached_tokens is not None:
            run.cached[item.rid] = item.cached_tokens
            run.done_step[item.rid] = run.steps


def drive(sched: Scheduler, run: Run | None = None, limit: int = 500) -> Run:
    run = run or Run()
    while not sched.idle:
        step(sched, run)
        assert run.steps < limit, "the scheduler stopped making progress"
    return run


def submit(sched: Scheduler, rid: str, prompt: list[int], max_tokens: int = 4, **kw: object) -> list[int]:
    sched.submit(SubmitRequest(rid, list(prompt), max_tokens, **kw))  # type: ignore[arg-type]
    return list(prompt)


def prompt_of(seed: int, length: int) -> list[int]:
    return [1 + (seed * 31 + i * 7) % (VOCAB - 1) for i in range(length)]


def make(**shape: int | bool) -> tuple[Scheduler, FakeRunner]:
    unified = bool(shape.pop("kv_unified", True))
    cache = bool(shape.pop("prefix_cache", True))
    runner = FakeRunner(Shape(**shape), kv_unified=unified, prefix_cache=cache)  # type: ignore[arg-type]
    return Scheduler(runner), runner


def assert_all_returned(sched: Scheduler, runner: FakeRunner) -> None:
    """Nothing running holds a sequence id, a reservation or a sampler."""
    assert sched.idle and sched.reserved == 0 and not sched.slots.running
    assert sched.slots.available == runner.shape.n_seq_max
    assert all(s.closed for s in runner.samplers)
    for seq_id, held in runner.kv.items():
        assert not held or seq_id in sched.slots.cached, f"seq {seq_id} keeps KV nobody accounts for"


# -- generation and admission ---------------------------------------------------------------------------


def test_generates_the_models_tokens_and_returns_everything() -> None:
    sched, runner = make()
    prompt = submit(sched, "a", prompt_of(1, 10), max_tokens=5)
    run = drive(sched)
    assert run.tokens["a", 0] == reference(prompt, 5)
    assert run.finish["a", 0] == FINISH_LENGTH
    assert run.cached["a"] == 0
    assert sched.stats.generated_tokens_total == 5 and sched.stats.prompt_tokens_total == 10
    assert_all_returned(sched, runner)


def test_stop_token_ends_the_choice_and_ignore_eos_does_not() -> None:
    sched, runner = make()
    submit(sched, "stop", prompt_of(2, 8), max_tokens=9, sampling=SamplingParams(seed=3))
    submit(sched, "ign", prompt_of(3, 8), max_tokens=5, sampling=SamplingParams(seed=3), ignore_eos=True)
    run = drive(sched)
    assert run.finish["stop", 0] == FINISH_STOP and len(run.tokens["stop", 0]) == 2
    assert sched.stats.generated_tokens_total == 3 + 5  # the stop token counts, it is not sent
    assert run.finish["ign", 0] == FINISH_LENGTH and EOG in run.tokens["ign", 0]
    assert_all_returned(sched, runner)


def test_admission_reserves_kv_cells_and_waits_for_them() -> None:
    sched, runner = make(n_ctx=100, n_ctx_seq=100)
    submit(sched, "a", prompt_of(1, 40), max_tokens=20)  # reserves 60 of 100 cells
    submit(sched, "b", prompt_of(2, 30), max_tokens=20)  # 50 more do not fit while "a" runs
    run = Run()
    step(sched, run)
    assert list(sched.running) == ["a"] and sched.reserved == 60
    assert sched.stats.kv_cells_reserved == 60 and sched.stats.queued_requests == 1
    drive(sched, run)
    assert run.first_step["b"] > run.done_step["a"]
    assert run.tokens["b", 0] == reference(prompt_of(2, 30), 20)
    with pytest.raises(RequestRejected, match="context length"):
        submit(sched, "huge", prompt_of(3, 90), max_tokens=20)
    assert_all_returned(sched, runner)


def test_requests_wait_for_a_free_sequence_id() -> None:
    sched, runner = make(n_seq_max=2, prefix_cache=False)
    for i in range(5):
        submit(sched, f"r{i}", prompt_of(i, 6), max_tokens=3)
    run = Run()
    while not sched.idle:
        step(sched, run)
        assert len(sched.running) <= 2
    for i in range(5):
        assert run.tokens[f"r{i}", 0] == reference(prompt_of(i, 6), 3)
    assert_all_returned(sched, runner)


def test_bad_submits_are_refused() -> None:
    sched, _ = make(n_seq_max=2)
    for request, message in (
        (SubmitRequest("e", [], 4), "empty"),
        (SubmitRequest("v", [VOCAB], 4), "out of range"),
        (SubmitRequest("n", [1, 2], 4, n=3), "n_seq_max"),
        (SubmitRequest("m", [1, 2], 0), "max_tokens"),
    ):
        with pytest.raises(RequestRejected, match=message):
            sched.submit(request)
    sched.submit(SubmitRequest("d", [1, 2], 4))
    with pytest.raises(RequestRejected, match="duplicate"):
        sched.submit(SubmitRequest("d", [1, 2], 4))


# -- chunked prefill and fairness -----------------------------------------------------------------------


def test_long_prompt_is_prefilled_in_chunks_while_others_keep_decoding() -> None:
    sched, runner = make(n_batch=16)
    submit(sched, "short", prompt_of(1, 4), max_tokens=12)
    run = Run()
    step(sched, run)  # "short" is prefilled and decoding
    long_prompt = submit(sched, "long", prompt_of(2, 50), max_tokens=2)
    before = len(run.tokens["short", 0])
    for _ in range(4):  # 50 prompt tokens at 15 a step (one row goes to "short")
        step(sched, run)
    assert len(run.tokens["short", 0]) == before + 4, "the running stream got a token every step"
    assert "long" in run.first_step and run.first_step["long"] == run.steps
    for plan in runner.plans:
        assert plan.n_tokens <= 16
    chunks = [len(w.tokens) for p in runner.plans for w in p.work if w.rid == "long"]
    assert chunks == [15, 15, 15, 5]
    drive(sched, run)
    assert run.tokens["long", 0] == reference(long_prompt, 2)
    assert run.tokens["short", 0] == reference(prompt_of(1, 4), 12)


def test_rows_go_in_sequence_id_order_and_ids_are_reused_lowest_first() -> None:
    sched, runner = make(prefix_cache=False)
    submit(sched, "a", prompt_of(1, 4), max_tokens=2)
    submit(sched, "b", prompt_of(2, 4), max_tokens=20)
    run = Run()
    for _ in range(3):
        step(sched, run)
    assert "a" in run.cached and sched.running["b"].leader.seq_id == 1
    submit(sched, "c", prompt_of(3, 4), max_tokens=2)
    step(sched, run)
    assert [(w.rid, w.seq_id) for w in runner.plans[-1].work] == [("c", 0), ("b", 1)]


def test_long_prompt_behind_many_short_requests_is_not_starved() -> None:
    sched, runner = make(n_batch=32, n_seq_max=4, prefix_cache=False)
    for i in range(12):
        submit(sched, f"s{i}", prompt_of(i, 5), max_tokens=3)
    submit(sched, "long", prompt_of(99, 120), max_tokens=2)
    run = drive(sched)
    # Admission is first come, first served: the long prompt starts once the short ones ahead of it do.
    assert run.done_step["long"] <= max(run.done_step[f"s{i}"] for i in range(12)) + 6
    assert run.tokens["long", 0] == reference(prompt_of(99, 120), 2)
    assert_all_returned(sched, runner)


def test_short_requests_behind_a_long_prompt_are_not_starved() -> None:
    sched, runner = make(n_batch=32, n_seq_max=8, prefix_cache=False)
    submit(sched, "long", prompt_of(99, 300), max_tokens=40)
    for i in range(6):
        submit(sched, f"s{i}", prompt_of(i, 5), max_tokens=3)
    run = drive(sched)
    # The long prompt takes 10 steps of prefill; the short ones run beside its decode, not after it.
    for i in range(6):
        assert run.done_step[f"s{i}"] < run.done_step["long"]
    assert all(run.tokens[f"s{i}", 0] == reference(prompt_of(i, 5), 3) for i in range(6))
    assert_all_returned(sched, runner)


# -- prefix reuse ----------------------------------------------------------------------------------------


def test_a_finished_prompt_is_taken_over_by_a_longer_one() -> None:
    sched, runner = make()
    shared = prompt_of(5, 40)
    submit(sched, "a", shared, max_tokens=3)
    drive(sched)
    longer = submit(sched, "b", shared + prompt_of(6, 10), max_tokens=4)
    runner.plans.clear()
    run = drive(sched)
    first = next(w for w in runner.plans[0].work if w.rid == "b")
    assert first.position == 40 and run.cached["b"] == 40
    assert run.tokens["b", 0] == reference(longer, 4)
    assert sched.stats.prefix_cache_hits_total == 1 and sched.stats.prefix_cache_reused_tokens_total == 40
    assert_all_returned(sched, runner)


def test_a_takeover_counts_the_cached_cells_it_reuses() -> None:
    sched, runner = make(n_ctx=100, n_ctx_seq=100)
    shared = prompt_of(5, 40)
    submit(sched, "a", shared, max_tokens=3)
    drive(sched)
    # 50 prompt + 45 new cells: fits in 100 only because the 43 cached cells are taken over, not added.
    longer = submit(sched, "b", shared + prompt_of(6, 10), max_tokens=45)
    run = drive(sched)
    assert run.cached["b"] == 40
    assert run.tokens["b", 0] == reference(longer, 45)
    assert_all_returned(sched, runner)


def test_prefix_cache_off_prefills_everything() -> None:
    sched, runner = make(prefix_cache=False)
    shared = prompt_of(5, 40)
    submit(sched, "a", shared, max_tokens=3)
    drive(sched)
    submit(sched, "b", [*shared, 3], max_tokens=3)
    runner.plans.clear()
    run = drive(sched)
    assert runner.plans[0].work[0].position == 0 and run.cached["b"] == 0
    assert_all_returned(sched, runner)


@pytest.mark.parametrize("unified", [True, False])
def test_a_running_sequences_prefix_is_copied(unified: bool) -> None:
    sched, runner = make(kv_unified=unified)
    shared = prompt_of(7, 40)
    submit(sched, "a", shared, max_tokens=30)
    run = Run()
    step(sched, run)
    step(sched, run)  # "a" is decoding
    b = submit(sched, "b", shared + prompt_of(8, 5), max_tokens=4)
    drive(sched, run)
    assert run.cached["b"] == 40
    assert runner.copies[0][:2] == (0, 1)
    assert run.tokens["b", 0] == reference(b, 4)
    assert run.tokens["a", 0] == reference(shared, 30)


def test_a_request_waits_for_a_shared_prompt_being_prefilled() -> None:
    sched, _runner = make(n_batch=32)
    shared = prompt_of(9, 200)
    submit(sched, "a", shared, max_tokens=2)
    run = Run()
    step(sched, run)  # "a" prefills 32 of 200
    submit(sched, "b", [*shared, 5, 6], max_tokens=2)
    waited = 0
    while "b" not in sched.running:
        waited += 1
        step(sched, run)
    # "b" waits while "a" will still share 64 tokens more than it holds, then copies what "a" holds.
    assert waited >= 3
    assert run.cached.get("b") is None and sched.running["b"].cached_tokens >= 200 - 1 - 64
    drive(sched, run)
    assert run.tokens["b", 0] == reference([*shared, 5, 6], 2)
    assert sched.stats.prefix_cache_hits_total == 1


# -- n > 1 -------------------------------------------------------------------------------------------------


def test_choices_share_one_prefill_of_the_prompt() -> None:
    sched, runner = make(n_batch=16)
    prompt = submit(sched, "n3", prompt_of(4, 30), max_tokens=4, n=3)
    run = drive(sched)
    prompt_rows = sum(len(w.tokens) for p in runner.plans for w in p.work if w.position < 30)
    assert prompt_rows == 30, "the prompt is decoded once, not once per choice"
    for choice in range(3):
        assert run.tokens["n3", choice] == reference(prompt, 4, choice)
    assert run.cached["n3"] == 0 and sched.stats.generated_tokens_total == 12
    assert_all_returned(sched, runner)


# -- cancellation ----------------------------------------------------------------------------------------


def test_cancel_while_queued() -> None:
    sched, runner = make(n_seq_max=1, prefix_cache=False)
    submit(sched, "a", prompt_of(1, 5), max_tokens=5)
    submit(sched, "b", prompt_of(2, 5), max_tokens=5)
    run = Run()
    step(sched, run)
    assert sched.cancel("b") and not sched.cancel("b")
    drive(sched, run)
    assert ("b", 0) not in run.tokens and all(w.rid != "b" for p in runner.plans for w in p.work)
    assert_all_returned(sched, runner)


def test_cancel_while_prefilling_frees_the_sequence() -> None:
    sched, runner = make(n_batch=16, prefix_cache=False)
    submit(sched, "long", prompt_of(1, 100), max_tokens=5, n=2)
    run = Run()
    step(sched, run)
    step(sched, run)
    assert sched.running["long"].prefilling
    assert sched.cancel("long")
    assert sched.idle and sched.reserved == 0
    assert not any(runner.kv.values()), "the cancelled prompt's KV is dropped"
    submit(sched, "next", prompt_of(2, 5), max_tokens=2)
    drive(sched, run)
    assert run.tokens["next", 0] == reference(prompt_of(2, 5), 2)
    assert_all_returned(sched, runner)


def test_cancel_while_decoding_leaves_the_others_running() -> None:
    sched, runner = make()
    submit(sched, "a", prompt_of(1, 5), max_tokens=20, n=2)
    submit(sched, "b", prompt_of(2, 5), max_tokens=6)
    run = Run()
    for _ in range(3):
        step(sched, run)
    assert sched.cancel("a")
    assert "a" not in sched.running and sched.reserved == sched.running["b"].reserved_cells
    drive(sched, run)
    assert len(run.tokens["a", 0]) == 3 and "a" not in run.cached
    assert run.tokens["b", 0] == reference(prompt_of(2, 5), 6)
    assert_all_returned(sched, runner)


# -- failures stay with their request ---------------------------------------------------------------------


@pytest.mark.parametrize("where", ["decode", "sample"])
def test_a_failed_sequence_fails_only_its_request(where: str) -> None:
    sched, runner = make()
    submit(sched, "ok1", prompt_of(1, 6), max_tokens=5)
    submit(sched, "bad", prompt_of(2, 6), max_tokens=5, n=2)
    submit(sched, "ok2", prompt_of(3, 6), max_tokens=5)
    run = Run()
    step(sched, run)
    bad_ids = [s.seq_id for s in sched.running["bad"].sequences]
    (runner.fail_decode if where == "decode" else runner.fail_sample).add("bad")
    drive(sched, run)
    assert not any(runner.kv[seq_id] for seq_id in bad_ids), "a failed request's KV is not kept as cache"
    assert run.errors["bad"][0] == 500 and set(run.errors) == {"bad"}
    assert "bad" not in run.cached
    for rid, seed in (("ok1", 1), ("ok2", 3)):
        assert run.tokens[rid, 0] == reference(prompt_of(seed, 6), 5)
    assert sched.stats.requests_failed_total == 1
    assert sched.stats.decode_failures_total == (1 if where == "decode" else 0)
    assert_all_returned(sched, runner)


@pytest.mark.parametrize(("grammar", "status"), [("bad", 400), ("bug", 500)])
def test_a_request_that_cannot_start_fails_alone(grammar: str, status: int) -> None:
    sched, runner = make()
    submit(sched, "ok", prompt_of(1, 6), max_tokens=3)
    submit(sched, "broken", prompt_of(2, 6), max_tokens=3, n=2, grammar=grammar)
    run = drive(sched)
    assert run.errors["broken"][0] == status
    assert run.tokens["ok", 0] == reference(prompt_of(1, 6), 3)
    assert_all_returned(sched, runner)


def test_logprobs_travel_with_their_tokens() -> None:
    sched, _ = make()
    submit(sched, "lp", prompt_of(1, 6), max_tokens=3, logprobs=2)
    submit(sched, "plain", prompt_of(2, 6), max_tokens=3)
    seen: dict[str, list[list[TokenLogprob] | None]] = defaultdict(list)
    while not sched.idle:
        for item in sched.step().items:
            seen[item.rid].append(item.logprobs)
    assert all(lp is not None and len(lp) == 1 for lp in seen["lp"])
    assert all(lp is None for lp in seen["plain"])
