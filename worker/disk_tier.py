"""The disk tier of the prefix cache: save finished prompt prefills, restore them on a memory miss.

Saving reads the leader's sequence state right after its prompt is prefilled (the KV then holds exactly
the prompt) and hands the bytes to the disk cache's writer thread, so the engine pays one memory copy and
no I/O. Restoring happens at admission, when the disk holds a longer prefix than memory does; the state is
loaded into the request's fresh slot and the rest of the prompt is prefilled as usual.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import msgspec

from shared.config import DiskCacheOptions
from worker.disk_cache import DiskSequenceCache, cache_fingerprint
from worker.engine import LlamaEngine
from worker.seq_state import read_seq_state

log = logging.getLogger(__name__)


@dataclass
class DiskTierStats:
    restores: int = 0
    restored_tokens: int = 0
    restore_failures: int = 0


class DiskTier:
    def __init__(
        self,
        engine: LlamaEngine,
        options: DiskCacheOptions,
        model_path: Path,
        always_on_loras: list[str] | None = None,
    ) -> None:
        self.engine = engine
        model = engine.options
        layout = {
            **msgspec.structs.asdict(engine.info),
            "type_k": model.type_k,
            "type_v": model.type_v,
            "swa_full": model.swa_full,
            "flash_attn": model.flash_attn,
            "kv_unified": model.kv_unified,
            # KV computed with start-up LoRA adapters (file and scale) is another cache.
            "loras": list(always_on_loras or []),
        }
        self.cache = DiskSequenceCache(options, cache_fingerprint(model_path, layout))
        self.min_tokens = options.min_tokens
        self.can_truncate = not engine.info.recurrent
        self.stats = DiskTierStats()

    def save(self, slot: int, prompt: list[int]) -> None:
        """Queues the slot's state (it must hold exactly `prompt`) for writing, unless already saved."""
        if len(prompt) < self.min_tokens or self.cache.has(prompt):
            return
        state = read_seq_state(self.engine.ctx, slot, n_tokens=len(prompt))
        if state:
            self.cache.save_async(prompt, state)

    def restore(self, slot: int, prompt: list[int], held: int) -> int:
        """Replaces the `held` prompt tokens the slot has with the longest saved prefix of `prompt`
        when that is longer; returns how many prompt tokens the slot holds afterwards."""
        limit = len(prompt) if self.can_truncate else len(prompt) - 1
        entry = self.cache.lookup(prompt, max_tokens=limit)
        if entry is None or min(entry.n_tokens, len(prompt) - 1) <= held:
            return held
        loaded = self.cache.load(entry)
        if loaded is None:
            return held
        if not self.engine.replace_seq_state(slot, loaded[1]):
            self.stats.restore_failures += 1
            return 0
        held = entry.n_tokens
        if held >= len(prompt):  # keep one prompt token to decode: its logits start the output
            held = len(prompt) - 1
            self.engine.seq_rm(slot, held, -1)
        self.stats.restores += 1
        self.stats.restored_tokens += held
        return held

    def close(self) -> None:
        self.cache.close()
