"""Speculation in the scheduler, driven by the fake runner of test_scheduler.py: no llama.cpp.

The fake runner verifies drafted rows as the real one does (row by row, accepted while the fake model's
token equals the next draft), and its KV refuses writes that do not continue what it holds, so a wrong
rollback of rejected drafts shows as an assertion or as tokens that differ from `reference()`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from shared.protocol import FINISH_LENGTH, FINISH_STOP, SamplingParams, SubmitRequest, TokenLogprob
from tests.unit.test_scheduler import (
    EOG,
    FakeRunner,
    FakeSampler,
    Run,
    Shape,
    assert_all_returned,
    drive,
    next_token,
    prompt_of,
    reference,
    step,
    submit,
)
from worker.scheduler import Scheduler
from worker.speculative.base import Drafter, DraftSeq
from worker.speculative.control import Candidate, Speculation
from worker.speculative.costs import StepCosts
from worker.speculative.prediction import PredictionDrafter
from worker.speculative.prompt_lookup import PromptLookup
from worker.step import Failure, SeqResult, StepOutput, StepPlan


@dataclass
class SpecRunner(FakeRunner):
    """The fake runner, verifying drafts: a work item with n_logits > 1 samples each of its rows."""

    def execute(self, plan: StepPlan) -> StepOutput:
        plain = StepPlan([w for w in plan.work if w.n_logits <= 1], plan.adapters, plan.media)
        verify = [w for w in plan.work if w.n_logits > 1]
        out = super().execute(plain) if plain.work else StepOutput()
        if not plain.work:
            self.plans.append(plan)
        else:
            self.plans[-1] = plan
        assert plan.n_tokens <= self.shape.n_batch
        for work in verify:
            assert work.n_logits == len(work.tokens) and len(work.samples) == 1
            held = self.kv[work.seq_id]
            assert work.position == len(held), (
                f"seq {work.seq_id} writes at {work.position}, holds {len(held)}"
            )
            held.extend(int(t) for t in work.tokens)
            task = work.samples[0]
            sampler = task.sampler
            assert isinstance(sampler, FakeSampler) and not sampler.closed
            if work.rid in self.fail_sample:
                out.failures[task.seq_id] = Failure(500, "server_error", "internal error while sampling")
                continue
            result = SeqResult([], [] if task.top_logprobs is not None else None)
            for i in range(len(work.tokens)):
                sampler.drawn += 1
                kv = held[: work.position + i + 1]
                token = EOG if sampler.drawn == sampler.stop_after else next_token(kv, sampler.choice)
                result.tokens.append(token)
                if result.logprobs is not None:
                    result.logprobs.append(TokenLogprob(-1.0, []))
                if i + 1 == len(work.tokens) or token != work.tokens[i + 1]:
                    break
            out.sampled[task.seq_id] = result
        return out


@dataclass
class Oracle(Drafter):
    """Drafts the fake model's true continuation, wrong from draft position `right + 1` on."""

    right: int = 100
    name: str = "oracle"
    asked: list[list[DraftSeq]] = field(default_factory=list)
    rollbacks: list[tuple[int, int]] = field(default_factory=list)
    released: list[int] = field(default_factory=list)

    def draft(self, seqs: list[DraftSeq]) -> list[list[int]]:
        self.asked.append(list(seqs))
        out = []
        for seq in seqs:
            kv = list(seq.tokens)
            draft: list[int] = []
            for i in range(seq.k):
                token = next_token(kv, 0) if i < self.right else 1 + next_token(kv, 0) % (96 - 1)
                draft.append(token)
                kv.append(token)
            out.append(draft)
        return out

    def rollback(self, seq_id: int, n_past: int) -> None:
        self.rollbacks.append((seq_id, n_past))

    def release(self, seq_id: int) -> None:
        self.released.append(seq_id)


def make_spec(
    drafter: Drafter | None, k: int = 4, max_batch: int | None = None, **shape: int
) -> tuple[Scheduler, SpecRunner, Speculation]:
    runner = SpecRunner(Shape(**shape))  # type: ignore[arg-type]
    spec = Speculation(drafter, k, max_batch, PredictionDrafter())
    return Scheduler(runner, speculation=spec), runner, spec


def rows_per_step(runner: FakeRunner) -> list[int]:
    return [plan.n_tokens for plan in runner.plans]


def assert_kv_matches_cache(sched: Scheduler, runner: FakeRunner) -> None:
    for slot in sched.slots.cached:
        assert runner.kv[slot] == list(sched.slots.tree.tokens_of(slot)), (
            f"slot {slot} KV != its cached tokens"
        )


