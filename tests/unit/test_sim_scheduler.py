"""The simulated worker's engine on a hand-driven clock: slots and a FIFO queue, one shared step clock
(all running sequences in one step's items), max_tokens or the simulator's default, cancel, seeded
failures."""

from __future__ import annotations

from shared.config import SimulateOptions
from shared.protocol import FINISH_LENGTH, FINISH_STOP, SubmitRequest
from worker.sim_scheduler import SimulatedScheduler

TOKENS = [5, 6, 7, 8]
N_CTX = 100


def scheduler(**options: float) -> SimulatedScheduler:
    settings = {"ttft_ms": 20, "itl_ms": 10, "slots": 2, "max_tokens": 3, **options}
    return SimulatedScheduler(SimulateOptions(**settings), TOKENS, N_CTX)  # type: ignore[arg-type]


def submit(sim: SimulatedScheduler, rid: str, max_tokens: int = 2, n: int = 1) -> None:
    assert sim.submit(SubmitRequest(rid=rid, prompt=[1, 2], max_tokens=max_tokens, n=n)) is None


def test_slots_queue_and_one_step_for_every_running_sequence() -> None:
    sim = scheduler()
    for rid in ("a", "b", "c"):
        submit(sim, rid)
    sim.admit(0.0)
    assert sorted(sim.running) == ["a", "b"] and [r.submit.rid for r in sim.waiting] == ["c"]
    assert sim.stats.queued_requests == 1 and sim.stats.seq_ids_free == 0
    assert not sim.step(0.010).items  # before the first token is due
    first = sim.step(0.020)
    assert sorted(item.rid for item in first.items) == ["a", "b"]  # one step, both sequences
    assert all(len(item.token_ids) == 1 and item.token_ids[0] in TOKENS for item in first.items)
    second = sim.step(0.030)
    assert {item.finish for item in second.items} == {FINISH_LENGTH}
    assert all(item.cached_tokens == 0 for item in second.items)  # a request's last item
    assert not sim.running and sim.stats.seq_ids_free == 2
    sim.admit(0.030)
    assert list(sim.running) == ["c"]


def test_whole_context_requests_get_the_simulator_default() -> None:
    sim = scheduler()
    assert sim.submit(SubmitRequest(rid="a", prompt=[1, 2], max_tokens=N_CTX - 2)) is None
    sim.admit(0.0)
    items = [item for t in range(2, 10) for item in sim.step(t / 100).items]
    assert len(items) == 3 and items[-1].finish == FINISH_STOP


def test_cancel_frees_slots_running_or_queued() -> None:
    sim = scheduler()
    submit(sim, "a", max_tokens=50, n=2)
    submit(sim, "b")
    sim.admit(0.0)
    assert sim.cancel("b") and not sim.waiting
    assert sim.cancel("a") and not sim.running and sim.stats.seq_ids_free == 2
    assert not sim.cancel("a")


def test_more_choices_than_slots_is_refused() -> None:
    error = scheduler().submit(SubmitRequest(rid="a", prompt=[1], max_tokens=2, n=3))
    assert error is not None and error.status == 400


def test_failures_follow_the_seed() -> None:
    def failed(seed: int) -> list[str]:
        sim = scheduler(failure_rate=0.5, seed=seed, slots=16)
        for i in range(16):
            submit(sim, f"r{i}")
        sim.admit(0.0)
        return sorted(error.rid for error in sim.step(0.02).errors)

    assert failed(3) == failed(3)
    assert 0 < len(failed(3)) < 16
    assert failed(3) != failed(4)
