"""`file:` media URLs: refused unless `allowed_local_media_path` is set, then only files under it.

The path is resolved (symlinks and `..` followed) before the containment check, opened without following a
final symlink, and must be a regular file within the byte limit: a FIFO, a device or a file swapped for a
symlink after the check is refused rather than read.
"""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path
from urllib.parse import unquote, urlsplit

from router.media.policy import MediaPolicy
from router.media.types import MediaKind, MediaRefused


async def read_file_url(url: str, kind: MediaKind, policy: MediaPolicy) -> bytes:
    root = policy.allowed_local_path
    if root is None:
        raise MediaRefused("file: URLs are disabled (model.mtmd.allowed_local_media_path is not set)")
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise MediaRefused(f"file: URL names a remote host {parts.netloc!r}")
    raw = unquote(parts.path)
    if not raw.startswith("/") or "\x00" in raw:
        raise MediaRefused("file: URL must hold an absolute path")
    return await asyncio.to_thread(_read_under, Path(raw), root, policy.max_bytes(kind))


def _read_under(path: Path, root: Path, limit: int) -> bytes:
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise MediaRefused("file: URL names a file that does not exist") from None
    if not resolved.is_relative_to(root):
        raise MediaRefused("file: URL is outside model.mtmd.allowed_local_media_path")
    try:
        fd = os.open(resolved, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        raise MediaRefused("file: URL names a file that cannot be opened") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise MediaRefused("file: URL does not name a regular file")
        if info.st_size > limit:
            raise MediaRefused(f"file is {info.st_size} bytes, over the limit of {limit} bytes")
        with os.fdopen(os.dup(fd), "rb") as handle:
            data = handle.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise MediaRefused(f"file is over the limit of {limit} bytes")
    return data