def test_accepted_drafts_give_the_same_tokens_in_fewer_steps() -> None:
    oracle = Oracle(right=2)
    sched, runner, spec = make_spec(oracle, k=4)
    prompt = submit(sched, "a", prompt_of(1, 10), max_tokens=20)
    run = drive(sched)
    assert run.tokens["a", 0] == reference(prompt, 20)
    assert run.finish["a", 0] == FINISH_LENGTH
    assert run.steps < 20  # 1 prefill step, then up to 3 tokens a step
    c = spec.counters
    assert c.accepted["oracle"] > 0 and c.drafted["oracle"] > c.accepted["oracle"]
    assert c.accepted_at[2:] == [0] * len(c.accepted_at[2:])  # never right from position 3 on
    assert c.steps > 0 and sched.stats.spec_accepted_tokens_total == c.accepted
    assert sched.stats.generated_tokens_total == 20
    assert oracle.released == [0] and oracle.rollbacks
    assert_all_returned(sched, runner)
    assert_kv_matches_cache(sched, runner)


def test_max_tokens_is_never_overshot() -> None:
    sched, runner, _ = make_spec(Oracle(), k=8)
    for i, max_tokens in enumerate((1, 2, 5, 9)):
        submit(sched, f"r{i}", prompt_of(i, 6), max_tokens=max_tokens)
    run = drive(sched)
    for i, max_tokens in enumerate((1, 2, 5, 9)):
        assert run.tokens[f"r{i}", 0] == reference(prompt_of(i, 6), max_tokens)
        assert run.finish[f"r{i}", 0] == FINISH_LENGTH
    assert sched.stats.generated_tokens_total == 1 + 2 + 5 + 9
    assert_all_returned(sched, runner)
    assert_kv_matches_cache(sched, runner)


def test_context_limit_holds_with_drafts() -> None:
    sched, runner, _ = make_spec(Oracle(), k=8, n_ctx=64, n_ctx_seq=32)
    prompt = submit(sched, "a", prompt_of(3, 20), max_tokens=12)
    run = drive(sched)
    assert run.tokens["a", 0] == reference(prompt, 12)
    assert all(plan.work[0].position + len(plan.work[0].tokens) <= 32 for plan in runner.plans)
    assert_all_returned(sched, runner)
    assert_kv_matches_cache(sched, runner)


def test_a_stop_token_sampled_in_a_draft_row_ends_the_choice() -> None:
    sched, runner, _ = make_spec(Oracle(), k=6)
    prompt = submit(sched, "a", prompt_of(2, 8), max_tokens=20, sampling=SamplingParams(seed=5))
    run = drive(sched)
    assert run.finish["a", 0] == FINISH_STOP
    assert run.tokens["a", 0] == reference(prompt, 4)
    assert sched.stats.generated_tokens_total == 5
    assert_all_returned(sched, runner)
    assert_kv_matches_cache(sched, runner)


def test_drafts_stop_before_a_stop_token() -> None:
    spec = Speculation(None, 4, None)
    cands = [_cand(0, [5, 6, 7]), _cand(1, [5, 6, 7], stop=frozenset({EOG}))]
    spec.drafter = _Fixed([[1, EOG, 3], [1, EOG, 3]])
    assert spec.propose(cands, 2) == {0: [1, EOG, 3], 1: [1]}


def test_opt_out_and_max_batch_switch_speculation_off() -> None:
    sched, runner, spec = make_spec(Oracle(), k=4, max_batch=2)
    submit(sched, "out", prompt_of(1, 6), max_tokens=6, speculative=False)
    drive(sched)
    assert all(len(w.tokens) == 1 for plan in runner.plans[1:] for w in plan.work)
    runner.plans.clear()
    for i in range(3):
        submit(sched, f"r{i}", prompt_of(i + 5, 6), max_tokens=6)
    run = drive(sched)
    assert all(len(w.tokens) == 1 for plan in runner.plans[1:] for w in plan.work)  # 3 running > 2
    for i in range(3):
        assert run.tokens[f"r{i}", 0] == reference(prompt_of(i + 5, 6), 6)
    assert spec.counters.steps == 0
    assert_all_returned(sched, runner)


def test_draft_length_adapts_to_acceptance() -> None:
    oracle = Oracle(right=0)
    sched, _, _ = make_spec(oracle, k=8)
    submit(sched, "a", prompt_of(4, 6), max_tokens=12)
    drive(sched)
    ks = [seqs[0].k for seqs in oracle.asked]
    assert ks[0] == 8 and set(ks[1:]) == {1}  # nothing accepted: one token from then on
    oracle2 = Oracle()
    sched, _runner, _ = make_spec(oracle2, k=8)
    submit(sched, "b", prompt_of(4, 6), max_tokens=40)
    drive(sched)
    assert [seqs[0].k for seqs in oracle2.asked][:3] == [8, 8, 8]


