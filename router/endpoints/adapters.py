"""POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's names and fields), behind the API key.

Off unless `model.lora_runtime_dir` names the folder adapters may be loaded from (404 otherwise, as for an
unknown route). A load checks the path (inside that folder once symlinks are resolved, an existing GGUF
LoRA adapter for the model's architecture) before any worker sees it, then every ready worker loads it;
if one fails, the others unload it again and the call is a 400 with the worker's reason. An unload makes
the name unknown to new requests at once and answers when every worker has freed the adapter, which each
does once its requests using it have finished.
"""

from __future__ import annotations

import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from router.api.errors import APIError
from router.client.adapters import CatalogEntry
from router.state import ServerState
from shared.lora import AdapterFileError, inspect_adapter, read_gguf_strings
from shared.models import resolve_model_path
from shared.protocol import LoadAdapter, UnloadAdapter

# How long a worker may take to load an adapter, and to finish the requests using one being unloaded.
LOAD_TIMEOUT_SECONDS = 60.0
UNLOAD_TIMEOUT_SECONDS = 600.0


class LoadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:/-]+$")
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: str = Field(min_length=1, max_length=128)
    lora_int_id: int | None = None  # vLLM's; ignored


def _runtime_dir(state: ServerState) -> Path:
    folder = state.config.model.lora_runtime_dir
    if folder is None:
        raise APIError(
            404,
            "loading LoRA adapters at run time is off (set model.lora_runtime_dir)",
            "not_found_error",
            code="lora_runtime_off",
        )
    return Path(folder).expanduser().resolve()


def _model_arch(state: ServerState) -> str:
    meta = read_gguf_strings(resolve_model_path(state.config.model), {"general.architecture"})
    return str(meta.get("general.architecture", ""))


def _check_path(state: ServerState, raw: str, folder: Path) -> Path:
    path = Path(raw).expanduser()
    if not path.is_absolute():
        path = folder / path
    path = path.resolve()
    if not path.is_relative_to(folder):
        raise APIError(
            400, f"lora_path must be inside {folder}", param="lora_path", code="lora_path_not_allowed"
        )
    try:
        inspect_adapter(path, _model_arch(state))
    except AdapterFileError as error:
        raise APIError(400, str(error), param="lora_path", code="invalid_lora_adapter") from error
    return path


async def load_lora_adapter(state: ServerState, body: LoadLoraRequest) -> dict[str, str]:
    folder = _runtime_dir(state)
    name = body.lora_name
    if name == state.model_name:
        raise APIError(400, f"{name!r} is the base model's name", param="lora_name")
    if name in state.adapters.entries:
        raise APIError(400, f"a LoRA adapter named {name!r} is already loaded", param="lora_name")
    path = _check_path(state, body.lora_path, folder)
    if not state.dispatcher.up_workers():
        raise APIError(503, "no worker is ready yet", "worker_unavailable", code="worker_unavailable")
    entry = CatalogEntry(name, str(path), 1.0, int(time.time()), runtime=True, unloading=True)
    state.adapters.entries[name] = entry  # reserved (unknown to requests) while the workers load it
    replies = await state.dispatcher.adapter_broadcast(LoadAdapter(name, str(path)), LOAD_TIMEOUT_SECONDS)
    failed = [r for r in replies.values() if r is None or not r.ok]
    if failed:
        await state.dispatcher.adapter_broadcast(UnloadAdapter(name), LOAD_TIMEOUT_SECONDS)
        del state.adapters.entries[name]
        reason = next((r.message for r in failed if r is not None), "a worker did not answer in time")
        raise APIError(400, f"the workers could not load {path}: {reason}", param="lora_path")
    entry.unloading = False
    return {"status": "ok", "message": f"LoRA adapter {name!r} loaded from {path}"}


async def unload_lora_adapter(state: ServerState, body: UnloadLoraRequest) -> dict[str, str]:
    _runtime_dir(state)
    entry = state.adapters.entries.get(body.lora_name)
    if entry is None or entry.unloading:
        raise APIError(
            404, f"no LoRA adapter named {body.lora_name!r} is loaded", "not_found_error", param="lora_name"
        )
    entry.unloading = True  # new requests for it are 404 from now on
    replies = await state.dispatcher.adapter_broadcast(UnloadAdapter(entry.name), UNLOAD_TIMEOUT_SECONDS)
    del state.adapters.entries[entry.name]
    late = [index for index, reply in replies.items() if reply is None]
    note = f" (workers {late} did not confirm)" if late else ""
    return {"status": "ok", "message": f"LoRA adapter {entry.name!r} unloaded{note}"}
