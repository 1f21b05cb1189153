"""The LoRA adapters one worker has loaded, and the adapter set its llama.cpp context runs with.

Start-up adapters without a name (the seed's `model.loras`) are part of every set; named adapters join the
set of the requests that ask for them (`SubmitRequest.lora`). `apply()` calls `llama_set_adapters_lora`
before each decode, and only when the set changes (llama.cpp then re-reserves its graph). Unloading frees
an adapter with `llama_adapter_lora_free`; the caller makes sure no request still uses it.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp

from shared.lora import BASE, AdapterFileError, AdapterSet, inspect_adapter

log = logging.getLogger(__name__)


class AdapterLoadError(RuntimeError):
    """An adapter llama.cpp would not load for this model; the message names the file."""


@dataclass
class LoadedAdapter:
    name: str
    path: Path
    scale: float  # the default scale (named) or the applied one (start-up, unnamed)
    handle: Any  # llama_adapter_lora_p


class AdapterStore:
    def __init__(self, model: Any, ctx: Any, model_arch: str) -> None:
        self._model = model
        self._ctx = ctx
        self._arch = model_arch
        self.always: list[LoadedAdapter] = []  # unnamed: applied to every request
        self.named: dict[str, LoadedAdapter] = {}
        self._applied: AdapterSet | None = None  # what the context runs with now (None: never set)

    def _init(self, name: str, path: Path, scale: float) -> LoadedAdapter:
        try:
            inspect_adapter(path, self._arch)
        except AdapterFileError as error:
            raise AdapterLoadError(str(error)) from error
        handle = llama_cpp.llama_adapter_lora_init(self._model, str(path).encode())
        if not handle:
            raise AdapterLoadError(
                f"llama.cpp could not load the LoRA adapter {path}: its tensors do not fit this model "
                "or the file is incomplete (the worker log has llama.cpp's reason)"
            )
        return LoadedAdapter(name, path, scale, handle)

    def add_always(self, path: Path, scale: float) -> None:
        """A start-up adapter applied to everything (AdapterLoadError naming the file if it does not fit)."""
        self.always.append(self._init("", path, scale))
        self._applied = None

    def load(self, name: str, path: Path, scale: float = 1.0) -> None:
        """Loads a named adapter; loading a name again with the same file is a no-op."""
        existing = self.named.get(name)
        if existing is not None:
            if existing.path == path:
                return
            raise AdapterLoadError(f"an adapter named {name!r} is already loaded from {existing.path}")
        self.named[name] = self._init(name, path, scale)

    def unload(self, name: str) -> bool:
        """Frees a named adapter (no request may use it any more); False if it was not loaded."""
        adapter = self.named.pop(name, None)
        if adapter is None:
            return False
        if self._applied is not None and any(n == name for n, _ in self._applied):
            self.apply(BASE)  # the context must not point at a freed adapter
        llama_cpp.llama_adapter_lora_free(adapter.handle)
        return True

    @property
    def count(self) -> int:
        """Adapters loaded, start-up ones included."""
        return len(self.always) + len(self.named)

    def has(self, name: str) -> bool:
        return name in self.named

    def apply(self, adapters: AdapterSet) -> None:
        """Makes the context run with the start-up adapters plus `adapters` (named, with their scales)."""
        if adapters == self._applied:
            return
        chosen = [(a.handle, a.scale) for a in self.always]
        chosen += [(self.named[name].handle, scale) for name, scale in adapters]
        n = len(chosen)
        handles = (llama_cpp.llama_adapter_lora_p_ctypes * max(n, 1))(*(h for h, _ in chosen))
        scales = (ctypes.c_float * max(n, 1))(*(s for _, s in chosen))
        status = llama_cpp.llama_set_adapters_lora(self._ctx, handles, n, scales)
        if status != 0:
            raise AdapterLoadError(f"llama_set_adapters_lora failed (status {status})")
        self._applied = adapters

    def close(self) -> None:
        """Detaches every adapter from the context and frees them (before the model is freed)."""
        if self._ctx and self._applied is not None:
            llama_cpp.llama_set_adapters_lora(self._ctx, None, 0, None)
        for adapter in [*self.always, *self.named.values()]:
            llama_cpp.llama_adapter_lora_free(adapter.handle)
        self.always.clear()
        self.named.clear()
        self._applied = None
