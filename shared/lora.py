"""LoRA adapter files and adapter sets, without llama.cpp: what the router checks before a worker loads one.

llama.cpp's `llama_adapter_lora_init` answers a bad file with NULL and a log line; checking the GGUF header
here first (exists, is a GGUF, `general.type` is `adapter`, `adapter.type` is `lora`, the base model's
architecture) turns most mistakes into a clear message naming the file. Shapes that do not fit the model
are still found only by llama.cpp (the worker reports that as a load failure).

An adapter *set* is what one llama.cpp context runs with: a tuple of (name, scale), empty for the base
model. Start-up adapters without a name are applied by every worker to everything and are not part of it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from shared.config import LoraOptions, ModelOptions

AdapterSet = tuple[tuple[str, float], ...]
BASE: AdapterSet = ()


def adapter_set(name: str, scale: float) -> AdapterSet:
    """The set a request runs with: the base model for no name or scale 0 (llama.cpp skips zero scales)."""
    return ((name, scale),) if name and scale != 0.0 else BASE


class AdapterFileError(ValueError):
    """A file that is not a LoRA adapter this model can load; the message names the file."""


@dataclass(frozen=True)
class AdapterFile:
    path: Path
    arch: str


_GGUF_MAGIC = b"GGUF"
# GGUF value types: 8 is a string, 9 an array; the rest are fixed-size scalars.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_MAX_KV = 1 << 16
# Bytes per element of the tensor types adapters use (F32, F16, BF16); others are checked by llama.cpp.
_TYPE_BYTES = {0: 4, 1: 2, 30: 2}
_MAX_STRING = 1 << 20


def _read(handle: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize("<" + fmt)
    data = handle.read(size)
    if len(data) != size:
        raise EOFError
    return struct.unpack("<" + fmt, data)[0]


def _read_string(handle: BinaryIO) -> str:
    length = _read(handle, "Q")
    if length > _MAX_STRING:
        raise ValueError("string too long")
    data = handle.read(length)
    if len(data) != length:
        raise EOFError
    return data.decode("utf-8", "replace")


def _read_value(handle: BinaryIO, vtype: int) -> Any:
    if vtype == _STRING:
        return _read_string(handle)
    if vtype == _ARRAY:
        sub, count = _read(handle, "I"), _read(handle, "Q")
        if sub in (_STRING, _ARRAY):
            for _ in range(count):
                _read_value(handle, sub)
            return None
        if sub not in _SCALARS:
            raise ValueError(f"unknown GGUF type {sub}")
        handle.seek(struct.calcsize("<" + _SCALARS[sub]) * count, 1)
        return None
    if vtype not in _SCALARS:
        raise ValueError(f"unknown GGUF type {vtype}")
    return _read(handle, _SCALARS[vtype])


def read_gguf(
    path: Path, keys: set[str], tensors: bool = False
) -> tuple[dict[str, Any], dict[str, list[int]]]:
    """The values of `keys` in a GGUF file's metadata and, with `tensors`, every tensor's dims (GGUF
    order: ne0 first). Raises ValueError / EOFError / OSError for a file that is not one."""
    found: dict[str, Any] = {}
    dims: dict[str, list[int]] = {}
    ends: list[int] = []  # each tensor's end relative to the data section (lower bound for other types)
    with path.open("rb") as handle:
        if handle.read(4) != _GGUF_MAGIC:
            raise ValueError("not a GGUF file")
        _read(handle, "I")  # version
        n_tensors = _read(handle, "Q")
        n_kv = _read(handle, "Q")
        if n_kv > _MAX_KV or n_tensors > _MAX_KV:
            raise ValueError("implausible metadata or tensor count")
        for _ in range(n_kv):
            key = _read_string(handle)
            value = _read_value(handle, _read(handle, "I"))
            if key in keys or key == "general.alignment":
                found[key] = value
        for _ in range(n_tensors if tensors else 0):
            name = _read_string(handle)
            n_dims = _read(handle, "I")
            if n_dims > 8:
                raise ValueError("implausible tensor rank")
            dims[name] = [_read(handle, "Q") for _ in range(n_dims)]
            ggml_type = _read(handle, "I")
            elements = 1
            for d in dims[name]:
                elements *= d
            ends.append(_read(handle, "Q") + elements * _TYPE_BYTES.get(ggml_type, 0))
        if tensors and ends:
            alignment = int(found.get("general.alignment") or 32)
            data_start = -(-handle.tell() // alignment) * alignment
            if data_start + max(ends) > path.stat().st_size:
                raise ValueError("the file is shorter than its tensors (truncated or corrupt)")
    return found, dims


def read_gguf_strings(path: Path, keys: set[str]) -> dict[str, Any]:
    """The values of `keys` in a GGUF file's metadata."""
    return read_gguf(path, keys)[0]