def test_drafts_fit_the_batch_and_leave_prefill_the_rest() -> None:
    sched, runner, _ = make_spec(Oracle(), k=8, n_batch=12)
    for i in range(2):
        submit(sched, f"r{i}", prompt_of(i, 5), max_tokens=10)
    run = drive(sched)
    assert max(rows_per_step(runner)) <= 12
    for i in range(2):
        assert run.tokens[f"r{i}", 0] == reference(prompt_of(i, 5), 10)
    assert_all_returned(sched, runner)


def test_n_choices_and_logprobs_with_drafts() -> None:
    sched, runner, _ = make_spec(Oracle(), k=3)
    prompt = submit(sched, "n", prompt_of(7, 6), max_tokens=7, n=3, logprobs=0)
    run = drive(sched)
    assert run.tokens["n", 0] == reference(prompt, 7)
    for choice in (1, 2):  # the oracle drafts choice 0's continuation: the others reject, still exact
        assert run.tokens["n", choice] == reference(prompt, 7, choice)
    assert_all_returned(sched, runner)


def test_a_sampling_failure_in_verification_fails_only_its_request() -> None:
    sched, runner, _ = make_spec(Oracle(), k=3)
    submit(sched, "ok", prompt_of(1, 6), max_tokens=6)
    submit(sched, "bad", prompt_of(2, 6), max_tokens=6)
    run = Run()
    step(sched, run)
    runner.fail_sample.add("bad")
    drive(sched, run)
    assert run.errors["bad"][0] == 500
    assert run.tokens["ok", 0] == reference(prompt_of(1, 6), 6)
    assert_all_returned(sched, runner)


def test_cancel_mid_speculation_returns_everything() -> None:
    oracle = Oracle()
    sched, runner, _ = make_spec(oracle, k=3)
    submit(sched, "a", prompt_of(1, 6), max_tokens=30)
    run = Run()
    for _ in range(3):
        step(sched, run)
    assert sched.cancel("a")
    assert oracle.released == [0]
    assert_all_returned(sched, runner)
    assert_kv_matches_cache(sched, runner)


def test_predicted_output_drafts_and_is_counted() -> None:
    sched, runner, spec = make_spec(None, k=4)
    prompt = prompt_of(3, 6)
    truth = reference(prompt, 16)
    prediction = [*truth[:8], 50, 51, *truth[10:]]  # an edit in the middle
    sched.submit(SubmitRequest("p", prompt, 16, prediction=prediction))
    submit(sched, "plain", prompt_of(8, 6), max_tokens=16)
    run = drive(sched)
    assert run.tokens["p", 0] == truth
    assert run.tokens["plain", 0] == reference(prompt_of(8, 6), 16)
    accepted, rejected = spec.counters.accepted["prediction"], spec.counters.drafted["prediction"]
    rejected -= accepted
    assert accepted >= 8 and rejected >= 1
    assert run.done_step["p"] < run.done_step["plain"]  # "plain" has no prediction: one token a step
    assert_all_returned(sched, runner)


def test_prediction_tokens_reach_the_last_frame_item() -> None:
    sched, _runner, spec = make_spec(None, k=4)
    prompt = prompt_of(3, 6)
    sched.submit(SubmitRequest("p", prompt, 10, prediction=reference(prompt, 10)))
    items = []
    while not sched.idle:
        items += sched.step().items
    totals = [i.prediction_tokens or (0, 0) for i in items]
    assert totals == sorted(totals)  # running totals
    accepted, rejected = totals[-1]
    assert accepted == spec.counters.accepted["prediction"] == 7  # 1 + (4 + 1) + (3 + 1) tokens
    assert rejected == spec.counters.drafted["prediction"] - accepted


# -- the providers -------------------------------------------------------------------------------------


def test_prompt_lookup_drafts_what_followed_the_last_ngram() -> None:
    lookup = PromptLookup(max_ngram=2)
    history = [1, 2, 3, 4, 5, 9, 2, 3]
    assert lookup.draft([DraftSeq(0, history, 3, 5)]) == [[4, 5, 9]]
    assert lookup.draft([DraftSeq(0, [*history, 7], 3, 5)]) == [[]]  # 7 never seen
    assert lookup.draft([DraftSeq(0, [*history, 7, 1], 2, 5)]) == [[2, 3]]
    lookup.release(0)
    assert lookup.draft([DraftSeq(0, [8, 8, 8], 5, 3)]) == [[8]]  # the latest occurrence: one follower


