"""`llamafleet check -C FILE`: validates without loading a model and prints the resolved settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import llama_cpp
import pytest

REPO = Path(__file__).resolve().parents[2]


def _check(
    tmp_path: Path, data: dict[str, Any], *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LLAMAFLEET_")}
    environ["XDG_RUNTIME_DIR"] = str(tmp_path)
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "shared.cli", "check", "-C", str(path), *args],
        cwd=REPO,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def fake_gguf(tmp_path: Path) -> Path:
    """GGUF magic and nothing else: a check that loaded the model would fail on it."""
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + b"\0" * 60)
    return path


def test_prints_defaults_and_environment_overrides(tmp_path: Path, fake_gguf: Path) -> None:
    done = _check(
        tmp_path,
        {"server": {"api_key": "secret-key"}, "model": {"path": str(fake_gguf), "n_ctx": 1024}},
        env={"LLAMAFLEET_SERVER__PORT": "9123", "LLAMAFLEET_MODEL__N_SEQ_MAX": "6"},
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["url"] == "http://127.0.0.1:9123/v1"
    assert report["environment"] == {"LLAMAFLEET_MODEL__N_SEQ_MAX": "6", "LLAMAFLEET_SERVER__PORT": "9123"}
    settings = report["settings"]
    assert settings["server"]["port"] == 9123 and settings["model"]["n_seq_max"] == 6  # overrides
    assert settings["model"]["n_ctx"] == 1024  # the file
    assert settings["server"]["max_queued_requests"] == 256 and settings["workers"]["routing"] == "prefix"
    assert settings["server"]["api_key"] == "***" and "secret-key" not in done.stdout
    assert report["api_keys"] == 1
    (model,) = report["models"]
    assert model["name"] == "model" and model["requests_endpoint"].endswith("llamafleet-9123/requests.sock")


def test_several_models(tmp_path: Path, fake_gguf: Path) -> None:
    models = [
        {"path": str(fake_gguf), "alias": "a"},
        {"path": str(fake_gguf), "alias": "b", "workers": {"count": 3}},
    ]
    report = json.loads(_check(tmp_path, {"models": models}).stdout)
    assert [(m["name"], m["workers"]) for m in report["models"]] == [("a", 1), ("b", 3)]
    assert "model" not in report["settings"] and "workers" not in report["settings"]


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"path": "/nonexistent/m.gguf"}, "model.path /nonexistent/m.gguf does not exist"),
        ({"packaged": {"package": "no-such-model"}}, "model.packaged.package: unknown packaged model"),
        ({"path": "x.gguf", "n_ctxx": 5}, "model.n_ctxx: unknown field"),
    ],
)
def test_problems_exit_2_naming_the_field(tmp_path: Path, model: dict[str, Any], message: str) -> None:
    done = _check(tmp_path, {"model": model})
    assert done.returncode == 2 and message in done.stderr, done.stderr


def test_not_a_gguf(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_text("hello")
    done = _check(tmp_path, {"model": {"path": str(path)}})
    assert done.returncode == 2 and "is not a GGUF file" in done.stderr


def test_missing_keys_for_a_role(tmp_path: Path, fake_gguf: Path) -> None:
    data = {
        "model": {"path": str(fake_gguf)},
        "workers": {
            "requests_endpoint": "tcp://127.0.0.1:5555",
            "results_endpoint": "tcp://127.0.0.1:5556",
            "keys_dir": str(tmp_path / "keys"),
        },
    }
    router = _check(tmp_path, data, "--role", "router")
    assert router.returncode == 2 and "workers.keys_dir" in router.stderr
    assert (
        subprocess.run(
            [sys.executable, "-m", "shared.cli", "keys", str(tmp_path / "keys")], cwd=REPO
        ).returncode
        == 0
    )
    assert _check(tmp_path, data, "--role", "router").returncode == 0
    assert _check(tmp_path, data, "--role", "worker", "--index", "0").returncode == 0
    worker = _check(tmp_path, data, "--role", "worker", "--index", "1")  # no key for worker 1
    assert worker.returncode == 2 and "worker-1" in worker.stderr


@pytest.mark.skipif(bool(llama_cpp.llama_supports_gpu_offload()), reason="this build offloads to a GPU")
def test_gpu_layers_on_a_cpu_build(tmp_path: Path, fake_gguf: Path) -> None:
    done = _check(tmp_path, {"model": {"path": str(fake_gguf), "n_gpu_layers": 10}})
    assert done.returncode == 2 and "model.n_gpu_layers is 10" in done.stderr
    fallback = {"path": str(fake_gguf), "n_gpu_layers": 10, "allow_cpu_fallback": True}
    assert _check(tmp_path, {"model": fallback}).returncode == 0
