"""Speculative-decoding settings a model cannot honour stop the worker at start, naming the field."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.fixtures.tiny_families import write_tiny_recurrent
from tests.integration.server import REPO, model_config


def start_worker(tmp_path: Path, model: dict[str, object]) -> subprocess.CompletedProcess[str]:
    config = {
        "model": model,
        "workers": {
            "requests_endpoint": f"ipc://{tmp_path}/req.sock",
            "results_endpoint": f"ipc://{tmp_path}/res.sock",
        },
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    command = [sys.executable, "-m", "shared.cli", "worker", "-C", str(path), "--index", "0"]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)


def test_a_recurrent_model_with_a_draft_provider_is_refused(tmp_path: Path) -> None:
    model = model_config(write_tiny_recurrent(tmp_path / "mamba.gguf"), draft_model="prompt-lookup-decoding")
    done = start_worker(tmp_path, model)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "model.draft_model 'prompt-lookup-decoding'" in done.stderr
    assert "recurrent" in done.stderr
