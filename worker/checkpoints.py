"""In-memory state checkpoints for models whose memory cannot be truncated (recurrent / hybrid).

A recurrent state summarises everything decoded so far: it cannot be cut back to a shared prefix the way
attention KV can. So when such a model finishes prefilling a prompt, the sequence state is copied out
(`llama_state_seq_get_data`) and kept, least-recently-used within a byte budget; a later prompt that starts
with a checkpointed one restores it into its slot and prefills only the rest. Attention models never need
this: their slots serve as cache directly.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict

from shared.radix import RadixTree
from worker.engine import LlamaEngine
from worker.seq_state import read_seq_state


class MemoryCheckpoints:
    def __init__(self, engine: LlamaEngine, max_bytes: int, min_tokens: int = 16) -> None:
        self.engine = engine
        self.max_bytes = max_bytes
        self.min_tokens = min_tokens
        self._tree = RadixTree()
        self._states: OrderedDict[int, tuple[list[int], bytes]] = OrderedDict()  # LRU, oldest first
        self._ids = itertools.count()
        self.bytes = 0
        self.restores = 0
        self.restored_tokens = 0

    def save(self, slot: int, prompt: list[int]) -> None:
        """Checkpoints the slot, which holds exactly `prompt` right after its prefill."""
        if len(prompt) < self.min_tokens:
            return
        if any(length == len(prompt) for length, _ in self._tree.registered_prefixes(prompt)):
            return  # already kept
        state = read_seq_state(self.engine.ctx, slot, n_tokens=len(prompt))
        if not state or len(state) > self.max_bytes:
            return
        key = next(self._ids)
        self._states[key] = (list(prompt), state)
        self._tree.insert(key, prompt)
        self.bytes += len(state)
        while self.bytes > self.max_bytes:
            oldest, (_, old_state) = self._states.popitem(last=False)
            self._tree.remove(oldest)
            self.bytes -= len(old_state)

    def restore(self, slot: int, prompt: list[int], held: int) -> int:
        """Restores the longest checkpoint that is a proper prefix of `prompt` if it beats `held`."""
        usable = [(n, k) for n, k in self._tree.registered_prefixes(prompt) if n < len(prompt)]
        if not usable or max(usable)[0] <= held:
            return held
        best = max(usable)[1]
        tokens, state = self._states[best]
        self._states.move_to_end(best)
        if not self.engine.replace_seq_state(slot, state):
            return 0
        self.restores += 1
        self.restored_tokens += len(tokens)
        return len(tokens)
