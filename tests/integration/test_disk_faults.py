"""The disk cache on a full or read-only disk: saves fail with one warning and a metric, serving goes on.

Real conditions, not injection: the cache folder is a tiny tmpfs filled to the last byte, or a tmpfs
remounted read-only (tests run as root, where a 0555 folder would not stop writes). Skipped where the test
may not mount.
"""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.server import Server, model_config, run_server
from tests.integration.test_prefix_cache import long_text


@contextlib.contextmanager
def _tmpfs(mode: str) -> Iterator[Path]:
    """A 64 KiB tmpfs made `full` (a file takes every free byte) or `readonly` (remounted ro)."""
    mount = Path(tempfile.mkdtemp(prefix="lf-disk-"))
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True, check=False
    )
    if done.returncode != 0:
        mount.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        (mount / "seq").mkdir()
        if mode == "full":
            with contextlib.suppress(OSError), (mount / "filler").open("wb") as fh:
                while True:
                    fh.write(b"\0" * 4096)
                    fh.flush()
        else:
            subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        yield mount / "seq"
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
        mount.rmdir()


def _generate(server: Server, salt: int) -> None:
    with server.http() as http:
        reply = http.post(
            "/v1/completions",
            json={"prompt": long_text(80, salt), "max_tokens": 4, "temperature": 0, "ignore_eos": True},
        )
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize("mode", ["full", "readonly"])
def test_disk_cache_save_failures_warn_once_and_serving_goes_on(tiny_llama_gguf: Path, mode: str) -> None:
    with _tmpfs(mode) as folder:
        disk = {"disk_cache": {"path": str(folder), "max_bytes": 64 << 20, "min_tokens": 16}}
        model = model_config(tiny_llama_gguf, n_ctx=1024, flash_attn=False)
        with run_server(model, extra=disk) as server:
            for salt in range(3):
                _generate(server, salt)
            server.wait_metric('llamafleet_disk_cache_save_failures_total{worker="0"}', 3)
            assert server.metrics()['llamafleet_disk_cache_saves_total{worker="0"}'] == 0
            _generate(server, 0)  # still serving
            warnings = [line for line in server.log().splitlines() if "disk cache:" in line]
        assert list(folder.glob("*.seq")) == []
    assert len(warnings) == 1, warnings


def test_a_disk_cache_folder_that_cannot_be_created_disables_the_tier(tiny_llama_gguf: Path) -> None:
    with _tmpfs("readonly") as folder:
        disk = {"disk_cache": {"path": str(folder / "absent"), "max_bytes": 64 << 20, "min_tokens": 16}}
        with run_server(model_config(tiny_llama_gguf, n_ctx=1024), extra=disk) as server:
            _generate(server, 0)
            assert "disk cache disabled" in server.log()
