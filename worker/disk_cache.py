"""Disk sequence cache: llama.cpp sequence states of long prompts, saved off the engine thread and
restored after a miss in memory or a worker restart, instead of prefilling again.

Every file carries a fingerprint of what shapes the state layout (model file, llama.cpp build,
context parameters), its token ids and a sha256 of both, so a state is never restored into a context
it was not made for: a file that does not validate is removed with a warning, never loaded. File
modification times are the LRU clock (a load touches its file), so workers sharing a folder agree on
what is old.

File layout (little-endian): header `_HEADER`, then `n_tokens` int32 token ids, then the state bytes
of `llama_state_seq_get_data`. Name: `<n_tokens>-<blake2b-128 of the token bytes>.seq`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import struct
import threading
import time
from bisect import insort
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from shared.config import DiskCacheOptions

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_MAGIC = b"LFSEQST\0"
# magic, format version, sha256(fingerprint), n_tokens, state size, sha256(tokens + state)
_HEADER = struct.Struct("<8sI32sIQ32s")
_SUFFIX = ".seq"
_NAME = re.compile(r"^(\d+)-([0-9a-f]{32})\.seq$")
_TMP_MARK = ".tmp-"
_STALE_TMP_SECONDS = 3600.0
_EDGE_BYTES = 1 << 20


# --- fingerprint ---------------------------------------------------------------------------------


def _file_edges_sha256(path: Path, size: int) -> str:
    """sha256 of the first and last MiB: cheaply catches a replaced file of equal size and mtime."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        digest.update(fh.read(_EDGE_BYTES))
        if size > _EDGE_BYTES:
            fh.seek(max(size - _EDGE_BYTES, _EDGE_BYTES))
            digest.update(fh.read(_EDGE_BYTES))
    return digest.hexdigest()


def _build_identity() -> dict[str, object]:
    """llama-cpp-python version, llama.cpp's system info and the shared library's size (a rebuild of
    another llama.cpp commit under the same package version changes it)."""
    lib_name = getattr(getattr(llama_cpp.llama_cpp, "_lib", None), "_name", None)
    lib_size = -1
    if isinstance(lib_name, str):
        with contextlib.suppress(OSError):
            lib_size = os.stat(lib_name).st_size
    info = llama_cpp.llama_print_system_info()
    return {
        "llama_cpp_python": getattr(llama_cpp, "__version__", "unknown"),
        "system_info": info.decode("utf-8", "replace") if info else "",
        "libllama_size": lib_size,
    }