def test_prompt_lookup_prefers_the_occurrence_with_the_longest_matching_context() -> None:
    lookup = PromptLookup(max_ngram=2)
    # (2, 3) follows 7 at position 2 and 8 at position 7: the tail "1 7 2 3" continues like the first.
    history = [1, 7, 2, 3, 5, 9, 8, 2, 3, 6, 1, 7, 2, 3]
    assert lookup.draft([DraftSeq(0, history, 2, 10)]) == [[5, 9]]


def test_prediction_drafter_follows_the_prediction_forward() -> None:
    drafter = PredictionDrafter()
    prediction = [10, 11, 12, 10, 11, 13, 14]
    prompt = [1, 2]
    assert drafter.draft([DraftSeq(0, [*prompt, 10], 2, 2, prediction)]) == [[11, 12]]
    assert drafter.draft([DraftSeq(0, [*prompt, 10, 11, 12, 10], 3, 2, prediction)]) == [[11, 13, 14]]
    assert drafter.draft([DraftSeq(1, [*prompt, 99], 3, 2, prediction)]) == [[]]


def test_prediction_drafter_continues_where_the_output_is_in_templated_text() -> None:
    # The trigram (1, 2, 3) opens every sentence: after a draft from the first sentence and eleven tokens
    # that followed the prediction, the output is in the third sentence, not back in the first or second.
    prediction = [1, 2, 3, 40, 1, 2, 3, 41, 1, 2, 3, 42, 7, 8, 9]
    drafter = PredictionDrafter()
    assert drafter.draft([DraftSeq(0, [9, 1, 2], 4, 1, prediction)]) == [[3, 40, 1, 2]]
    output = [1, 2, 3, 40, 1, 2, 3, 41, 1, 2, 3]
    assert drafter.draft([DraftSeq(0, [9, *output], 4, 1, prediction)]) == [[42, 7, 8, 9]]
    # An answer that opens with a preamble of its own, then quotes: the first match is the first sentence.
    opening = [90, 91, 92, 93, 94, 95, 1, 2, 3]
    assert drafter.draft([DraftSeq(1, [9, *opening], 4, 1, prediction)]) == [[40, 1, 2, 3]]


@dataclass
class _Fixed(Drafter):
    drafts: list[list[int]]
    name: str = "fixed"

    def draft(self, seqs: list[DraftSeq]) -> list[list[int]]:
        return self.drafts[: len(seqs)]


def _cand(seq_id: int, tokens: Sequence[int], stop: frozenset[int] = frozenset()) -> Candidate:
    return Candidate(seq_id, tokens, 1, 8, None, False, stop)


@pytest.mark.parametrize("k", [1, 3])
def test_every_kv_cell_is_returned_under_mixed_load(k: int) -> None:
    sched, runner, _ = make_spec(Oracle(right=1), k=k, n_seq_max=4, n_batch=16)
    for i in range(8):
        submit(sched, f"r{i}", prompt_of(i, 4 + i), max_tokens=3 + i, n=1 + i % 2)
    run = drive(sched)
    for i in range(8):
        assert run.tokens[f"r{i}", 0] == reference(prompt_of(i, 4 + i), 3 + i)
    assert_all_returned(sched, runner)
    assert_kv_matches_cache(sched, runner)


@dataclass
class TimedRunner(SpecRunner):
    """Reports every batch as taking 2 ms per row in llama_decode."""

    def execute(self, plan: StepPlan) -> StepOutput:
        out = super().execute(plan)
        out.decode_seconds = 0.002 * plan.n_tokens
        return out


def test_the_cost_curve_learns_from_decode_steps_only() -> None:
    runner = TimedRunner(Shape())
    costs = StepCosts([0.010] * 8)
    spec = Speculation(None, 4, None, PredictionDrafter(), costs=costs)
    sched = Scheduler(runner, speculation=spec)
    submit(sched, "a", prompt_of(1, 6), max_tokens=4)
    sched.step()  # the prompt: 6 rows, one output row: not a decode step's time
    assert costs.learned == [None] * 8
    sched.step()  # one decode row, 2 ms: exactly what the curve hears
    expected = StepCosts([0.010] * 8)
    expected.observe_decode(1, 0.002)
    assert costs.learned == expected.learned and costs.learned[0] is not None
    drive(sched)
    assert_all_returned(sched, runner)
