"""The supervisor's restart back-off: grows in a crash loop, resets once a process has run a while."""

from __future__ import annotations

from router.process.supervisor import RestartPolicy


def test_back_off_grows_with_consecutive_quick_crashes() -> None:
    policy = RestartPolicy(base=0.5, stable_after=30.0)
    delays = [policy.delay(uptime=1.0) for _ in range(12)]
    assert delays[:3] == [0.5, 1.0, 1.5]
    assert delays[-1] == 5.0  # capped at ten times the base


def test_crashes_minutes_apart_do_not_escalate() -> None:
    policy = RestartPolicy(base=0.5, stable_after=30.0)
    assert [policy.delay(uptime=120.0) for _ in range(5)] == [0.5] * 5


def test_a_long_run_resets_a_crash_loop() -> None:
    policy = RestartPolicy(base=0.5, stable_after=30.0)
    for _ in range(6):
        policy.delay(uptime=0.1)
    assert policy.delay(uptime=45.0) == 0.5
    assert policy.delay(uptime=0.1) == 1.0
