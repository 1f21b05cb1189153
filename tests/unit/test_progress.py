"""Model preparation progress as log lines: hub downloads (through hf_hub_download's tqdm_class) and steps."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from shared import models, progress
from shared.config import FromPretrainedOptions


def test_download_progress_is_logged_not_drawn(caplog: pytest.LogCaptureFixture, monkeypatch: Any) -> None:
    monkeypatch.setattr(progress, "LOG_EVERY_SECONDS", 0.0)
    caplog.set_level(logging.INFO, "llamafleet.models")
    bar = progress.LoggedProgress(total=4_000_000, desc="model.gguf", unit="B")
    for _ in range(4):
        bar.update(1_000_000)
    bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("model.gguf: 50% of 4.0 MB") for line in lines), lines
    assert sum(line.startswith("model.gguf: 100% of 4.0 MB") for line in lines) == 1, lines


def test_progress_is_throttled(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "llamafleet.models")
    bar = progress.LoggedProgress(total=1000, desc="big.gguf")
    for _ in range(999):
        bar.update(1)
    bar.update(1)
    bar.close()
    lines = [r.getMessage() for r in caplog.records]
    # The first refresh and the end, not one line per update.
    assert 1 <= len(lines) <= 3 and lines[-1].startswith("big.gguf: 100% of 1.0 KB"), lines


def test_hub_download_reports_progress(
    caplog: pytest.LogCaptureFixture, monkeypatch: Any, tmp_path: Path
) -> None:
    """_download hands hf_hub_download our tqdm class (the hub itself is not reached in tests)."""
    import huggingface_hub

    monkeypatch.setattr(progress, "LOG_EVERY_SECONDS", 0.0)
    caplog.set_level(logging.INFO, "llamafleet.models")
    target = tmp_path / "m.gguf"

    def fake_download(*, filename: str, tqdm_class: Any, **kwargs: Any) -> str:
        with tqdm_class(total=2048, desc=filename, unit="B") as bar:
            bar.update(1024)
            bar.update(1024)
        target.write_bytes(b"GGUF")
        return str(target)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    path = models.resolve_from_pretrained(FromPretrainedOptions(repo_id="org/repo", filename="m.gguf"))
    assert path == target
    assert any(r.getMessage().startswith("m.gguf: 100% of 2.0 KB") for r in caplog.records)


def test_timed_logs_start_and_end(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "llamafleet.models")
    with progress.timed("assembling x"):
        pass
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "assembling x ..." and lines[1].startswith("assembling x: done in ")
