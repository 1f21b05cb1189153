"""Adapter file checks (shared/lora.py), the router's adapter catalog and adapter-aware worker choice."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from router.api.errors import APIError
from router.client.adapters import AdapterCatalog
from router.client.routing import PrefixRouter
from shared.config import ModelOptions
from shared.lora import AdapterFileError, check_adapter_shapes, inspect_adapter
from tests.fixtures.tiny_lora import write_corrupt_lora, write_foreign_lora, write_lora
from tests.fixtures.tiny_models import write_tiny_llama


def test_a_good_adapter_passes(tiny_llama_gguf: Path, tmp_path: Path) -> None:
    path = write_lora(tmp_path / "a.gguf", tiny_llama_gguf)
    assert inspect_adapter(path, "llama").arch == "llama"
    check_adapter_shapes(path, tiny_llama_gguf)


def test_bad_files_are_named(tiny_llama_gguf: Path, tmp_path: Path) -> None:
    cases = {
        tmp_path / "missing.gguf": "does not exist",
        write_corrupt_lora(tmp_path / "c.gguf", tiny_llama_gguf): "truncated",
        write_foreign_lora(tmp_path / "f.gguf", tiny_llama_gguf): "architecture 'gemma3'",
        tiny_llama_gguf: "not a LoRA adapter",
        tmp_path: "not a file",
    }
    (tmp_path / "text.gguf").write_text("hello")
    cases[tmp_path / "text.gguf"] = "not a readable GGUF"
    for path, words in cases.items():
        with pytest.raises(AdapterFileError, match=words) as error:
            inspect_adapter(path, "llama")
        assert str(path) in str(error.value)


def test_shapes_must_fit(tiny_llama_gguf: Path, tmp_path: Path) -> None:
    wide = write_tiny_llama(tmp_path / "wide.gguf", n_embd=32, n_ff=64)
    path = write_lora(tmp_path / "w.gguf", wide)
    with pytest.raises(AdapterFileError, match="does not fit"):
        check_adapter_shapes(path, tiny_llama_gguf)


def catalog() -> AdapterCatalog:
    options = ModelOptions.model_validate(
        {
            "path": "m.gguf",
            "alias": "base",
            "loras": [{"path": "a.gguf", "name": "a", "scale": 0.5}, {"path": "u"}],
        }
    )
    return AdapterCatalog(options, "base", 0)


def test_catalog_resolves_names_and_scales() -> None:
    adapters = catalog()
    assert adapters.resolve(None, None) == ("", 0.0)
    assert adapters.resolve("base", None) == ("", 0.0)
    assert adapters.resolve("a", None) == ("a", 0.5)
    assert adapters.resolve("a", 2.0) == ("a", 2.0)
    for model, scale, status in (("zzz", None, 404), ("a", 4.5, 400), ("base", 1.0, 400)):
        with pytest.raises(APIError) as error:
            adapters.resolve(model, scale)
        assert error.value.status == status
    assert [card["id"] for card in adapters.cards()] == ["a"]
    adapters.entries["a"].unloading = True
    assert not adapters.knows("a") and adapters.cards() == []


@dataclass
class FakeWorker:
    index: int
    load: int = 0
    slots: int = 4
    up: bool = True
    adapter_load: dict[str, int] = field(default_factory=dict)


def test_router_prefers_a_worker_running_the_adapter() -> None:
    router = PrefixRouter()
    idle, busy = FakeWorker(0), FakeWorker(1, load=2, adapter_load={"a": 1})
    assert router.choose([1, 2, 3], [idle, busy], "a") is busy
    assert router.choose([1, 2, 3], [idle, busy], "b") is idle
    assert router.choose([1, 2, 3], [idle, busy]) is idle
    full = FakeWorker(1, load=4, adapter_load={"a": 4})
    assert router.choose([1, 2, 3], [idle, full], "a") is idle  # full: not worth queueing behind
