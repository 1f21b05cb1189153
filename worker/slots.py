"""Sequence slots (llama.cpp sequence ids) and the KV they keep as prefix cache.

A slot is free (no KV), running (owned by a sequence of a running request) or cached (its request ended;
its KV stays, registered in the radix tree, until the memory is needed). Admission asks `plan()` for the
best reuse of a prompt's prefix: take over a cached slot (truncating its KV to the shared length) or copy
the shared cells from any slot into a fresh one (`llama_memory_seq_cp`: free in a unified KV cache, a
buffer copy between per-sequence streams). Cached
slots are evicted least-recently-used first, and only ever to make room for live work.

What llama.cpp can reuse depends on the memory: attention KV (and sliding-window KV kept full, llama.cpp's
default `swa_full`) truncates to any length; recurrent / hybrid state cannot be truncated, so it is reused
only when the whole cached state is a prefix of the new prompt; anything else falls back to prefilling.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

from shared.lora import BASE, AdapterSet
from shared.radix import RadixTree
from worker.step import KVMemory

# Reusing fewer tokens than this is not worth a copy, nor giving up another cached entry for.
MIN_REUSE_TOKENS = 16
# Wait for a prompt being prefilled elsewhere when it will share at least this many more tokens.
MIN_WAIT_GAIN = 64


# A takeover wins over a copy that reuses at most this many more tokens.
TAKEOVER_BONUS = 32


def _score(plan: ReusePlan) -> int:
    return plan.length + (TAKEOVER_BONUS if plan.takeover else 0) if plan.length else 0


class KVHolder(Protocol):
    """What the slot table needs of a running sequence: how many of its tokens are in the KV already."""

    n_past: int

    @property
    def prefilling(self) -> bool: ...


@dataclass(frozen=True)
class ReusePlan:
    """How a new request's leader slot gets its first `length` prompt tokens without prefilling them."""

    length: int = 0
    source: int = -1  # slot holding them; -1: none
    takeover: bool = False  # the source is a cached slot that becomes the leader's slot
    wait: bool = False  # a prompt being prefilled will soon share much more: admit later


@dataclass
class SlotStats:
    lookups: int = 0
    hits: int = 0
    reused_tokens: int = 0
    evictions: int = 0


