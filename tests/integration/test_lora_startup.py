"""The seed's start-up `model.loras` through real processes: unnamed adapters apply to every request, a
misfit adapter or a bad entry stops `llamafleet serve` at start naming it, and the disk cache keeps KV of
one adapter set from another."""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.tiny_lora import write_corrupt_lora, write_foreign_lora, write_lora
from tests.fixtures.tiny_models import write_tiny_llama
from tests.integration.server import REPO, model_config, run_server
from tests.integration.test_prefix_cache import long_text


def complete(server: Any, model: str, prompt: str, max_tokens: int = 24) -> tuple[str, int]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    with server.http() as http:
        reply = http.post("/v1/completions", json=body)
    assert reply.status_code == 200, reply.text
    data = reply.json()
    return data["choices"][0]["text"], data["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_unnamed_adapter_applies_to_every_request(tiny_llama_gguf: Path, tmp_path: Path) -> None:
    lora = write_lora(tmp_path / "a.gguf", tiny_llama_gguf, seed=1)
    named = model_config(
        tiny_llama_gguf, flash_attn=False, loras=[{"path": str(lora), "name": "a", "scale": 0.7}]
    )
    with run_server(named) as server:
        base, _ = complete(server, "test-model", "hello world")
        adapted, _ = complete(server, "a", "hello world")
    always = model_config(tiny_llama_gguf, flash_attn=False, loras=[{"path": str(lora), "scale": 0.7}])
    with run_server(always) as server:
        assert complete(server, "test-model", "hello world")[0] == adapted != base
        with server.http() as http:
            assert [card["id"] for card in http.get("/v1/models").json()["data"]] == ["test-model"]


def test_disk_cache_is_keyed_by_adapter_set(tiny_llama_gguf: Path, tmp_path: Path) -> None:
    """Memory prefix cache off, so a hit can only come from the disk: base KV never serves an adapter."""
    lora = write_lora(tmp_path / "a.gguf", tiny_llama_gguf, seed=1)
    disk = {"disk_cache": {"path": str(tmp_path / "seq"), "max_bytes": 64 << 20, "min_tokens": 32}}
    prompt = long_text(100, salt=5)
    model = model_config(
        tiny_llama_gguf,
        n_ctx=4096,
        flash_attn=False,
        prefix_cache=False,
        loras=[{"path": str(lora), "name": "a"}],
    )
    with run_server(model, extra=disk) as server:
        base, cached = complete(server, "test-model", prompt)
        assert cached == 0
        server.wait_metric('llamafleet_disk_cache_saves_total{worker="0"}', 1)
        assert complete(server, "test-model", prompt)[1] > 0  # the base model hits its disk entry
        adapted, cached = complete(server, "a", prompt)
        assert cached == 0 and adapted != base
    # A restart with the adapter applied to everything must not restore the base model's saved KV.
    always = model_config(
        tiny_llama_gguf, n_ctx=4096, flash_attn=False, prefix_cache=False, loras=[{"path": str(lora)}]
    )
    with run_server(always, extra=disk) as server:
        again, cached = complete(server, "test-model", prompt)
    assert cached == 0 and again == adapted


def serve_exit(tmp_path: Path, model: dict[str, Any]) -> tuple[int, str]:
    """`llamafleet serve` on `model`: its exit code and stderr (it must stop before starting anything)."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"server": {"port": 1}, "model": model}))
    done = subprocess.run(
        [sys.executable, "-m", "shared.cli", "serve", "-C", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.returncode, done.stderr


@pytest.mark.parametrize("kind", ["missing", "corrupt", "foreign", "misfit", "not-an-adapter"])
def test_misfit_adapter_file_stops_serve_naming_it(tiny_llama_gguf: Path, tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"{kind}.gguf"
    if kind == "corrupt":
        write_corrupt_lora(path, tiny_llama_gguf)
    elif kind == "foreign":
        write_foreign_lora(path, tiny_llama_gguf)
    elif kind == "misfit":  # right architecture, another width
        write_lora(path, write_tiny_llama(tmp_path / "wide.gguf", n_embd=32, n_ff=64))
    elif kind == "not-an-adapter":
        path = tiny_llama_gguf
    code, stderr = serve_exit(tmp_path, model_config(tiny_llama_gguf, loras=[{"path": str(path)}]))
    assert code == 2, stderr
    assert "model.loras[0]" in stderr and str(path) in stderr


@pytest.mark.parametrize(
    ("loras", "words"),
    [
        ([{"path": "A", "name": "x"}, {"path": "B", "name": "x"}], "used twice"),
        ([{"path": "A", "name": "test-model"}], "base model's name"),
        ([{"path": "A", "scale": -1}], "scale"),
        ([{"path": "A", "scale": 1e6}], "scale"),
        ([{"path": "A", "scale": 5}], "lora_max_scale"),
        ([{"path": "A", "name": "bad name"}], "name"),
    ],
)
def test_bad_lora_entries_are_config_errors(
    tiny_llama_gguf: Path, tmp_path: Path, loras: list[dict[str, Any]], words: str
) -> None:
    code, stderr = serve_exit(tmp_path, model_config(tiny_llama_gguf, loras=loras))
    assert code == 2, stderr
    assert "loras" in stderr and words in stderr


def test_mixed_adapter_sets_with_per_sequence_kv_give_exactly_what_they_give_alone(
    tiny_llama_gguf: Path, tmp_path: Path
) -> None:
    """Per-sequence KV streams: the slot table keeps each adapter set's sequence ids consecutive."""
    lora = write_lora(tmp_path / "a.gguf", tiny_llama_gguf, seed=1)
    model = model_config(
        tiny_llama_gguf,
        flash_attn=False,
        kv_unified=False,
        n_seq_max=8,
        loras=[{"path": str(lora), "name": "a"}],
    )
    with run_server(model) as server:
        cases = [("a" if i % 2 else "test-model", f"prompt number {i}") for i in range(8)]
        alone = {case: complete(server, *case, max_tokens=30)[0] for case in cases}
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = {pool.submit(complete, server, m, p, 30): (m, p) for m, p in cases}
            for future, case in futures.items():
                assert future.result()[0] == alone[case], case
