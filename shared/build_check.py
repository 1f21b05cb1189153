"""`python -m shared.build_check CMAKE_ARGS`: after `make` builds llama-cpp-python, say what it built and
fail when CMAKE_ARGS asked for a GPU backend that the build does not have.

A build that silently came out CPU-only (a stale wheel from pip's cache, a toolkit CMake did not find) would
otherwise only show up as a slow server; here `make install` stops with the reason instead.
"""

from __future__ import annotations

import re
import sys

# CMake switches of llama.cpp's GPU backends (ggml's GGML_<BACKEND>=ON).
_GPU_SWITCH = re.compile(r"-DGGML_(CUDA|HIP|VULKAN|METAL|SYCL|MUSA|OPENCL|CANN)=(ON|1|TRUE|YES)\b", re.I)


def wanted_gpu_backend(cmake_args: str) -> str | None:
    """The GPU backend CMAKE_ARGS switches on (e.g. `CUDA`), or None for a CPU build."""
    match = _GPU_SWITCH.search(cmake_args)
    return match.group(1).upper() if match else None


def verdict(cmake_args: str, offload: bool) -> str | None:
    """The error when the build is not what CMAKE_ARGS asked for; None when it is."""
    backend = wanted_gpu_backend(cmake_args)
    if backend and not offload:
        return (
            f"CMAKE_ARGS asks for {backend} ({cmake_args.strip()}) but the llama-cpp-python just installed "
            "has no GPU offload (llama_supports_gpu_offload is false): check the build log above for the "
            f"{backend} toolkit, and that a GPU is visible here (llama.cpp counts only devices it sees)"
        )
    return None


def main(argv: list[str]) -> int:
    import llama_cpp

    cmake_args = argv[0] if argv else ""
    offload = bool(llama_cpp.llama_supports_gpu_offload())
    gpu = "yes" if offload else "no"
    print(f"llama_cpp {llama_cpp.__version__}: GPU offload {gpu} (CMAKE_ARGS={cmake_args!r})")
    error = verdict(cmake_args, offload)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
