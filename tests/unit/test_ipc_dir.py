"""The ipc socket folder: created private whatever the umask, refused when others own it or may write it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from shared.ipc import IpcDirError, IpcSockets, check_worker_endpoints, ensure_private_dir


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_created_private_under_umask_000(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        assert ensure_private_dir(tmp_path / "llamafleet-1", tighten=True)
        check_worker_endpoints([f"ipc://{tmp_path}/w/requests.sock", "tcp://127.0.0.1:1"])
    finally:
        os.umask(old)
    assert mode(tmp_path / "llamafleet-1") == 0o700
    assert mode(tmp_path / "w") == 0o700


@pytest.mark.parametrize("loose", [0o777, 0o770, 0o702, 0o1777])
def test_writable_by_others_is_refused(tmp_path: Path, loose: int) -> None:
    folder = tmp_path / "llamafleet-2"
    folder.mkdir()
    os.chmod(folder, loose)
    with pytest.raises(IpcDirError, match="writable by other users"):
        ensure_private_dir(folder, tighten=True)
    with pytest.raises(IpcDirError):
        check_worker_endpoints([f"ipc://{folder}/requests.sock"])
    assert mode(folder) == loose  # left as it was: we do not adopt a folder others could have filled


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "llamafleet-3"
    folder.mkdir(mode=0o700)
    os.chown(folder, 65534, 65534)
    with pytest.raises(IpcDirError, match="belongs to another user"):
        ensure_private_dir(folder, tighten=True)


def test_symlink_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir(mode=0o700)
    (tmp_path / "llamafleet-4").symlink_to(target)
    with pytest.raises(IpcDirError, match="link or a file"):
        ensure_private_dir(tmp_path / "llamafleet-4", tighten=True)


def test_readable_default_folder_is_tightened_explicit_one_kept(tmp_path: Path) -> None:
    default, explicit = tmp_path / "llamafleet-5", tmp_path / "run"
    for folder in (default, explicit):
        folder.mkdir()
        os.chmod(folder, 0o750)
    assert not ensure_private_dir(default, tighten=True)
    assert not ensure_private_dir(explicit, tighten=False)
    assert mode(default) == 0o700 and mode(explicit) == 0o750


def test_sockets_object_removes_what_it_created(tmp_path: Path) -> None:
    default = tmp_path / "llamafleet-6"
    sockets = IpcSockets([f"ipc://{default}/requests.sock", f"ipc://{default}/results.sock"], default)
    sockets.check()  # nothing there yet: fine
    sockets.prepare()
    for file in sockets.files:
        file.write_text("")
        os.chmod(file, 0o666)
    sockets.secure()
    assert all(mode(f) == 0o600 for f in sockets.files)
    sockets.remove()
    assert not default.exists()
    # A folder of the user's choosing that was there before is left, only our sockets go.
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o700)
    (mine / "other-file").write_text("")
    sockets = IpcSockets([f"ipc://{mine}/req.sock"], default)
    sockets.prepare()
    (mine / "req.sock").write_text("")
    sockets.remove()
    assert sorted(p.name for p in mine.iterdir()) == ["other-file"]
