"""Cost-aware draft lengths (worker/speculative/costs.py and control.py): made-up cost curves, no llama.cpp.

The scheduler runs on the fake runner of test_speculation.py, so every draft is verified as the real
runner verifies it and the output must equal `reference()` whatever the controller decides.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from tests.unit.test_scheduler import Shape, assert_all_returned, drive, prompt_of, reference, submit
from tests.unit.test_speculation import Oracle, SpecRunner, _cand
from worker.scheduler import Scheduler
from worker.speculative.control import Speculation
from worker.speculative.costs import StepCosts
from worker.speculative.prediction import PredictionDrafter

FLAT = [0.010] * 33  # a GPU: 33 rows cost what one row costs
LINEAR = [0.010 * n for n in range(1, 34)]  # every row costs a full decode: drafts never pay
# This CPU with Gemma 3 270M (measured, ms): multiples of 8 rows are cheaper than the sizes just below.
CPU = [12, 24, 30, 35, 50, 56, 62, 43, 58, 66, 75, 56, 80, 80, 84, 54, 70]


def test_a_flat_curve_drafts_as_long_as_it_can() -> None:
    k, gain = StepCosts(FLAT).best_k(0.6, 32, 1, 1.0)
    assert k == 32 and gain == pytest.approx(sum(0.6**i for i in range(1, 33)))


def test_a_linear_curve_never_drafts() -> None:
    for p in (0.5, 0.9, 0.99, 1.0):
        assert StepCosts(LINEAR).best_k(p, 32, 1, 1.0)[0] == 0


def test_the_cpu_curve_picks_cheap_sizes_and_needs_confidence() -> None:
    costs = StepCosts([ms / 1e3 for ms in CPU])
    assert costs.best_k(0.5, 16, 1, 1.0)[0] == 0
    assert costs.best_k(0.95, 16, 1, 1.0)[0] == 15  # 16 rows: cheaper than 15 or 17
    assert costs.best_k(0.99, 7, 1, 1.0)[0] == 7  # 8 rows: cheaper than 5, 6 or 7
    # Another sequence's rows already in the step move this one's choice along the curve.
    assert costs.best_k(0.95, 16, 8, 8.0)[0] == 8


def test_costs_extrapolate_and_follow_the_overhead() -> None:
    costs = StepCosts([0.010, 0.020, 0.030])
    assert costs.cost(5) == pytest.approx(0.050)
    for _ in range(200):
        costs.observe_overhead(0.004)
    assert costs.overhead == pytest.approx(0.004, rel=0.01)
    assert costs.cost(1) == pytest.approx(0.014, rel=0.01)
    with pytest.raises(ValueError):
        StepCosts([])


@dataclass
class CheapOracle(Oracle):
    """The oracle of test_speculation.py, declared free to ask (as prompt lookup is)."""

    cheap = True


def make(
    drafter: Oracle | None, curve: list[float] | None, k: int = 8, **shape: int
) -> tuple[Scheduler, SpecRunner, Speculation]:
    runner = SpecRunner(Shape(**shape))  # type: ignore[arg-type]
    costs = StepCosts(curve) if curve is not None else None
    spec = Speculation(drafter, k, None, PredictionDrafter(), costs=costs, prediction_k_max=16)
    return Scheduler(runner, speculation=spec), runner, spec


def draft_rows(runner: SpecRunner) -> list[int]:
    return [len(w.tokens) - 1 for plan in runner.plans for w in plan.work if w.n_logits > 1]


def test_a_new_sequence_verifies_only_after_its_shadow_drafts_come_true() -> None:
    sched, runner, spec = make(CheapOracle(), [ms / 1e3 for ms in CPU], k=16)
    prompt = submit(sched, "a", prompt_of(1, 10), max_tokens=60)
    run = drive(sched)
    assert run.tokens["a", 0] == reference(prompt, 60)
    plans = runner.plans[1:]  # after the prefill
    # p starts at 0.5: no drafts until 4 shadow tokens came true, then long drafts on the cheap sizes.
    assert [p.n_tokens for p in plans[:4]] == [1, 1, 1, 1]
    assert max(draft_rows(runner)) == 15 and spec.counters.accepted["oracle"] > 30
    assert_all_returned(sched, runner)


def test_wrong_shadow_drafts_keep_speculation_off() -> None:
    sched, runner, spec = make(CheapOracle(right=0), [ms / 1e3 for ms in CPU], k=16)
    prompt = submit(sched, "a", prompt_of(2, 10), max_tokens=40)
    run = drive(sched)
    assert run.tokens["a", 0] == reference(prompt, 40)
    assert draft_rows(runner) == [] and spec.counters.steps == 0
    assert_all_returned(sched, runner)


def test_a_predicted_output_is_verified_from_the_first_step() -> None:
    sched, runner, spec = make(None, [ms / 1e3 for ms in CPU])
    prompt = prompt_of(3, 10)
    truth = reference(prompt, 40)
    submit(sched, "p", prompt, max_tokens=40, prediction=truth)
    run = drive(sched)
    assert run.tokens["p", 0] == truth
    assert runner.plans[1].n_tokens == 16  # pending token + 15 predicted ones, at once
    assert spec.counters.accepted["prediction"] >= 30
    assert_all_returned(sched, runner)


def test_without_a_curve_the_acceptance_rule_still_drafts() -> None:
    sched, runner, spec = make(CheapOracle(right=2), None, k=4)
    prompt = submit(sched, "a", prompt_of(4, 10), max_tokens=20)
    run = drive(sched)
    assert run.tokens["a", 0] == reference(prompt, 20)
    assert spec.counters.steps > 0
    assert_all_returned(sched, runner)


def test_the_curve_is_measured_once_on_the_first_drafting_sequence() -> None:
    calls: list[tuple[int, int]] = []

    def calibrate(seq_id: int, position: int) -> list[float]:
        calls.append((seq_id, position))
        return FLAT

    runner = SpecRunner(Shape())
    spec = Speculation(CheapOracle(), 8, None, PredictionDrafter(), calibrate=calibrate, prediction_k_max=16)
    sched = Scheduler(runner, speculation=spec)
    prompt = submit(sched, "a", prompt_of(5, 10), max_tokens=30)
    submit(sched, "b", prompt_of(6, 10), max_tokens=30)
    run = drive(sched)
    assert run.tokens["a", 0] == reference(prompt, 30)
    assert len(calls) == 1 and calls[0][1] == 10  # the pending token's position: the first free one
    assert spec.costs is not None and len(spec.costs.rows) == 33
    assert_all_returned(sched, runner)


def test_real_steps_move_the_curve() -> None:
    spec = Speculation(CheapOracle(), 8, None, costs=StepCosts([0.010, 0.020]), prediction_k_max=8)
    for _ in range(50):
        spec.observe_decode(2, 0.005)
    spec.observe_decode(3, 1.0)  # beyond the curve: ignored
    assert spec.costs is not None
    assert spec.costs.row(2) == pytest.approx(0.005, rel=0.01)
    assert spec.costs.row(1) < 0.004  # not used yet: scaled as real steps were against the measurement


def test_sizes_measured_during_a_spike_come_back_within_reach() -> None:
    # Measured while something else ran: 3 rows looked 3x too dear. Real 1- and 2-row steps take half
    # their measured time; the 3-row entry, never used, follows them down.
    costs = StepCosts([0.010, 0.020, 0.090])
    assert costs.best_k(0.99, 2, 1, 1.0)[0] == 0
    for _ in range(100):
        costs.observe_decode(1, 0.005)
        costs.observe_decode(2, 0.010)
    assert costs.scale == pytest.approx(0.5, rel=0.05)
    assert costs.row(3) == pytest.approx(0.045, rel=0.05)
    assert costs.rows[:2] == [pytest.approx(0.005, rel=0.01), pytest.approx(0.010, rel=0.01)]
    costs.observe_decode(4, 1.0)  # beyond the curve, or nonsense: ignored
    costs.observe_decode(1, 0.0)
    assert costs.row(1) == pytest.approx(0.005, rel=0.01)


def test_no_drafts_while_a_prompt_waits_for_prefill() -> None:
    sched, runner, _ = make(CheapOracle(), FLAT, k=8, n_batch=24)
    submit(sched, "a", prompt_of(7, 8), max_tokens=30)
    sched.step()  # a's prefill
    sched.step()
    submit(sched, "b", prompt_of(8, 60), max_tokens=4)  # 60 prompt tokens: several prefill steps
    run = drive(sched)
    assert run.tokens["a", 0][-4:] == reference(prompt_of(7, 8), 30)[-4:]
    for plan in runner.plans:
        prefilling = any(w.n_logits == 0 or (w.n_logits == 1 and len(w.tokens) > 1) for w in plan.work)
        drafting = any(w.n_logits > 1 for w in plan.work)
        assert not (prefilling and drafting)
    assert_all_returned(sched, runner)


def test_candidates_in_one_step_share_the_curve() -> None:
    # Two sequences, a curve where 16 rows cost what 2 rows cost and more cost a lot: together they fill 16.
    curve = [0.010] * 16 + [1.0] * 17
    spec = Speculation(CheapOracle(), 16, None, costs=StepCosts(curve), prediction_k_max=16)
    for state_seq in (0, 1):
        spec.propose([_cand(state_seq, list(range(1, 12)))], 2)
    for state in spec._state.values():
        state.accepted, state.rejected = 99.0, 1.0
    drafts = spec.propose([_cand(0, list(range(1, 12))), _cand(1, list(range(1, 12)))], 2)
    assert sum(len(d) for d in drafts.values()) + 2 <= 16
