"""Disk sequence cache: a saved state restores exactly after a restart; bad files never load."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import pytest

from shared.config import DiskCacheOptions
from tests.fixtures.tiny_models import BOS_ID, BYTE_VOCAB_SIZE, FIRST_BYTE_ID, write_tiny_llama
from worker.batch import BatchBuffer
from worker.disk_cache import (
    DiskEntry,
    DiskSequenceCache,
    cache_fingerprint,
)
from worker.seq_state import read_seq_state, restore_seq_state

N_CTX = 512


# --- llama.cpp helpers ---------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _backend() -> None:
    llama_cpp.llama_backend_init()


@contextmanager
def _model(path: Path) -> Iterator[Any]:
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
    assert model, f"llama.cpp could not load {path}"
    try:
        yield model
    finally:
        llama_cpp.llama_model_free(model)


def _ctx_params(kv_unified: bool) -> Any:
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = N_CTX, N_CTX, N_CTX, 2
    params.n_threads = params.n_threads_batch = 1
    params.kv_unified = kv_unified
    return params


@contextmanager
def _context(model: Any, kv_unified: bool) -> Iterator[Any]:
    ctx = llama_cpp.llama_init_from_model(model, _ctx_params(kv_unified))
    assert ctx, "llama.cpp could not create a context"
    try:
        yield ctx
    finally:
        llama_cpp.llama_free(ctx)


def _ctx_info(ctx: Any, kv_unified: bool) -> dict[str, object]:
    params = _ctx_params(kv_unified)
    return {
        "n_ctx_seq": int(llama_cpp.llama_n_ctx_seq(ctx)),
        "n_seq_max": int(llama_cpp.llama_n_seq_max(ctx)),
        "type_k": params.type_k,
        "type_v": params.type_v,
        "swa_full": params.swa_full,
        "flash_attn": params.flash_attn_type,
        "kv_unified": kv_unified,
    }


def _prefill(ctx: Any, tokens: list[int], seq_id: int, start: int) -> int:
    """Decodes `tokens` at positions start.. in `seq_id`; returns the greedy next token."""
    batch = BatchBuffer(N_CTX)
    row = batch.add_chunk(tokens, start, seq_id, logits_last=True)
    assert llama_cpp.llama_decode(ctx, batch.view(batch.size)) == 0
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, row), shape=(BYTE_VOCAB_SIZE,))
    return int(np.argmax(logits))


def _greedy(ctx: Any, prompt_rest: list[int], seq_id: int, start: int, n: int) -> list[int]:
    """Prefills the rest of a prompt, then decodes `n` greedy tokens one by one."""
    out = [_prefill(ctx, prompt_rest, seq_id, start)]
    pos = start + len(prompt_rest)
    while len(out) < n:
        out.append(_prefill(ctx, [out[-1]], seq_id, pos))
        pos += 1
    return out


def _prompt(n: int, seed: int = 7) -> list[int]:
    rng = np.random.default_rng(seed)
    return [BOS_ID, *rng.integers(FIRST_BYTE_ID, BYTE_VOCAB_SIZE, size=n - 1).tolist()]


def _options(path: Path, max_bytes: int = 1 << 30, min_tokens: int = 8) -> DiskCacheOptions:
    return DiskCacheOptions(path=str(path), max_bytes=max_bytes, min_tokens=min_tokens)


@contextmanager
def _cache(options: DiskCacheOptions, fingerprint: str = "fp", **kwargs: Any) -> Iterator[DiskSequenceCache]:
    cache = DiskSequenceCache(options, fingerprint, **kwargs)
    try:
        yield cache
    finally:
        cache.close()


def _saved(cache: DiskSequenceCache, tokens: list[int], state: bytes) -> DiskEntry:
    cache.save_async(tokens, state)
    cache.flush()
    entry = cache.lookup(tokens, max_tokens=len(tokens))
    assert entry is not None and entry.n_tokens == len(tokens)
    return entry


def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.seq"))


# --- restore after a restart ---------------------------------------------------------------------


@pytest.mark.parametrize("kv_unified", [False, True])
def test_state_restored_from_disk_gives_identical_greedy_output(
    tiny_llama_gguf: Path, tmp_path: Path, kv_unified: bool
) -> None:
    prompt = _prompt(190)
    prefix = prompt[:150]
    options = _options(tmp_path / "cache", min_tokens=128)
    with _model(tiny_llama_gguf) as model:
        with _context(model, kv_unified) as ctx:
            expected = _greedy(ctx, prompt, 0, 0, 24)
            fingerprint = cache_fingerprint(tiny_llama_gguf, _ctx_info(ctx, kv_unified))

        with _context(model, kv_unified) as ctx:  # the first worker saves the prefix's state
            _prefill(ctx, prefix, 0, 0)
            state = read_seq_state(ctx, 0, n_tokens=150)
            assert state and read_seq_state(ctx, 0) == state
            assert read_seq_state(ctx, 0, n_tokens=149) == b""  # not exactly these tokens
            assert read_seq_state(ctx, 1, n_tokens=150) == b""  # an empty sequence
            with _cache(options, fingerprint) as cache:
                assert not cache.has(prefix)
                cache.save_async(prefix, state)
                cache.flush()
                assert cache.has(prefix)
                assert cache.stats.saves == 1

        with _cache(options, fingerprint) as cache, _context(model, kv_unified) as ctx:  # a restart
            assert cache.stats.entries == 1
            entry = cache.lookup(prompt)
            assert entry is not None and entry.n_tokens == 150
            loaded = cache.load(entry)
            assert loaded is not None
            tokens, saved_state = loaded
            assert tokens == prefix and saved_state == state
            assert restore_seq_state(ctx, 1, saved_state)
            assert int(llama_cpp.llama_memory_seq_pos_max(llama_cpp.llama_get_memory(ctx), 1)) == 149
            assert _greedy(ctx, prompt[150:], 1, 150, 24) == expected
            assert (cache.stats.lookups, cache.stats.hits) == (1, 1)


def test_fingerprint_follows_model_file_and_context(tmp_path: Path) -> None:
    model = write_tiny_llama(tmp_path / "m.gguf")
    info = {"n_ctx_seq": 256, "type_k": 1, "kv_unified": False}
    first = cache_fingerprint(model, info)
    assert first == cache_fingerprint(model, dict(info))
    assert first != cache_fingerprint(model, {**info, "type_k": 8})
    assert first != cache_fingerprint(model, {**info, "n_seq_max": 4})
    other = write_tiny_llama(tmp_path / "m.gguf", seed=1)  # same name and size, other weights
    assert other.stat().st_size == (tmp_path / "m.gguf").stat().st_size
    assert cache_fingerprint(other, info) != first


# --- lookup --------------------------------------------------------------------------------------


def test_lookup_finds_the_longest_saved_prefix(tmp_path: Path) -> None:
    prompt = _prompt(40)
    with _cache(_options(tmp_path)) as cache:
        for n in (10, 20, 30):
            cache.save_async(prompt[:n], f"state-{n}".encode())
        cache.flush()
        assert cache.stats.saves == 3

        def found(tokens: list[int], **kw: Any) -> int | None:
            entry = cache.lookup(tokens, **kw)
            return None if entry is None else entry.n_tokens

        assert found(prompt) == 30
        assert found(prompt[:25]) == 20
        assert found(prompt[:30]) == 20  # by default one prompt token is left to decode
        assert found(prompt[:30], max_tokens=30) == 30
        diverging = [
            *prompt[:15],
            (prompt[15] + 1 - FIRST_BYTE_ID) % 256 + FIRST_BYTE_ID,
            *prompt[16:],
        ]
        assert found(diverging) == 10
        assert found(_prompt(40, seed=8)) is None
        assert found(prompt[:5]) is None
        loaded = cache.load(cache.lookup(prompt) or pytest.fail("no hit"))
        assert loaded == (prompt[:30], b"state-30")


def test_min_tokens_is_honoured(tmp_path: Path) -> None:
    prompt = _prompt(60)
    with _cache(_options(tmp_path, min_tokens=16)) as cache:
        cache.save_async(prompt[:15], b"short")
        cache.save_async(prompt[:20], b"long enough")
        cache.flush()
        assert [p.name.split("-")[0] for p in _files(tmp_path)] == ["20"]
    with _cache(_options(tmp_path, min_tokens=32)) as cache:  # restarted with a higher minimum
        assert cache.stats.entries == 1
        assert cache.lookup(prompt) is None


# --- damaged and foreign files -------------------------------------------------------------------


def test_corrupt_payload_is_removed_on_load(tmp_path: Path) -> None:
    tokens = _prompt(20)
    with _cache(_options(tmp_path)) as cache:
        entry = _saved(cache, tokens, bytes(range(200)))
    data = bytearray(entry.path.read_bytes())
    data[-10] ^= 0xFF  # header and size still fine: only the checksum notices
    entry.path.write_bytes(bytes(data))
    with _cache(_options(tmp_path)) as cache:
        found = cache.lookup(tokens, max_tokens=20)
        assert found == entry
        assert cache.load(found) is None
        assert not entry.path.exists()
        assert cache.stats.corrupt_removed == 1 and cache.stats.entries == 0
        assert cache.lookup(tokens, max_tokens=20) is None


@pytest.mark.parametrize("damage", ["truncate", "empty", "magic", "tokens"])
def test_damaged_file_is_removed_on_scan_or_load(tmp_path: Path, damage: str) -> None:
    tokens = _prompt(20)
    with _cache(_options(tmp_path)) as cache:
        entry = _saved(cache, tokens, bytes(range(200)))
        data = bytearray(entry.path.read_bytes())
        if damage == "truncate":
            del data[-7:]
        elif damage == "empty":
            del data[:]
        elif damage == "magic":
            data[0] ^= 0xFF
        else:
            data[150] ^= 0x01  # a token id, inside the checksum too
        entry.path.write_bytes(bytes(data))
        assert cache.load(entry) is None  # the same process notices at load
        assert not entry.path.exists()
        assert cache.stats.corrupt_removed == 1
    with _cache(_options(tmp_path)) as cache:
        entry = _saved(cache, tokens, bytes(range(200)))
    entry.path.write_bytes(bytes(data))
    with _cache(_options(tmp_path)) as cache:  # a restart notices what the header shows
        if damage == "tokens":
            assert cache.load(cache.lookup(tokens, max_tokens=20) or pytest.fail("no hit")) is None
        else:
            assert cache.stats.entries == 0
        assert cache.stats.corrupt_removed == 1
        assert not entry.path.exists()


def test_file_of_another_fingerprint_is_removed(tmp_path: Path) -> None:
    tokens = _prompt(20)
    with _cache(_options(tmp_path), "model-a") as cache:
        entry = _saved(cache, tokens, b"state of a")
    with _cache(_options(tmp_path), "model-b") as cache:
        assert not entry.path.exists()
        assert cache.stats.foreign_removed == 1 and cache.stats.entries == 0
        assert cache.lookup(tokens, max_tokens=20) is None


def test_foreign_file_appearing_after_scan_is_removed_on_load(tmp_path: Path) -> None:
    tokens = _prompt(20)
    with _cache(_options(tmp_path), "model-a") as cache_a:
        entry = _saved(cache_a, tokens, b"state of a")
        with _cache(_options(tmp_path / "b"), "model-b") as cache_b:
            foreign = _saved(cache_b, tokens, b"state of b")
        os.replace(foreign.path, entry.path)
        assert cache_a.load(entry) is None
        assert cache_a.stats.foreign_removed == 1
        assert not entry.path.exists()


def test_unrelated_and_fresh_temporary_files_are_left_alone(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    fresh = tmp_path / ("1-" + "0" * 32 + ".seq.tmp-1-2")
    stale = tmp_path / ("2-" + "0" * 32 + ".seq.tmp-1-2")
    fresh.write_bytes(b"x")
    stale.write_bytes(b"x")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    with _cache(_options(tmp_path)):
        pass
    assert (tmp_path / "notes.txt").exists() and fresh.exists() and not stale.exists()


# --- size budget ---------------------------------------------------------------------------------


def test_lru_cleanup_keeps_folder_under_max_bytes(tmp_path: Path) -> None:
    a, b, c = (_prompt(20, seed=s) for s in (1, 2, 3))
    state = bytes(1000)
    with _cache(_options(tmp_path, max_bytes=10_000)) as probe:
        size = _saved(probe, a, state).path.stat().st_size
    for path in _files(tmp_path):
        path.unlink()
    options = _options(tmp_path, max_bytes=2 * size + size // 2)  # room for two entries
    with _cache(options) as cache:
        entry_a = _saved(cache, a, state)
        _saved(cache, b, state)
        assert cache.load(entry_a) is not None  # a is now more recent than b
        _saved(cache, c, state)
        assert cache.stats.evictions == 1
        assert cache.lookup(b, max_tokens=20) is None
        assert cache.lookup(a, max_tokens=20) is not None
        assert cache.stats.bytes_on_disk == 2 * size
        assert sum(p.stat().st_size for p in _files(tmp_path)) == 2 * size
    with _cache(_options(tmp_path, max_bytes=size)) as cache:  # a restart with a smaller budget
        assert cache.stats.evictions == 1 and cache.stats.entries == 1
        assert cache.lookup(c, max_tokens=20) is not None  # the most recently used one stays


def test_state_larger_than_the_budget_is_not_saved(tmp_path: Path) -> None:
    with _cache(_options(tmp_path, max_bytes=500)) as cache:
        cache.save_async(_prompt(20), bytes(1000))
        cache.flush()
        assert cache.stats.save_drops == 1 and not _files(tmp_path)


# --- background writer ---------------------------------------------------------------------------


def test_full_queue_drops_saves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entered, release = threading.Event(), threading.Event()
    with _cache(_options(tmp_path), queue_size=1) as cache:
        write = cache._write

        def slow_write(job: Any) -> None:
            entered.set()
            assert release.wait(10)
            write(job)

        monkeypatch.setattr(cache, "_write", slow_write)
        cache.save_async(_prompt(20, seed=1), b"one")
        assert entered.wait(10)  # the writer holds job one
        cache.save_async(_prompt(20, seed=2), b"two")  # queued
        cache.save_async(_prompt(20, seed=3), b"three")  # dropped
        assert cache.stats.save_drops == 1
        release.set()
        cache.flush()
        assert cache.stats.saves == 2 and len(_files(tmp_path)) == 2


def test_concurrent_saves_of_the_same_tokens_are_harmless(tmp_path: Path) -> None:
    tokens = _prompt(30)
    state = bytes(range(256)) * 40
    with _cache(_options(tmp_path)) as first, _cache(_options(tmp_path)) as second:
        start = threading.Barrier(8)

        def save(cache: DiskSequenceCache) -> None:
            start.wait()
            for _ in range(5):
                cache.save_async(tokens, state)

        threads = [threading.Thread(target=save, args=((first, second)[i % 2],)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        first.flush()
        second.flush()
        assert len(_files(tmp_path)) == 1
        assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
        assert first.stats.saves + second.stats.saves in (1, 2)  # at most one write each
    with _cache(_options(tmp_path)) as cache:
        loaded = cache.load(cache.lookup(tokens, max_tokens=30) or pytest.fail("no hit"))
        assert loaded == (tokens, state)


def test_closed_cache_ignores_saves(tmp_path: Path) -> None:
    cache = DiskSequenceCache(_options(tmp_path), "fp")
    cache.close()
    cache.save_async(_prompt(20), b"late")
    cache.flush()
    assert not _files(tmp_path) and cache.stats.saves == 0
