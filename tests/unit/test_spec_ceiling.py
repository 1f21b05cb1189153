"""bench/spec_ceiling.py's replays on made-up answers and curves (no model): the bounds it prints are
what a perfect drafter and a policy that knows the future could do, and the worker's policy never beats
the bound for its drafts."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.spec_ceiling import Answer, Recording, fastest_seconds, matched_drafts, policy_seconds
from worker.speculative.control import Speculation
from worker.speculative.costs import StepCosts
from worker.speculative.prompt_lookup import PromptLookup

# 1 row 10 ms; more rows cheaper per row, as on a CPU with tiled matmuls.
CURVE = [0.010, 0.018, 0.024, 0.028, 0.032]


def test_no_drafts_cost_one_step_per_token_after_the_first() -> None:
    assert fastest_seconds([0] * 9, CURVE) == pytest.approx(8 * 0.010)
    assert fastest_seconds([0], CURVE) == 0.0


def test_perfect_drafts_take_the_cheapest_steps_per_token() -> None:
    # 8 tokens after the first: 5 rows (5 tokens, 32 ms) + 3 rows (24 ms), or 4 + 4 rows: 56 ms either way,
    # less than any split with a 1- or 2-row step.
    assert fastest_seconds([9] * 9, CURVE) == pytest.approx(0.032 + 0.024)


def test_a_draft_is_verified_only_as_far_as_it_comes_true() -> None:
    # From the first token, a draft with 2 right tokens: one 3-row step (3 tokens), then plain steps.
    matched = [0, 2, 0, 0, 0, 0]
    assert fastest_seconds(matched, CURVE) == pytest.approx(0.024 + 2 * 0.010)
    # A right token that does not pay (2 rows cost more than two 1-row steps) is not verified.
    assert fastest_seconds([0, 1, 0, 0], [0.010, 0.025]) == pytest.approx(3 * 0.010)


def test_verifying_more_than_comes_true_counts_where_the_curve_is_not_monotone() -> None:
    # 2 rows cost 30 ms but 3 rows 15 ms: a 2-token draft with one right token is best verified whole
    # (15 ms, 2 tokens), then one plain step; verifying only the right token would cost 30 + 10 ms.
    curve = [0.010, 0.030, 0.015]
    assert fastest_seconds([0, 1, 0, 0], curve, offered=[0, 2, 0, 0]) == pytest.approx(0.015 + 0.010)
    assert fastest_seconds([0, 1, 0, 0], curve) == pytest.approx(3 * 0.010)  # offered only what is right


def _copying_answer() -> Answer:
    text = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]
    return Answer(prompt=[1, 2, *text, 3], output=list(text), prediction=None, prefill=0.05)


def test_matched_drafts_count_the_tokens_that_come_true() -> None:
    answer = _copying_answer()
    matched, offered = matched_drafts(answer, PromptLookup(2), k=4)
    # From the second token on, the prompt holds what follows: drafts of 4 right, fewer at the end, where
    # the 4-token drafts run on past the answer.
    assert matched[1:] == [4, 4, 4, 4, 4, 4, 4, 4, 3, 2, 1]
    assert offered[1:] == [4] * 11


def test_the_worker_policy_is_never_better_than_the_bound_for_its_drafts() -> None:
    answer = _copying_answer()
    costs = StepCosts(CURVE)
    ours = policy_seconds(answer, Speculation(PromptLookup(2), 4, None, costs=costs), CURVE)
    matched, offered = matched_drafts(answer, PromptLookup(2), 4)
    best = fastest_seconds(matched, CURVE, offered)
    plain = (len(answer.output) - 1) * CURVE[0]
    assert best <= ours < plain  # it speculates, and gains, but cannot beat knowing the future


def test_a_recording_survives_the_file(tmp_path: Path) -> None:
    recording = Recording("m.gguf", 3, {"copying": [_copying_answer()]}, CURVE)
    recording.save(tmp_path / "r.json")
    assert Recording.load(tmp_path / "r.json") == recording
