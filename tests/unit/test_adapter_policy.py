"""The LoRA rotation policy alone, and the scheduler running one adapter set per step (fake runner)."""

from __future__ import annotations

import itertools

import pytest

from shared.lora import BASE, adapter_set
from tests.unit.test_scheduler import FakeRunner, Shape, drive, reference, submit
from worker.adapter_policy import AdapterRotation
from worker.scheduler import Scheduler


def test_a_set_alone_never_switches() -> None:
    rotation: AdapterRotation[str] = AdapterRotation(quantum=2)
    assert [rotation.choose(["a"]) for _ in range(10)] == ["a"] * 10
    assert rotation.switches == 0


def test_keeps_the_current_set_for_a_quantum_then_takes_the_longest_waiting() -> None:
    rotation: AdapterRotation[str] = AdapterRotation(quantum=3)
    picks = [rotation.choose(["a", "b", "c"]) for _ in range(12)]
    assert picks == ["a"] * 3 + ["b"] * 3 + ["c"] * 3 + ["a"] * 3
    assert rotation.switches == 3


def test_a_set_that_runs_out_of_work_hands_over_at_once() -> None:
    rotation: AdapterRotation[str] = AdapterRotation(quantum=4)
    assert rotation.choose(["a", "b"]) == "a"
    assert rotation.choose(["b"]) == "b"
    assert rotation.choose(["a", "b"]) == "b"  # b's quantum is not over; a's wait just began


@pytest.mark.parametrize("quantum", [1, 2, 5])
def test_no_set_waits_longer_than_the_others_quanta(quantum: int) -> None:
    rotation: AdapterRotation[str] = AdapterRotation(quantum=quantum)
    sets = ["a", "b", "c", "d"]
    last = dict.fromkeys(sets, 0)
    for step in range(1, 200):
        chosen = rotation.choose(sets)
        for key in sets:
            if key != chosen:
                assert step - last[key] <= (len(sets) - 1) * quantum + 1
        last[chosen] = step


def test_invalid_use() -> None:
    with pytest.raises(ValueError):
        AdapterRotation(quantum=0)
    with pytest.raises(ValueError):
        AdapterRotation[str]().choose([])


def test_scale_zero_is_the_base_set() -> None:
    assert adapter_set("a", 0.0) == BASE
    assert adapter_set("", 1.0) == BASE
    assert adapter_set("a", 0.5) == (("a", 0.5),)


def test_scheduler_runs_one_adapter_set_per_step_fairly() -> None:
    runner = FakeRunner(shape=Shape(n_seq_max=8))
    sched = Scheduler(runner, adapter_quantum=3)
    loras = {"r0": "", "r1": "a", "r2": "", "r3": "a", "r4": "b", "r5": "b"}
    prompts = {rid: [3 + i, 5, 7, 11 + i] for i, rid in enumerate(loras)}
    for rid, lora in loras.items():
        submit(sched, rid, prompts[rid], max_tokens=12, lora=lora, lora_scale=1.0 if lora else 0.0)
    run = drive(sched)
    for rid in loras:  # every request got exactly its tokens
        assert run.tokens[(rid, 0)] == reference(prompts[rid], 12)
    by_rid = dict(loras)
    for plan in runner.plans:  # one adapter set per step, the plan's
        assert {adapter_set(by_rid[w.rid], 1.0) for w in plan.work} == {plan.adapters}
    sets = [plan.adapters for plan in runner.plans]
    runs = [(key, len(list(group))) for key, group in itertools.groupby(sets)]
    for index, (key, length) in enumerate(runs[:-1]):  # no switch before the quantum, unless done
        assert length >= 3 or all(later != key for later, _ in runs[index + 1 :])
    assert sched.stats.adapter_switches_total == len(runs) - 1 >= 2
    assert sched.stats.adapter_requests_total == {"": 2, "a": 2, "b": 2}
    assert sched.stats.adapter_tokens_total == {"": 24, "a": 24, "b": 24}


def test_prefix_reuse_stays_within_an_adapter_set() -> None:
    runner = FakeRunner()
    sched = Scheduler(runner)
    prompt = list(range(1, 40))
    submit(sched, "base", prompt, max_tokens=2)
    drive(sched)
    submit(sched, "adapted", prompt, max_tokens=2, lora="a", lora_scale=1.0)
    run = drive(sched)
    assert run.cached["adapted"] == 0
    submit(sched, "adapted-again", prompt, max_tokens=2, lora="a", lora_scale=1.0)
    submit(sched, "other-scale", prompt, max_tokens=2, lora="a", lora_scale=0.5)
    run = drive(sched)
    assert run.cached["adapted-again"] > 0
    assert run.cached["other-scale"] == 0
    assert sched.uses_adapter("a") is False
    submit(sched, "queued", prompt, max_tokens=2, lora="a", lora_scale=1.0)
    assert sched.uses_adapter("a") is True


def test_each_adapter_set_gets_consecutive_ids_with_per_sequence_kv() -> None:
    """llama.cpp puts only consecutive sequence ids in one ubatch with per-sequence KV streams: a step of
    one adapter set must not be split into a ubatch per row because the sets' ids interleave."""
    runner = FakeRunner(shape=Shape(n_seq_max=16), kv_unified=False)
    sched = Scheduler(runner, adapter_quantum=2)
    for wave in range(3):  # the later waves find every slot cached (prefix cache), none free
        for i in range(16):  # arriving alternately, as in bench/lora.py
            lora = "a" if i % 2 else ""
            prompt = [5 + i, 7 + wave, 9]
            submit(sched, f"r{wave}-{i}", prompt, max_tokens=6, lora=lora, lora_scale=1.0 if lora else 0.0)
        drive(sched)
    assert sched.slots.cached
    for plan in runner.plans:
        ids = [w.seq_id for w in plan.work]
        assert ids == list(range(ids[0], ids[0] + len(ids))), ids
