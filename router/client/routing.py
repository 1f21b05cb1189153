"""Prefix-aware worker choice: send a request where its prompt's prefix is most likely cached.

The router remembers which worker it sent each recent prompt to, in the same radix tree the workers use for
their KV. A new request goes to the least-loaded worker among those that received its longest shared
prefix, unless that worker is full (every sequence busy), in which case the least-loaded worker wins: a
cache hit is not worth queueing behind a busy worker.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

from shared.radix import RadixTree

# Shorter shared prefixes are not worth steering for.
MIN_ROUTED_PREFIX = 32
# The tree keeps every recorded token (about 90 bytes each in Python: 4096 prompts of 2000 tokens took
# 380 MB), so it is bounded by tokens as well as by prompts.
MAX_ROUTED_TOKENS = 1 << 20


class Routable(Protocol):
    index: int
    up: bool

    @property
    def load(self) -> int: ...

    @property
    def slots(self) -> int: ...

    @property
    def adapter_load(self) -> dict[str, int]: ...


class PrefixRouter:
    def __init__(
        self, enabled: bool = True, max_entries: int = 4096, max_tokens: int = MAX_ROUTED_TOKENS
    ) -> None:
        self.enabled = enabled
        self.max_entries = max_entries
        self.max_tokens = max_tokens
        self.tokens = 0  # tokens recorded in the tree
        self._tree = RadixTree()
        self._entries: OrderedDict[int, int] = OrderedDict()  # entry id -> worker index, oldest first
        self._ids = itertools.count()
        self._turns = itertools.count()

    def choose(self, prompt: Sequence[int], workers: Sequence[Routable], lora: str = "") -> Routable:
        if len(workers) < 2:
            return workers[0]
        if lora:  # a worker already running the adapter batches the request with its others
            running = [w for w in workers if w.adapter_load.get(lora) and w.load < w.slots]
            if running:
                return min(running, key=lambda w: (w.load, w.index))
            return self._least_loaded(prompt, workers)
        if not self.enabled:  # least loaded, ties taken in turn
            lowest = min(w.load for w in workers)
            tied = [w for w in workers if w.load == lowest]
            return tied[next(self._turns) % len(tied)]
        least = self._least_loaded(prompt, workers)
        match = self._tree.longest_match(prompt)
        if match.length < MIN_ROUTED_PREFIX:
            return least
        by_index = {w.index: w for w in workers}
        holders = [by_index[self._entries[e]] for e in match.holders if self._entries.get(e) in by_index]
        if not holders:
            return least
        best = min(holders, key=lambda w: (w.load, w.index))
        if best.load >= best.slots:
            return least
        return best

    @staticmethod
    def _least_loaded(prompt: Sequence[int], workers: Sequence[Routable]) -> Routable:
        """The least-loaded worker; ties go by rendezvous hashing of the prompt's first tokens, so new
        prefixes spread over idle workers instead of all landing on the first one."""
        lowest = min(w.load for w in workers)
        tied = [w for w in workers if w.load == lowest]
        head = tuple(prompt[:MIN_ROUTED_PREFIX])
        return max(tied, key=lambda w: hash((head, w.index)))

    def record(self, prompt: Sequence[int], worker: int) -> None:
        if not self.enabled:
            return
        entry = next(self._ids)
        self._tree.insert(entry, prompt)
        self._entries[entry] = worker
        self.tokens += len(prompt)
        while len(self._entries) > self.max_entries or (
            self.tokens > self.max_tokens and len(self._entries) > 1
        ):
            oldest, _ = self._entries.popitem(last=False)
            self._forget(oldest)

    def _forget(self, entry: int) -> None:
        self.tokens -= len(self._tree.tokens_of(entry))
        self._tree.remove(entry)

    def forget_worker(self, worker: int) -> None:
        """A restarted worker lost its cache."""
        for entry in [e for e, w in self._entries.items() if w == worker]:
            del self._entries[entry]
            self._forget(entry)
