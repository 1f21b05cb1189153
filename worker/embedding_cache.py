"""An on-disk cache of media embeddings (`model.mtmd.embedding_cache`), so a restarted worker, or a second
request with the same image, skips the projector.

One file per entry, named by the media hash and the projector identity; a header carries the shape and a
SHA-256 of the payload, so a torn or corrupt file is detected, removed and logged rather than fed to the
model. Entries are written to a temporary name and renamed into place; reading one touches its mtime, and
the oldest are evicted while the folder is over `max_bytes`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import struct
from pathlib import Path

import numpy as np
import numpy.typing as npt

log = logging.getLogger(__name__)

_MAGIC = b"LFEMB01\n"
_HEADER = struct.Struct("<8sII32s")
_SUFFIX = ".emb"


class EmbeddingCache:
    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        path.mkdir(parents=True, exist_ok=True)
        self.corrupt_removed = 0
        self.bytes = sum(p.stat().st_size for p in path.glob(f"*{_SUFFIX}"))

    def _file(self, key: str) -> Path:
        safe = "".join(c for c in key if c.isalnum() or c == "-")
        return self.path / f"{safe}{_SUFFIX}"

    def get(self, key: str, n_tokens: int, n_embd: int) -> npt.NDArray[np.float32] | None:
        file = self._file(key)
        try:
            raw = file.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as error:
            log.warning("embedding cache: cannot read %s: %s", file, error)
            return None
        payload = raw[_HEADER.size :]
        ok = len(raw) >= _HEADER.size
        if ok:
            magic, rows, cols, digest = _HEADER.unpack_from(raw)
            ok = (
                magic == _MAGIC
                and (rows, cols) == (n_tokens, n_embd)
                and len(payload) == rows * cols * 4
                and hashlib.sha256(payload).digest() == digest
            )
        if not ok:
            log.warning("embedding cache: removing corrupt entry %s", file)
            self._remove(file)
            self.corrupt_removed += 1
            return None
        with contextlib.suppress(OSError):
            os.utime(file)
        return np.frombuffer(payload, dtype=np.float32).reshape(n_tokens, n_embd).copy()

    def put(self, key: str, array: npt.NDArray[np.float32]) -> None:
        payload = np.ascontiguousarray(array, dtype=np.float32).tobytes()
        size = _HEADER.size + len(payload)
        if size > self.max_bytes:
            return
        file = self._file(key)
        tmp = file.with_suffix(f".tmp{os.getpid()}")
        try:
            header = _HEADER.pack(_MAGIC, array.shape[0], array.shape[1], hashlib.sha256(payload).digest())
            tmp.write_bytes(header + payload)
            old = file.stat().st_size if file.exists() else 0
            os.replace(tmp, file)
            self.bytes += size - old
        except OSError as error:
            log.warning("embedding cache: cannot write %s: %s", file, error)
            tmp.unlink(missing_ok=True)
            return
        self._evict()

    def _remove(self, file: Path) -> None:
        try:
            size = file.stat().st_size
            file.unlink()
            self.bytes -= size
        except OSError:
            pass

    def _evict(self) -> None:
        if self.bytes <= self.max_bytes:
            return
        entries = []
        for file in self.path.glob(f"*{_SUFFIX}"):
            try:
                entries.append((file.stat().st_mtime, file))
            except OSError:
                continue
        for _, file in sorted(entries):
            if self.bytes <= self.max_bytes:
                break
            self._remove(file)
