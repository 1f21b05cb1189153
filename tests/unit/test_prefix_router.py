"""The router's prefix tree is bounded by tokens as well as by prompts: long prompts must not grow it
without limit (the soak measured 4096 prompts of 2000 tokens holding 380 MB of router memory)."""

from __future__ import annotations

from dataclasses import dataclass

from router.client.routing import PrefixRouter


@dataclass
class FakeWorker:
    index: int
    load: int = 0
    up: bool = True
    slots: int = 4


def test_tree_is_bounded_by_tokens() -> None:
    router = PrefixRouter(max_tokens=1000)
    idle, busy = FakeWorker(0), FakeWorker(1, load=2)
    first = [7, *range(5000, 5299)]  # 300 tokens
    router.record(first, busy.index)
    assert router.choose(first, [idle, busy]) is busy  # it holds the prefix and has room
    for tag in range(10):  # 3000 more tokens: the oldest prompts go
        router.record([100 + tag, *range(6000, 6299)], idle.index)
        assert router.tokens <= 1000
    assert router.choose(first, [idle, busy]) is idle  # forgotten: the least loaded wins


def test_forgetting_a_worker_gives_back_its_tokens() -> None:
    router = PrefixRouter(max_tokens=10_000)
    router.record(list(range(100)), 0)
    router.record(list(range(200, 250)), 1)
    router.forget_worker(0)
    assert router.tokens == 50
