"""What a llama.cpp build can run on: its backend, its devices, and whether it offloads layers at all.

A CPU-only wheel of llama-cpp-python on a GPU box serves, slowly, on the CPU without a word. (llama.cpp's
`llama_supports_gpu_offload` is true when a GPU device is registered: a GPU build on a host, or in a pod,
that sees no GPU says false too, which is just as much a reason to refuse GPU layers.) So each worker
reports the backend, the devices and how many layers it offloaded (log, `/healthz`, `/metrics`), and a config
that asks for a positive number of GPU layers on a build without GPU offload is a start-up error naming
`model.n_gpu_layers`, unless `model.allow_cpu_fallback` is true. `-1` (llama.cpp's own default: all layers,
where the build can) and unset keep working on the CPU, with a warning for an explicit `-1`: the seed's GPU
configs say `-1`, and `make run` must serve on any machine.

Devices come from ggml's backend registry (`ggml_backend_dev_*` in libggml, which llama-cpp-python loads but
does not wrap); the library is already initialised by llama.cpp, nothing here allocates on a device.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass

import llama_cpp

from shared.config import ConfigError, ModelOptions, WorkerOverride

log = logging.getLogger(__name__)

# enum ggml_backend_dev_type
_DEVICE_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel"}
_ALL_LAYERS = 0x7FFFFFFF


@dataclass(frozen=True)
class Device:
    name: str  # e.g. CPU, CUDA0, Vulkan0
    description: str
    kind: str  # cpu, gpu, igpu, accel
    memory_total: int  # bytes, 0 when the backend does not say

    def label(self) -> str:
        memory = f", {self.memory_total / 2**30:.0f} GiB" if self.memory_total else ""
        return f"{self.name} ({self.description}{memory})"


def _libggml() -> ctypes.CDLL:
    from llama_cpp import _ggml

    lib: ctypes.CDLL = _ggml.libggml
    lib.ggml_backend_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_dev_count.argtypes = []
    lib.ggml_backend_dev_get.restype = ctypes.c_void_p
    lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    for name in ("ggml_backend_dev_name", "ggml_backend_dev_description"):
        getattr(lib, name).restype = ctypes.c_char_p
        getattr(lib, name).argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_type.restype = ctypes.c_int
    lib.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_memory.restype = None
    lib.ggml_backend_dev_memory.argtypes = [
        ctypes.c_void_p,
        ctypes.POINTER(ctypes.c_size_t),
        ctypes.POINTER(ctypes.c_size_t),
    ]
    return lib


def devices() -> list[Device]:
    """Every device of the build's backends (the CPU included), as ggml's registry lists them."""
    lib = _libggml()
    found = []
    for index in range(int(lib.ggml_backend_dev_count())):
        dev = lib.ggml_backend_dev_get(index)
        if not dev:
            continue
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        found.append(
            Device(
                name=(lib.ggml_backend_dev_name(dev) or b"?").decode("utf-8", "replace"),
                description=(lib.ggml_backend_dev_description(dev) or b"").decode("utf-8", "replace"),
                kind=_DEVICE_TYPES.get(int(lib.ggml_backend_dev_type(dev)), "other"),
                memory_total=int(total.value),
            )
        )
    return found


def offload_supported() -> bool:
    return bool(llama_cpp.llama_supports_gpu_offload())


def backend_name(found: list[Device]) -> str:
    """The accelerator backend's name (`CUDA` from `CUDA0`), or `CPU`."""
    for device in found:
        if device.kind in ("gpu", "igpu"):
            return device.name.rstrip("0123456789") or device.name
    return "CPU"


def requested_gpu_layers(options: ModelOptions, override: WorkerOverride) -> int | None:
    """The worker's n_gpu_layers: its override, else the model's; None when neither sets it."""
    return override.n_gpu_layers if override.n_gpu_layers is not None else options.n_gpu_layers


def check_offload(options: ModelOptions, override: WorkerOverride, worker: str) -> None:
    """A positive n_gpu_layers on a build that cannot offload: a ConfigError naming the field, unless
    `model.allow_cpu_fallback`; `-1` (all, where possible) there is a warning only."""
    layers = requested_gpu_layers(options, override)
    if layers is None or layers == 0 or offload_supported():
        return
    field = "workers.overrides.n_gpu_layers" if override.n_gpu_layers is not None else "model.n_gpu_layers"
    rebuild = (
        "llama.cpp offloads to no GPU here (llama_supports_gpu_offload is false: a CPU build, or no GPU "
        'visible to this process); rebuild for your GPU, e.g. CMAKE_ARGS="-DGGML_CUDA=on" make install '
        "(README: GPU builds), or check CUDA_VISIBLE_DEVICES"
    )
    if layers > 0 and not options.allow_cpu_fallback:
        raise ConfigError(
            f"{field} is {layers} for {worker}, but {rebuild}, or set model.allow_cpu_fallback: true to "
            "serve on the CPU"
        )
    log.warning("%s is %d for %s, but %s; serving on the CPU", field, layers, worker, rebuild)


def offloaded_layers(requested: int | None, n_layer: int, found: list[Device]) -> int:
    """How many of the model's `n_layer` + 1 (the output layer) layers llama.cpp put on a GPU: what
    llama.cpp's load log calls `offloaded N/M layers to GPU`."""
    if not offload_supported() or not any(d.kind in ("gpu", "igpu") for d in found):
        return 0
    wanted = llama_cpp.llama_model_default_params().n_gpu_layers if requested is None else requested
    if wanted < 0:
        wanted = _ALL_LAYERS
    return min(wanted, n_layer + 1)
