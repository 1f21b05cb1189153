"""Copies the counters of a worker's parts into the `WorkerStats` its heartbeats send.

The scheduler refreshes its own fields (running, queued, KV cells) itself; the parts it owns each keep
their counters in their own shape: speculation (`SpecCounters` and the step-cost curve), the in-memory
state checkpoints and the disk tier. Copying them is bookkeeping, kept here so the scheduler reads as
scheduling.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shared.protocol import WorkerStats
from worker.speculative.control import Speculation

if TYPE_CHECKING:
    from worker.checkpoints import MemoryCheckpoints
    from worker.disk_tier import DiskTier


def copy_speculation(stats: WorkerStats, spec: Speculation) -> None:
    counters = spec.counters
    stats.spec_drafted_tokens_total = dict(counters.drafted)
    stats.spec_accepted_tokens_total = dict(counters.accepted)
    stats.spec_drafted_by_position = list(counters.drafted_at)
    stats.spec_accepted_by_position = list(counters.accepted_at)
    stats.spec_steps_total = counters.steps
    if spec.costs is not None:
        stats.spec_step_seconds = list(spec.costs.rows)
        stats.spec_step_overhead_seconds = spec.costs.overhead


def copy_checkpoints(stats: WorkerStats, checkpoints: MemoryCheckpoints) -> None:
    """Restores from state checkpoints count as prefix-cache reuse too (call after the slots' counters)."""
    stats.checkpoint_restores_total = checkpoints.restores
    stats.checkpoint_bytes = checkpoints.bytes
    stats.prefix_cache_reused_tokens_total += checkpoints.restored_tokens


def copy_disk(stats: WorkerStats, disk: DiskTier) -> None:
    cache = disk.cache.stats
    stats.disk_cache_lookups_total = cache.lookups
    stats.disk_cache_restores_total = disk.stats.restores
    stats.disk_cache_restored_tokens_total = disk.stats.restored_tokens
    stats.disk_cache_saves_total = cache.saves
    stats.disk_cache_save_failures_total = cache.save_errors
    stats.disk_cache_evictions_total = cache.evictions
    stats.disk_cache_corrupt_removed_total = cache.corrupt_removed + cache.foreign_removed
    stats.disk_cache_bytes = cache.bytes_on_disk