class SlotTable:
    def __init__(
        self, memory: KVMemory, n_seq_max: int, recurrent: bool, unified: bool, enabled: bool = True
    ) -> None:
        self.memory = memory
        self.enabled = enabled
        # A heap: new sequences take the lowest free id, which keeps running ids close together (with
        # per-sequence KV streams llama.cpp puts only consecutive ids in one ubatch).
        self.free: list[int] = list(range(n_seq_max))
        self.cached: OrderedDict[int, int] = OrderedDict()  # slot -> cells, least recently used first
        self.running: dict[int, KVHolder] = {}
        self.tree = RadixTree()
        # The LoRA adapter set each running or cached slot's KV was computed under: KV is reused only
        # within one set (a prompt cached under adapter A never serves the base model or adapter B).
        self.adapters: dict[int, AdapterSet] = {}
        self.can_truncate = not recurrent
        self.can_copy = not recurrent
        self.unified = unified
        self.stats = SlotStats()

    # -- accounting ---------------------------------------------------------------------------------

    @property
    def cached_cells(self) -> int:
        return sum(self.cached.values())

    @property
    def available(self) -> int:
        """Slots a new request could get (free now or by evicting cache)."""
        return len(self.free) + len(self.cached)

    # -- reuse ----------------------------------------------------------------------------------------

    def plan(self, prompt: list[int], adapters: AdapterSet = BASE) -> ReusePlan:
        """The best way to reuse cached KV for `prompt` under `adapters` (always leaving one token to
        prefill for logits)."""
        if not self.enabled:
            return ReusePlan()
        self.stats.lookups += 1
        best = ReusePlan()
        coming = 0  # the longest prefix a slot still prefilling will soon hold
        # Ties go to the lowest id, and a cached slot to take over beats a copy that is only a little
        # longer: both keep running ids close together (one ubatch per step with per-sequence KV).
        for slot, shared in sorted(self.tree.match_lengths(prompt).items()):
            if self.adapters.get(slot, BASE) != adapters:
                continue
            limit = min(shared, len(prompt) - 1)
            if slot in self.cached:
                registered = len(self.tree.tokens_of(slot))
                if limit < registered and not self.can_truncate:
                    continue  # recurrent state: only the whole state is reusable
                if limit < MIN_REUSE_TOKENS or not self._complete_from_start(slot):
                    continue
                candidate = ReusePlan(limit, slot, takeover=True)
            else:
                holder = self.running.get(slot)
                if holder is None or not self.can_copy:
                    continue
                if holder.prefilling:  # it will hold `limit` tokens once its prefill is done
                    coming = max(coming, limit)
                usable = min(limit, holder.n_past)
                if usable < MIN_REUSE_TOKENS:
                    continue
                candidate = ReusePlan(usable, slot)
            if _score(candidate) > _score(best):
                best = candidate
        if coming - best.length >= MIN_WAIT_GAIN:
            return ReusePlan(wait=True)
        return best

    def _complete_from_start(self, slot: int) -> bool:
        """False when llama.cpp dropped the oldest cells (sliding window without swa_full)."""
        return bool(self.memory.seq_pos_min(slot) <= 0)

    # -- allocation -----------------------------------------------------------------------------------

    def make_room(self, slots: int, cells: int, reserved: int, capacity: int, keep: int = -1) -> bool:
        """Evicts cached slots (LRU, sparing `keep`) until `slots` free slots and `cells` cells fit."""
        while len(self.free) < slots or reserved + self.cached_cells + cells > capacity:
            victim = next((s for s in self.cached if s != keep), None)
            if victim is None:
                return False
            self._evict(victim)
        return True

    def _evict(self, slot: int) -> None:
        self.cached.pop(slot)
        self.tree.remove(slot)
        self.memory.seq_rm(slot)
        self.adapters.pop(slot, None)
        heapq.heappush(self.free, slot)
        self.stats.evictions += 1

    def acquire(
        self, plan: ReusePlan, prompt: list[int], holder: KVHolder, adapters: AdapterSet = BASE
    ) -> int:
        """A slot for a request's leader, holding the plan's reused prefix; registers the prompt."""
        if plan.takeover:
            slot = plan.source
            self.cached.pop(slot)
            registered = len(self.tree.tokens_of(slot))
            if plan.length < registered:
                self.memory.seq_rm(slot, plan.length, -1)
        else:
            slot = self._take_free(adapters, keep=plan.source)
            self.memory.seq_rm(slot)
            if plan.length:
                self._copy_prefix(plan.source, slot, plan.length)
        if plan.length:
            self.stats.hits += 1
            self.stats.reused_tokens += plan.length
        self.running[slot] = holder
        self.adapters[slot] = adapters
        if self.enabled:
            self.tree.insert(slot, prompt)
        return slot

    def _copy_prefix(self, source: int, slot: int, length: int) -> None:
        if self.unified:  # cells are shared, nothing is copied
            self.memory.seq_cp(source, slot, 0, length)
            return
        # Separate streams: llama.cpp copies whole streams only; copy, then cut back to the prefix.
        self.memory.seq_cp(source, slot, -1, -1)
        self.memory.seq_rm(slot, length, -1)

    def _take_free(self, adapters: AdapterSet, keep: int = -1) -> int:
        """A free id for a sequence of `adapters`: the lowest, unless several adapter sets run with
        per-sequence KV streams. A step decodes one set, and llama.cpp puts only consecutive ids in one
        ubatch there, so a set's ids are kept together: just above (else below) a running id of the same
        set, else in the middle of the longest run of free ids (room for it and for the set below). Cached
        slots count as free there (one is evicted if chosen; never `keep`, a prefix about to be copied)."""
        running = self.adapters
        if self.unified or all(running.get(s, BASE) == adapters for s in self.running):
            return heapq.heappop(self.free)
        free = sorted({*self.free, *(s for s in self.cached if s != keep)})
        same = {s for s in self.running if running.get(s, BASE) == adapters}
        slot = next((s for s in free if s - 1 in same), -1)
        if slot < 0:
            slot = next((s for s in reversed(free) if s + 1 in same), -1)
        if slot < 0:
            best_start, best_length, start, length = free[0], 0, free[0], 0
            for index, s in enumerate(free):
                if index and s == free[index - 1] + 1:
                    length += 1
                else:
                    start, length = s, 1
                if length > best_length:
                    best_start, best_length = start, length
            slot = best_start + best_length // 2
        if slot in self.cached:
            self._evict(slot)
        self.free.remove(slot)
        heapq.heapify(self.free)
        return slot

    def acquire_empty(self, holder: KVHolder, adapters: AdapterSet = BASE) -> int:
        slot = self._take_free(adapters)
        self.memory.seq_rm(slot)
        self.running[slot] = holder
        self.adapters[slot] = adapters
        return slot

    def release(self, slot: int, kv_tokens: list[int] | None) -> None:
        """A sequence ended: keep its KV as cache (`kv_tokens` are what it holds) or free the slot."""
        self.running.pop(slot, None)
        if self.enabled and kv_tokens:
            self.tree.insert(slot, kv_tokens)
            self.cached[slot] = len(kv_tokens)
            return
        self.tree.remove(slot)
        self.memory.seq_rm(slot)
        self.adapters.pop(slot, None)
        heapq.heappush(self.free, slot)