def check_adapter_shapes(adapter: Path, model: Path) -> None:
    """Every `<w>.lora_a` / `<w>.lora_b` pair fits the model's weight `<w>` (AdapterFileError if not)."""
    try:
        _, lora = read_gguf(adapter, set(), tensors=True)
        _, weights = read_gguf(model, set(), tensors=True)
    except (OSError, ValueError, EOFError, struct.error) as error:
        raise AdapterFileError(f"cannot read the tensors of {adapter} or of the model: {error}") from error
    for name, a in lora.items():
        if not name.endswith(".lora_a"):
            continue
        target = name.removesuffix(".lora_a")
        b = lora.get(target + ".lora_b")
        w = weights.get(target)
        if b is None or w is None:
            raise AdapterFileError(
                f"the LoRA adapter {adapter} adapts {target}, which the model does not have"
            )
        if len(a) < 2 or len(b) < 2 or a[0] != w[0] or b[1] != w[1] or a[1] != b[0]:
            raise AdapterFileError(
                f"the LoRA adapter {adapter} does not fit the model: {target} is {w[:2]}, "
                f"lora_a {a[:2]}, lora_b {b[:2]} (GGUF dims)"
            )


def inspect_adapter(path: Path, model_arch: str | None = None) -> AdapterFile:
    """Checks that `path` is a GGUF LoRA adapter (for `model_arch` when given); AdapterFileError if not."""
    if not path.exists():
        raise AdapterFileError(f"the LoRA adapter {path} does not exist")
    if not path.is_file():
        raise AdapterFileError(f"the LoRA adapter {path} is not a file")
    try:
        meta, _ = read_gguf(path, {"general.type", "general.architecture", "adapter.type"}, tensors=True)
    except (OSError, ValueError, EOFError, struct.error) as error:
        raise AdapterFileError(f"the LoRA adapter {path} is not a readable GGUF file ({error})") from error
    if meta.get("general.type") != "adapter" or meta.get("adapter.type") != "lora":
        raise AdapterFileError(
            f"{path} is not a LoRA adapter (general.type={meta.get('general.type')!r}, "
            f"adapter.type={meta.get('adapter.type')!r})"
        )
    arch = str(meta.get("general.architecture", ""))
    if model_arch is not None and arch != model_arch:
        raise AdapterFileError(
            f"the LoRA adapter {path} is for architecture {arch!r}, the model is {model_arch!r}"
        )
    return AdapterFile(path, arch)


def resolve_lora_path(options: LoraOptions) -> Path:
    """A config entry's local file: its `path`, or the hub file `from_pretrained` names (downloaded once)."""
    if options.path is not None:
        return Path(options.path).expanduser()
    from shared.models import resolve_from_pretrained  # the hub client only when it is needed

    assert options.from_pretrained is not None
    return resolve_from_pretrained(options.from_pretrained)


def check_config_loras(options: ModelOptions, model_path: Path | None) -> None:
    """Start-up check of the config's local adapter files against the model (AdapterFileError naming the
    entry and the file); hub adapters are checked by the workers when they load them."""
    arch = None
    if model_path is not None:
        arch = str(read_gguf_strings(model_path, {"general.architecture"}).get("general.architecture", ""))
    for index, lora in enumerate(options.loras):
        if lora.path is None:
            continue
        path = Path(lora.path).expanduser()
        try:
            inspect_adapter(path, arch)
            if model_path is not None:
                check_adapter_shapes(path, model_path)
        except AdapterFileError as error:
            raise AdapterFileError(f"model.loras[{index}]: {error}") from error
