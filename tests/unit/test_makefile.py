"""The Makefile rebuilds llama-cpp-python when CMAKE_ARGS names another backend, bypassing pip's cache, and
keeps the build it has when CMAKE_ARGS is not given (dry runs with `make -n`: nothing is built)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from shared.build_check import verdict, wanted_gpu_backend

REPO = Path(__file__).resolve().parents[2]
REBUILD = "--no-cache-dir --force-reinstall --no-deps llama-cpp-python"

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def _make(venv: Path, *targets: str, cmake_args: str | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("CMAKE_ARGS", "MAKEFLAGS", "MAKELEVEL")}
    if cmake_args is not None:
        env["CMAKE_ARGS"] = cmake_args
    done = subprocess.run(
        ["make", "--no-print-directory", *targets, f"VENV={venv}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout


def _stamp(venv: Path, cmake_args: str | None) -> Path:
    return Path(_make(venv, "llama-stamp", cmake_args=cmake_args).strip())


@pytest.fixture
def venv(tmp_path: Path) -> Path:
    folder = tmp_path / "venv"
    (folder / "bin").mkdir(parents=True)
    (folder / "bin" / "python").touch()
    return folder


def _built(venv: Path, cmake_args: str | None) -> None:
    """Pretend `make install` ran with `cmake_args`: its stamps exist, newer than pyproject.toml."""
    _stamp(venv, cmake_args).touch()
    (venv / ".llamafleet-installed").touch()


def test_a_fresh_venv_builds_without_pips_cache(venv: Path) -> None:
    out = _make(venv, "-n", "install")
    assert REBUILD in out
    assert "shared.build_check ''" in out


def test_nothing_rebuilds_when_the_backend_is_unchanged(venv: Path) -> None:
    _built(venv, "")
    assert REBUILD not in _make(venv, "-n", "install")  # CMAKE_ARGS not given
    assert REBUILD not in _make(venv, "-n", "install", cmake_args="")  # the same (empty) flags


def test_a_backend_change_rebuilds_and_reinstalls(venv: Path) -> None:
    _built(venv, "")
    out = _make(venv, "-n", "install", cmake_args="-DGGML_CUDA=on")
    assert REBUILD in out
    assert "shared.build_check '-DGGML_CUDA=on'" in out
    assert "pip install --quiet -e" in out  # the project is reinstalled over the new build
    assert _stamp(venv, "-DGGML_CUDA=on") != _stamp(venv, "")


def test_a_gpu_build_is_kept_by_a_later_plain_make(venv: Path) -> None:
    """`CMAKE_ARGS=-DGGML_CUDA=on make install` then `make run`: the CUDA build stays."""
    _built(venv, "-DGGML_CUDA=on")
    assert _stamp(venv, None) == _stamp(venv, "-DGGML_CUDA=on")
    assert REBUILD not in _make(venv, "-n", "install")
    # Asking for the CPU explicitly (CMAKE_ARGS="") rebuilds for the CPU.
    assert REBUILD in _make(venv, "-n", "install", cmake_args="")


def test_a_venv_from_before_the_key_is_kept(venv: Path) -> None:
    (venv / ".llama-cpp-built").touch()
    (venv / ".llamafleet-installed").touch()
    assert REBUILD not in _make(venv, "-n", "install")
    assert REBUILD in _make(venv, "-n", "install", cmake_args="-DGGML_VULKAN=on")


@pytest.mark.parametrize(
    ("cmake_args", "backend"),
    [
        ("", None),
        ("-DGGML_CUDA=on", "CUDA"),
        ("-DGGML_NATIVE=off -DGGML_HIP=ON", "HIP"),
        ("-DGGML_CUDA=off", None),
    ],
)
def test_build_check_knows_gpu_switches(cmake_args: str, backend: str | None) -> None:
    assert wanted_gpu_backend(cmake_args) == backend
    assert (verdict(cmake_args, offload=False) is None) == (backend is None)
    assert verdict(cmake_args, offload=True) is None


def test_build_check_runs_on_this_build() -> None:
    """What `make` runs after a build: this (CPU) build passes for the CPU, fails a CUDA request."""
    import sys

    import llama_cpp

    plain = subprocess.run(
        [sys.executable, "-m", "shared.build_check", ""], cwd=REPO, capture_output=True, text=True
    )
    assert plain.returncode == 0 and "GPU offload" in plain.stdout
    cuda = subprocess.run(
        [sys.executable, "-m", "shared.build_check", "-DGGML_CUDA=on"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if llama_cpp.llama_supports_gpu_offload():
        assert cuda.returncode == 0
    else:
        assert cuda.returncode == 1 and "no GPU offload" in cuda.stderr
