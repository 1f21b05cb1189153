"""The folder of the ipc:// sockets between router and workers: private to our user, removed at shutdown.

A unix socket is reachable by whoever can write to it and search its folder, and whoever can write to the
folder can swap the socket for their own. So before binding (router) or connecting (worker) we make sure the
folder is ours and not writable by anyone else:

- missing: created 0700 (whatever the umask);
- a symlink, not a folder, owned by another user, or writable by group or others: refused with an error
  that names the folder (another user may have planted it; we cannot safely reuse or remove it);
- the default folder (`$XDG_RUNTIME_DIR/llamafleet-<port>` or `/tmp/llamafleet-<port>`) readable by group or
  others but not writable (left by an older version under a lax umask): tightened to 0700, since nobody
  else could have put anything in it. A folder named in the config explicitly is used as it is (e.g.
  systemd's 0750 RuntimeDirectory).

The router also makes its socket files 0600 after binding and, at shutdown, removes them and the folder
when it created it or it is the default folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from pathlib import Path

from shared.config import ConfigError

log = logging.getLogger(__name__)


class IpcDirError(ConfigError):
    """The ipc folder is not safe to use."""


def socket_path(endpoint: str) -> Path | None:
    """The file of an ipc:// endpoint, None for other transports."""
    return Path(endpoint[len("ipc://") :]) if endpoint.startswith("ipc://") else None


def _describe(path: Path, info: os.stat_result) -> str:
    return f"owner uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):04o}"


def ensure_private_dir(path: Path, *, tighten: bool) -> bool:
    """Creates `path` 0700 or checks that it is safe (see the module docstring); True if created here.

    `tighten`: a folder of ours that others may read but not write is chmod-ed to 0700."""
    created = False
    with contextlib.suppress(FileExistsError):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir(mode=0o700)
        os.chmod(path, 0o700)  # the umask can only have removed bits; make sure of the rest
        created = True
    check_dir(path, tighten=tighten)
    return created


def check_dir(path: Path, *, tighten: bool = False) -> None:
    """Refuses an existing folder that others could write to (see the module docstring)."""
    info = path.lstat()
    uid = os.geteuid()
    fix = "remove it (or point XDG_RUNTIME_DIR / workers.*_endpoint elsewhere) and start again"
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise IpcDirError(f"the ipc socket folder {path} is not a folder but a link or a file: {fix}")
    if info.st_uid != uid:
        raise IpcDirError(
            f"the ipc socket folder {path} belongs to another user ({_describe(path, info)}; we are uid "
            f"{uid}), who could swap the sockets: {fix}"
        )
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o022:
        raise IpcDirError(
            f"the ipc socket folder {path} is writable by other users ({_describe(path, info)}), "
            f"who could swap the sockets: {fix}"
        )
    if mode & 0o077 and tighten:
        log.warning("the ipc socket folder %s had mode %04o: tightened to 0700", path, mode)
        os.chmod(path, 0o700)


class IpcSockets:
    """The router's ipc socket files and their folders: prepared before binding, removed at close."""

    def __init__(self, endpoints: list[str], default_dir: Path) -> None:
        self.files = [p for p in (socket_path(e) for e in endpoints) if p is not None]
        self.default_dir = default_dir
        self._remove_dirs: set[Path] = set()

    def check(self) -> None:
        """At start-up, before anything is created: an unsafe folder that exists already is refused."""
        for folder in {f.parent for f in self.files}:
            if os.path.lexists(folder):
                check_dir(folder)

    def prepare(self) -> None:
        """Before binding: every socket folder private (created if missing)."""
        for folder in {f.parent for f in self.files}:
            is_default = folder == self.default_dir
            if ensure_private_dir(folder, tighten=is_default) or is_default:
                self._remove_dirs.add(folder)

    def secure(self) -> None:
        """After binding: socket files 0600, so that even a lax umask leaves them ours alone."""
        for file in self.files:
            os.chmod(file, 0o600)

    def remove(self) -> None:
        """At close: socket files, then the folders we created (or the default one) if now empty."""
        for file in self.files:
            with contextlib.suppress(FileNotFoundError):
                file.unlink()
        for folder in self._remove_dirs:
            try:
                folder.rmdir()
            except OSError as error:  # not empty: something else lives there, leave it
                log.info("left the ipc folder %s in place: %s", folder, error)
        self._remove_dirs.clear()


def check_worker_endpoints(endpoints: list[str]) -> None:
    """A worker's side: the folders it connects into are private too (created 0700 if missing)."""
    for folder in {p.parent for p in (socket_path(e) for e in endpoints) if p is not None}:
        ensure_private_dir(folder, tighten=False)
