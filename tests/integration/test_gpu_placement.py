"""Each worker says where it runs (backend, devices, GPU layers), and a GPU config on a build without GPU
offload is refused at start-up unless `model.allow_cpu_fallback` (shared/gpu.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import llama_cpp
import pytest

from tests.integration.server import REPO, Server, model_config, run_server

needs_cpu_build = pytest.mark.skipif(
    bool(llama_cpp.llama_supports_gpu_offload()), reason="this build offloads to a GPU"
)


def test_healthz_and_metrics_report_placement(tiny_server: Server) -> None:
    health = httpx.get(f"{tiny_server.base_url}/healthz", timeout=5).json()
    placement = health["models"]["test-model"]["placement"]["0"]
    assert placement["layers"] == 3  # the tiny llama's 2 blocks and its output layer
    assert any(device.startswith("CPU") for device in placement["devices"])
    metrics = tiny_server.metrics()
    (build,) = [name for name in metrics if name.startswith("llamafleet_worker_build_info{")]
    assert f'backend="{placement["backend"]}"' in build and 'worker="0"' in build
    assert metrics['llamafleet_worker_offloaded_layers{worker="0"}'] == placement["offloaded_layers"]
    assert metrics['llamafleet_worker_layers{worker="0"}'] == 3
    expected = f"runs on {placement['backend']}: devices {', '.join(placement['devices'])}; offloaded"
    assert expected in tiny_server.log()


@needs_cpu_build
def test_cpu_build_reports_cpu(tiny_server: Server) -> None:
    health = httpx.get(f"{tiny_server.base_url}/healthz", timeout=5).json()
    placement = health["models"]["test-model"]["placement"]["0"]
    assert placement["backend"] == "CPU" and placement["offloaded_layers"] == 0
    assert "offloaded 0/3 layers to GPU" in tiny_server.log()


def _config_file(tmp_path: Path, model: dict[str, object]) -> Path:
    path = tmp_path / "config.json"
    endpoints = {
        "requests_endpoint": f"ipc://{tmp_path}/q.sock",
        "results_endpoint": f"ipc://{tmp_path}/r.sock",
    }
    path.write_text(json.dumps({"server": {"port": 1}, "model": model, "workers": endpoints}))
    return path


@needs_cpu_build
@pytest.mark.parametrize("role", ["serve", "worker"])
def test_gpu_layers_without_offload_refuse_to_start(tiny_llama_gguf: Path, tmp_path: Path, role: str) -> None:
    path = _config_file(tmp_path, model_config(tiny_llama_gguf, n_gpu_layers=8))
    done = subprocess.run(
        [sys.executable, "-m", "shared.cli", role, "-C", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "model.n_gpu_layers is 8" in done.stderr and "allow_cpu_fallback" in done.stderr


@needs_cpu_build
def test_a_worker_override_is_named(tiny_llama_gguf: Path, tmp_path: Path) -> None:
    path = _config_file(tmp_path, model_config(tiny_llama_gguf))
    data = json.loads(path.read_text())
    data["workers"]["overrides"] = [{"n_gpu_layers": 2}]
    path.write_text(json.dumps(data))
    done = subprocess.run(
        [sys.executable, "-m", "shared.cli", "serve", "-C", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "workers.overrides.n_gpu_layers is 2" in done.stderr


@needs_cpu_build
@pytest.mark.parametrize(
    ("overrides", "warning"),
    [
        ({"n_gpu_layers": 8, "allow_cpu_fallback": True}, "model.n_gpu_layers is 8"),
        ({"n_gpu_layers": -1}, "model.n_gpu_layers is -1"),  # the seed's GPU configs: serve on the CPU
    ],
)
def test_cpu_fallback_serves_with_a_warning(
    tiny_llama_gguf: Path, overrides: dict[str, object], warning: str
) -> None:
    with run_server(model_config(tiny_llama_gguf, **overrides)) as server:
        answer = server.client().completions.create(model="test-model", prompt="hi", max_tokens=2)
        assert answer.choices[0].text is not None
        assert warning in server.log() and "serving on the CPU" in server.log()
