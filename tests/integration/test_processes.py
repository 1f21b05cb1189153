"""Process roles and model sources: router and worker run apart over tcp://, SIGTERM drains, hub cache."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from shared.config import FromPretrainedOptions
from shared.curve import write_keys
from shared.models import ModelSourceError, resolve_from_pretrained
from tests.integration.server import free_port, model_config, run_server, start_apart


def fill_hub_cache(cache: Path, repo_id: str, files: dict[str, Path]) -> None:
    """Lays files out as huggingface_hub's cache does: blobs, a snapshot of symlinks, refs/main."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    for name, source in files.items():
        data = source.read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


@pytest.fixture
def hub_cache(tmp_path: Path, tiny_llama_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hub"
    readme = tmp_path / "README.md"
    readme.write_text("tiny")
    fill_hub_cache(
        cache,
        "tiny-org/tiny-llama-GGUF",
        {
            "tiny-Q8_0.gguf": tiny_llama_gguf,
            "tiny-F32.gguf": tiny_llama_gguf,
            "split/tiny-00001-of-00002.gguf": tiny_llama_gguf,
            "split/tiny-00002-of-00002.gguf": tiny_llama_gguf,
            "README.md": readme,
        },
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_from_pretrained_resolves_offline(hub_cache: Path) -> None:
    exact = resolve_from_pretrained(
        FromPretrainedOptions(
            repo_id="tiny-org/tiny-llama-GGUF", filename="tiny-F32.gguf", cache_dir=str(hub_cache)
        )
    )
    assert exact.name == "tiny-F32.gguf" and exact.is_file()
    globbed = resolve_from_pretrained(
        FromPretrainedOptions(
            repo_id="tiny-org/tiny-llama-GGUF",
            filename="*Q8_0.gguf",
            additional_files=["README*"],
            cache_dir=str(hub_cache),
        )
    )
    assert globbed.name == "tiny-Q8_0.gguf"
    split = resolve_from_pretrained(
        FromPretrainedOptions(
            repo_id="tiny-org/tiny-llama-GGUF", filename="split/*-00001-of-*.gguf", cache_dir=str(hub_cache)
        )
    )
    assert split.name == "tiny-00001-of-00002.gguf"
    assert (split.parent / "tiny-00002-of-00002.gguf").is_file()
    with pytest.raises(ModelSourceError, match="2 files"):
        resolve_from_pretrained(
            FromPretrainedOptions(
                repo_id="tiny-org/tiny-llama-GGUF", filename="tiny-*.gguf", cache_dir=str(hub_cache)
            )
        )
    with pytest.raises(ModelSourceError):
        resolve_from_pretrained(
            FromPretrainedOptions(repo_id="tiny-org/absent", filename="x.gguf", cache_dir=str(hub_cache))
        )


def test_server_from_hub_cache(hub_cache: Path) -> None:
    model = model_config(Path("unused"))
    del model["path"]
    model["from_pretrained"] = {
        "repo_id": "tiny-org/tiny-llama-GGUF",
        "filename": "*F32.gguf",
        "cache_dir": str(hub_cache),
    }
    with run_server(model, env={"HF_HUB_OFFLINE": "1"}) as server:
        # Greedy and past the end of generation: a sampled end token would cut the exact count.
        reply = server.client().completions.create(
            model="test-model", prompt="hello", max_tokens=3, temperature=0, extra_body={"ignore_eos": True}
        )
        assert reply.usage is not None and reply.usage.completion_tokens == 3


def test_router_and_worker_as_separate_processes_over_tcp(tmp_path: Path, tiny_llama_gguf: Path) -> None:
    port, req_port, res_port = free_port(), free_port(), free_port()
    write_keys(tmp_path / "keys", 1)  # tcp:// needs CURVE keys (or workers.insecure_tcp)
    config = {
        "server": {"port": port},
        "model": model_config(tiny_llama_gguf),
        "workers": {
            "requests_endpoint": f"tcp://127.0.0.1:{req_port}",
            "results_endpoint": f"tcp://127.0.0.1:{res_port}",
            "keys_dir": str(tmp_path / "keys"),
        },
    }
    worker, router = start_apart(config, tmp_path)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "router+worker never became healthy"
            time.sleep(0.1)
        reply = httpx.post(
            f"http://127.0.0.1:{port}/v1/completions",
            json={"prompt": "hello", "max_tokens": 4, "temperature": 0, "ignore_eos": True},
            timeout=30,
        )
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 4
        # A worker stopped by SIGTERM is seen as down by the router (heartbeats stop): 503, not a hang.
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(10) == 0
        deadline = time.monotonic() + 5
        while httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code != 503:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        down = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "x"}, timeout=5)
        assert down.status_code == 503 and down.json()["error"]["type"] == "worker_unavailable"
    finally:
        for process in (router, worker):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        assert router.wait(20) == 0
        worker.wait(20)


def test_sigterm_drains_in_flight_requests(tiny_llama_gguf: Path) -> None:
    # A request of a second or two; the drain allows 30 s.
    with run_server(
        model_config(tiny_llama_gguf, n_ctx=4096), server={"drain_timeout_seconds": 30}
    ) as server:
        results: dict[str, httpx.Response] = {}

        def long_request() -> None:
            with server.http() as http:
                results["reply"] = http.post(
                    "/v1/chat/completions",
                    json={
                        "messages": [{"role": "user", "content": "hi"}],
                        "max_tokens": 3000,
                        "ignore_eos": True,
                    },
                )

        thread = threading.Thread(target=long_request)
        thread.start()
        # In flight at the router before the signal (a 0.05 s sleep here let a loaded machine signal first,
        # and a request arriving during the drain is refused, not drained). The router's own gauge: live.
        server.wait_metric('llamafleet_worker_in_flight_requests{worker="0"}', 1, timeout=30)
        server.process.send_signal(signal.SIGTERM)
        thread.join(60)
        assert server.process.wait(60) == 0
        reply = results["reply"]
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 3000
