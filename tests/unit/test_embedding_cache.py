"""worker/embedding_cache.py: entries round-trip, survive a new instance, stay under max_bytes (oldest
out first), and a corrupt or mis-shaped entry is removed with a warning instead of being returned."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest

from worker.embedding_cache import EmbeddingCache


def array(seed: int, rows: int = 4, cols: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)


def test_round_trip_and_a_new_instance_reads_it(tmp_path: Path) -> None:
    EmbeddingCache(tmp_path, 1 << 20).put("k1", array(1))
    again = EmbeddingCache(tmp_path, 1 << 20)
    got = again.get("k1", 4, 8)
    assert got is not None and np.array_equal(got, array(1))
    assert again.get("missing", 4, 8) is None


def test_kept_under_max_bytes_oldest_first(tmp_path: Path) -> None:
    entry = 4 * 8 * 4 + 48  # payload + header
    cache = EmbeddingCache(tmp_path, 2 * entry)
    for i in range(3):
        cache.put(f"k{i}", array(i))
        os.utime(tmp_path / f"k{i}.emb", (1000 + i, 1000 + i))
    assert cache.bytes <= 2 * entry
    assert cache.get("k0", 4, 8) is None
    assert cache.get("k2", 4, 8) is not None
    assert sum(p.stat().st_size for p in tmp_path.glob("*.emb")) == cache.bytes


@pytest.mark.parametrize("damage", ["truncate", "flip", "shape"])
def test_a_corrupt_entry_is_removed_with_a_warning(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    cache = EmbeddingCache(tmp_path, 1 << 20)
    cache.put("k", array(2))
    file = tmp_path / "k.emb"
    raw = bytearray(file.read_bytes())
    if damage == "truncate":
        file.write_bytes(raw[:60])
    elif damage == "flip":
        raw[-1] ^= 0xFF
        file.write_bytes(raw)
    rows = 5 if damage == "shape" else 4
    with caplog.at_level(logging.WARNING):
        assert cache.get("k", rows, 8) is None
    assert "corrupt" in caplog.text
    assert not file.exists() and cache.corrupt_removed == 1
