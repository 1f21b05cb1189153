"""The named LoRA adapters the router serves as models: from the config, and loaded at run time.

A named adapter is a model id of its own (`/v1/models` lists it with the base alias as `parent`); a request
whose `model` is that name runs the base model plus the adapter, at its configured scale or at the
request's `lora_scale` (0 to `model.lora_max_scale`). An adapter being unloaded is already unknown to new
requests (404), while the ones in flight finish on the workers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from router.api.errors import APIError
from shared.config import ModelOptions


@dataclass
class CatalogEntry:
    name: str
    path: str
    scale: float
    created: int
    runtime: bool  # loaded through POST /v1/load_lora_adapter (re-sent to workers that restart)
    unloading: bool = False


class AdapterCatalog:
    def __init__(self, options: ModelOptions, base: str, created: int) -> None:
        self.base = base
        self.max_scale = options.lora_max_scale
        self.entries: dict[str, CatalogEntry] = {}
        for lora in options.loras:
            if lora.name is None:
                continue
            if lora.path is not None:
                path = lora.path
            else:
                assert lora.from_pretrained is not None
                path = f"{lora.from_pretrained.repo_id}/{lora.from_pretrained.filename}"
            self.entries[lora.name] = CatalogEntry(lora.name, path, lora.scale, created, runtime=False)

    def knows(self, model: str) -> bool:
        entry = self.entries.get(model)
        return entry is not None and not entry.unloading

    def resolve(self, model: str | None, scale: float | None) -> tuple[str, float]:
        """(adapter name, scale) for a request's `model` and `lora_scale`; ("", 0) for the base model."""
        if not model or model == self.base:
            if scale is not None:
                raise APIError(
                    400, "lora_scale applies only to a LoRA adapter's model name", param="lora_scale"
                )
            return "", 0.0
        entry = self.entries.get(model)
        if entry is None or entry.unloading:
            raise APIError(
                404,
                f"the model {model!r} does not exist; this server serves {self.base!r}"
                + (f" and the LoRA adapters {sorted(self.names())}" if self.names() else ""),
                "not_found_error",
                param="model",
                code="model_not_found",
            )
        if scale is None:
            return entry.name, entry.scale
        if not 0.0 <= scale <= self.max_scale:
            raise APIError(400, f"lora_scale must be between 0 and {self.max_scale}", param="lora_scale")
        return entry.name, scale

    def names(self) -> list[str]:
        return [name for name, entry in self.entries.items() if not entry.unloading]

    def runtime_paths(self) -> dict[str, str]:
        """Adapters loaded at run time, which a restarted worker must load again."""
        return {e.name: e.path for e in self.entries.values() if e.runtime and not e.unloading}

    def cards(self) -> list[dict[str, Any]]:
        """/v1/models entries, as vLLM writes them for LoRA modules (`parent`, `root`)."""
        return [
            {
                "id": e.name,
                "object": "model",
                "created": e.created,
                "owned_by": "llamafleet",
                "parent": self.base,
                "root": e.path,
            }
            for e in self.entries.values()
            if not e.unloading
        ]