def cache_fingerprint(model_path: Path, ctx_info: Mapping[str, object]) -> str:
    """Identity of everything a saved sequence state depends on, as a hex digest.

    `ctx_info` holds the context parameters that change the state layout (n_ctx_seq, type_k,
    type_v, swa_full, flash_attn, kv_unified, n_seq_max, ...); non-JSON values go through `str`.
    """
    stat = model_path.stat()
    identity = {
        "format": FORMAT_VERSION,
        "model": {
            "name": model_path.name,
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "edges_sha256": _file_edges_sha256(model_path, stat.st_size),
        },
        "build": _build_identity(),
        "context": {str(k): ctx_info[k] for k in ctx_info},
    }
    text = json.dumps(identity, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


# --- cache ---------------------------------------------------------------------------------------


def tokens_bytes(tokens: Sequence[int]) -> bytes:
    return np.asarray(tokens, dtype="<i4").tobytes()


def _tokens_hash(data: bytes | memoryview) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@dataclass(frozen=True)
class DiskEntry:
    """One saved sequence: `lookup` hands it out, `load` reads it."""

    path: Path
    n_tokens: int
    tokens_hash: str


@dataclass
class DiskCacheStats:
    lookups: int = 0
    hits: int = 0
    saves: int = 0
    save_drops: int = 0  # queue full, or the state alone exceeds max_bytes
    save_skips: int = 0  # already on disk or already queued
    save_errors: int = 0
    evictions: int = 0
    corrupt_removed: int = 0  # bad header, truncated, checksum mismatch
    foreign_removed: int = 0  # another fingerprint or format version
    entries: int = 0
    bytes_on_disk: int = 0


@dataclass
class _Indexed:
    entry: DiskEntry
    size: int
    stamp: int  # mtime in ns: the LRU clock


@dataclass
class _Job:
    tokens_hash: str
    token_data: bytes
    state: bytes

    @property
    def n_tokens(self) -> int:
        return len(self.token_data) // 4


class _Invalid(Exception):
    def __init__(self, reason: str, foreign: bool = False) -> None:
        super().__init__(reason)
        self.foreign = foreign


class DiskSequenceCache:
    """Index of the saved sequences in one folder plus a background writer.

    `lookup`, `has` and `save_async` are cheap and safe on the engine thread; `load` reads a whole
    file and checks its sha256, so it costs about a disk read of the state.
    """

    def __init__(
        self,
        options: DiskCacheOptions,
        fingerprint: str,
        *,
        queue_size: int = 8,
        max_pending_bytes: int = 512 << 20,
    ) -> None:
        self.options = options
        self.folder = Path(options.path).expanduser()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.fingerprint = fingerprint
        self._fp_digest = hashlib.sha256(fingerprint.encode()).digest()
        self.stats = DiskCacheStats()
        self._lock = threading.Lock()
        self._entries: dict[str, _Indexed] = {}
        self._length_counts: Counter[int] = Counter()
        self._lengths: list[int] = []  # sorted distinct n_tokens of the entries
        self._last_stamp = 0
        self._queue: deque[_Job] = deque()
        self._queued: set[str] = set()
        self._pending_bytes = 0
        self._busy = False
        self._closing = False
        self._queue_size = max(queue_size, 1)
        self._max_pending_bytes = max_pending_bytes
        self._failing = False  # the last save failed: further failures are logged quietly
        self._wake = threading.Condition(self._lock)
        self._rescan()
        self._evict_over_budget()
        self._writer = threading.Thread(target=self._run_writer, name="disk-cache-writer", daemon=True)
        self._writer.start()

    # --- engine-thread API ----------------------------------------------------------------------

    def lookup(self, prompt: Sequence[int], max_tokens: int | None = None) -> DiskEntry | None:
        """The longest saved sequence of at least `min_tokens` that is a prefix of `prompt`.

        At most `max_tokens` long; by default `len(prompt) - 1`, so at least one prompt token is
        left to decode for the logits of the first output token.
        """
        limit = len(prompt) - 1 if max_tokens is None else min(max_tokens, len(prompt))
        with self._lock:
            self.stats.lookups += 1
            lengths = [n for n in self._lengths if self.options.min_tokens <= n <= limit]
        if not lengths:
            return None
        data = memoryview(tokens_bytes(prompt[: lengths[-1]]))
        hasher = hashlib.blake2b(digest_size=16)
        done = 0
        candidates: list[str] = []
        for n in lengths:
            hasher.update(data[done * 4 : n * 4])
            done = n
            candidates.append(hasher.copy().hexdigest())
        with self._lock:
            for digest in reversed(candidates):
                found = self._entries.get(digest)
                if found is not None:
                    self.stats.hits += 1
                    return found.entry
        return None

    def has(self, tokens: Sequence[int]) -> bool:
        """Whether `tokens` is saved or queued: lets the caller skip reading its state."""
        digest = _tokens_hash(tokens_bytes(tokens))
        with self._lock:
            return digest in self._entries or digest in self._queued

    def save_async(self, tokens: Sequence[int], state: bytes) -> None:
        """Queues a save for the writer thread; drops it when the queue is full. No disk I/O."""
        if len(tokens) < self.options.min_tokens or not state:
            return
        data = tokens_bytes(tokens)
        digest = _tokens_hash(data)
        size = _HEADER.size + len(data) + len(state)
        with self._lock:
            if self._closing:
                return
            if digest in self._entries or digest in self._queued:
                self.stats.save_skips += 1
                return
            too_big = size > self.options.max_bytes
            full = len(self._queue) >= self._queue_size or (
                bool(self._queue) and self._pending_bytes + len(state) > self._max_pending_bytes
            )
            if too_big or full:
                self.stats.save_drops += 1
                return
            self._queue.append(_Job(digest, data, state))
            self._queued.add(digest)
            self._pending_bytes += len(state)
            self._wake.notify_all()

    def load(self, entry: DiskEntry) -> tuple[list[int], bytes] | None:
        """Reads and checks a saved sequence: (token ids, state), or None (a bad file is removed)."""
        try:
            with entry.path.open("rb") as fh:
                tokens, state = self._read_validated(fh, entry)
        except FileNotFoundError:
            self._forget(entry.tokens_hash)  # evicted by us or by another worker
            return None
        except _Invalid as err:
            self._discard(entry.path, str(err), foreign=err.foreign)
            return None
        except OSError as err:
            log.warning("disk cache: cannot read %s: %s", entry.path, err)
            return None
        self._touch(entry.tokens_hash, entry.path)
        return tokens, state

    # --- lifecycle ------------------------------------------------------------------------------

    def flush(self, timeout: float = 10) -> None:
        """Waits until every queued save is written (or `timeout` seconds pass)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("disk cache: %d saves still pending after flush", len(self._queue))
                    return
                self._wake.wait(left)

    def close(self, timeout: float = 10) -> None:
        """Stops accepting saves, lets the writer finish the queue (up to `timeout`) and ends it."""
        with self._lock:
            self._closing = True
            self._wake.notify_all()
        self._writer.join(timeout)

    # --- writer thread --------------------------------------------------------------------------

    def _run_writer(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closing:
                    self._wake.wait()
                if not self._queue:
                    return
                job = self._queue.popleft()
                self._busy = True
            try:
                self._write(job)
                self._rescan()
                self._evict_over_budget()
            except Exception as err:  # the writer must survive anything: a lost save only costs a prefill
                self._save_failed(f"saving {job.n_tokens} tokens failed: {err!r}")
            finally:
                with self._lock:
                    self._queued.discard(job.tokens_hash)
                    self._pending_bytes -= len(job.state)
                    self._busy = False
                    self._wake.notify_all()

    def _write(self, job: _Job) -> None:
        path = self.folder / f"{job.n_tokens}-{job.tokens_hash}{_SUFFIX}"
        with self._lock:
            known = job.tokens_hash in self._entries
        if known or path.exists():  # saved meanwhile, maybe by another worker sharing the folder
            with self._lock:
                self.stats.save_skips += 1
            return
        checksum = hashlib.sha256(job.token_data)
        checksum.update(job.state)
        header = _HEADER.pack(
            _MAGIC, FORMAT_VERSION, self._fp_digest, job.n_tokens, len(job.state), checksum.digest()
        )
        tmp = path.with_name(f"{path.name}{_TMP_MARK}{os.getpid()}-{threading.get_ident()}")
        try:
            with tmp.open("wb") as fh:
                fh.write(header)
                fh.write(job.token_data)
                fh.write(job.state)
            stamp = self._next_stamp()
            os.utime(tmp, ns=(stamp, stamp))
            os.replace(tmp, path)
        except OSError as err:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            self._save_failed(f"cannot write {path}: {err}")
            return
        size = _HEADER.size + len(job.token_data) + len(job.state)
        with self._lock:
            self._add(_Indexed(DiskEntry(path, job.n_tokens, job.tokens_hash), size, stamp))
            self.stats.saves += 1
            recovered, self._failing = self._failing, False
        if recovered:
            log.warning("disk cache: saving works again (%d saves failed)", self.stats.save_errors)

    def _save_failed(self, message: str) -> None:
        """Counts a failed save; only the first of a run of failures is a warning (a full or read-only
        disk fails every save, and the log must not fill with them), the rest are debug lines."""
        with self._lock:
            self.stats.save_errors += 1
            first, self._failing = not self._failing, True
        if first:
            log.warning(
                "disk cache: %s; serving goes on without saving, further failures are counted "
                "in llamafleet_disk_cache_save_failures_total",
                message,
            )
        else:
            log.debug("disk cache: %s", message)

    # --- folder scan, validation, eviction --------------------------------------------------------

    def _rescan(self) -> None:
        """Merges the folder into the index: files of other workers appear, vanished ones go."""
        seen: set[str] = set()
        now = time.time()
        try:
            listing = list(os.scandir(self.folder))
        except OSError as err:
            log.warning("disk cache: cannot list %s: %s", self.folder, err)
            return
        for item in listing:
            name = item.name
            if _TMP_MARK in name and name.split(_TMP_MARK)[0].endswith(_SUFFIX):
                self._remove_stale_tmp(item, now)
                continue
            match = _NAME.match(name)
            if match is None:
                continue
            digest = match.group(2)
            seen.add(digest)
            try:
                stat = item.stat()
            except OSError:
                continue
            with self._lock:
                known = self._entries.get(digest)
                if known is not None:
                    known.stamp = max(known.stamp, stat.st_mtime_ns)
                    continue
            self._index_file(Path(item.path), int(match.group(1)), digest, stat)
        with self._lock:
            for digest in [d for d in self._entries if d not in seen]:
                self._drop(digest)

    def _index_file(self, path: Path, n_tokens: int, digest: str, stat: os.stat_result) -> None:
        """Checks a file's header and size (the checksum waits for `load`) and indexes it."""
        try:
            with path.open("rb") as fh:
                raw = fh.read(_HEADER.size)
            self._check_header(raw, n_tokens, stat.st_size)
        except FileNotFoundError:
            return
        except _Invalid as err:
            self._discard(path, str(err), foreign=err.foreign)
            return
        except OSError as err:
            log.warning("disk cache: cannot read %s: %s", path, err)
            return
        with self._lock:
            self._last_stamp = max(self._last_stamp, stat.st_mtime_ns)
            self._add(_Indexed(DiskEntry(path, n_tokens, digest), stat.st_size, stat.st_mtime_ns))

    def _check_header(self, raw: bytes, n_tokens: int, file_size: int) -> tuple[int, bytes]:
        """Checks a header against the file name and size; returns (state size, payload sha256)."""
        if len(raw) < _HEADER.size:
            raise _Invalid("truncated header")
        magic, version, fp_digest, n, state_size, checksum = _HEADER.unpack(raw)
        if magic != _MAGIC:
            raise _Invalid("bad magic")
        if version != FORMAT_VERSION:
            raise _Invalid(f"format version {version}", foreign=True)
        if fp_digest != self._fp_digest:
            raise _Invalid("saved by another model, build or context configuration", foreign=True)
        if n != n_tokens:
            raise _Invalid(f"header says {n} tokens, name says {n_tokens}")
        expected = _HEADER.size + 4 * n + state_size
        if file_size != expected:
            raise _Invalid(f"size {file_size}, expected {expected}")
        return int(state_size), bytes(checksum)

    def _read_validated(self, fh: Any, entry: DiskEntry) -> tuple[list[int], bytes]:
        raw = fh.read(_HEADER.size)
        file_size = os.fstat(fh.fileno()).st_size
        state_size, checksum = self._check_header(raw, entry.n_tokens, file_size)
        token_data = fh.read(4 * entry.n_tokens)
        state = fh.read(state_size)
        if len(token_data) != 4 * entry.n_tokens or len(state) != state_size or fh.read(1):
            raise _Invalid("size changed while reading")
        actual = hashlib.sha256(token_data)
        actual.update(state)
        if actual.digest() != checksum:
            raise _Invalid("checksum mismatch")
        if _tokens_hash(token_data) != entry.tokens_hash:
            raise _Invalid("tokens do not match the file name")
        return np.frombuffer(token_data, dtype="<i4").tolist(), state

    def _evict_over_budget(self) -> None:
        """Removes least recently used files until the folder's entries fit in max_bytes."""
        with self._lock:
            total = sum(item.size for item in self._entries.values())
            if total <= self.options.max_bytes:
                return
            victims: list[_Indexed] = []
            for item in sorted(self._entries.values(), key=lambda i: i.stamp):
                if total <= self.options.max_bytes:
                    break
                victims.append(item)
                total -= item.size
                self._drop(item.entry.tokens_hash)
                self.stats.evictions += 1
        for item in victims:
            try:
                item.entry.path.unlink(missing_ok=True)
            except OSError as err:
                log.warning("disk cache: cannot remove %s: %s", item.entry.path, err)

    def _remove_stale_tmp(self, item: os.DirEntry[str], now: float) -> None:
        """A temporary file left by a crashed writer; a recent one may still be in use elsewhere."""
        try:
            if now - item.stat().st_mtime > _STALE_TMP_SECONDS:
                os.unlink(item.path)
        except OSError:
            pass

    # --- index bookkeeping (callers hold no lock unless named so) ---------------------------------

    def _next_stamp(self) -> int:
        """A strictly increasing wall-clock ns stamp: the LRU order is exact within one process."""
        with self._lock:
            self._last_stamp = max(time.time_ns(), self._last_stamp + 1)
            return self._last_stamp

    def _touch(self, digest: str, path: Path) -> None:
        stamp = self._next_stamp()
        try:
            os.utime(path, ns=(stamp, stamp))
        except OSError:
            return
        with self._lock:
            item = self._entries.get(digest)
            if item is not None:
                item.stamp = stamp

    def _discard(self, path: Path, reason: str, *, foreign: bool) -> None:
        log.warning("disk cache: removing %s: %s", path, reason)
        try:
            path.unlink(missing_ok=True)
        except OSError as err:
            log.warning("disk cache: cannot remove %s: %s", path, err)
        match = _NAME.match(path.name)
        with self._lock:
            if foreign:
                self.stats.foreign_removed += 1
            else:
                self.stats.corrupt_removed += 1
            if match is not None:
                self._drop(match.group(2))

    def _forget(self, digest: str) -> None:
        with self._lock:
            self._drop(digest)

    def _add(self, item: _Indexed) -> None:
        """Lock held."""
        digest = item.entry.tokens_hash
        if digest in self._entries:
            self._drop(digest)
        self._entries[digest] = item
        n = item.entry.n_tokens
        if self._length_counts[n] == 0:
            insort(self._lengths, n)
        self._length_counts[n] += 1
        self.stats.entries += 1
        self.stats.bytes_on_disk += item.size

    def _drop(self, digest: str) -> None:
        """Lock held."""
        item = self._entries.pop(digest, None)
        if item is None:
            return
        n = item.entry.n_tokens
        self._length_counts[n] -= 1
        if self._length_counts[n] <= 0:
            del self._length_counts[n]
            self._lengths.remove(n)
        self.stats.entries -= 1
        self.stats.bytes_on_disk -= item.size
