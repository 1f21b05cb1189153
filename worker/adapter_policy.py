"""Which LoRA adapter set runs the next engine step: fair rotation by waiting time, no model involved.

llama.cpp applies adapters to a whole context (`llama_set_adapters_lora`), so the rows of one llama_decode
share one adapter set, and requests of other sets wait. Each step the scheduler passes the sets that have
work; this policy keeps the current set for `quantum` steps while others wait (a switch costs a graph
re-reserve in llama.cpp and splits the batch, so switching every step would not pay), then hands the step to
the set that has waited longest (counted in steps since it last ran or first had work). With k sets having
work, none waits more than (k - 1) x quantum steps: no set starves. A set alone keeps running without limit.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class AdapterRotation(Generic[K]):
    def __init__(self, quantum: int = 4) -> None:
        if quantum < 1:
            raise ValueError("quantum must be at least 1")
        self.quantum = quantum
        self.current: K | None = None
        self.run = 0  # consecutive steps the current set has had
        self.step = 0
        self.switches = 0
        self._since: dict[K, int] = {}  # set -> step it last ran or first had work (while it has work)

    def choose(self, ready: Sequence[K]) -> K:
        """The set for the next step among `ready` (non-empty; in arrival order: ties go to the first)."""
        if not ready:
            raise ValueError("no adapter set has work")
        self.step += 1
        live = set(ready)
        for key in [k for k in self._since if k not in live]:
            del self._since[key]  # ran out of work: its next request starts a fresh wait
        for key in ready:
            self._since.setdefault(key, self.step)
        current = self.current
        if current in live and (self.run < self.quantum or len(live) == 1):
            self.run += 1
            self._since[current] = self.step
            return current
        others = [k for k in ready if k != current] or list(ready)
        choice = min(others, key=lambda k: self._since[k])  # min() keeps the first of equals
        if current is not None and choice != current:
            self.switches += 1
        self.current = choice
        self.run = 1
        self._since[choice] = self.step
        return choice

    def waited(self, key: K) -> int:
        """Steps `key` has waited since it last ran or first had work (0 if it has none)."""
        since = self._since.get(key)
        return 0 if since is None else self.step - since
