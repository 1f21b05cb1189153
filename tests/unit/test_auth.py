"""API key sources and matching (router/api/auth.py); the routes are tested through a real server."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.api.auth import ApiKeys, load_api_keys
from shared.config import ConfigError, ServerOptions, parse_config


def test_keys_from_config_file_and_environment(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("# comment\n\n  file-a  \nfile-b\n")
    options = ServerOptions(api_key=["list-a", "list-b", ""], api_keys_file=str(keys_file))
    keys = load_api_keys(options, {"LLAMAFLEET_API_KEYS": " env-a ,, env-b"})
    assert len(keys) == 6
    for key in ("list-a", "list-b", "file-a", "file-b", "env-a", "env-b"):
        assert keys.accepts(key), key
    for wrong in ("", "# comment", "list-", "list-ab", "file-a ", "env-a,env-b"):
        assert not keys.accepts(wrong), wrong
    assert len(load_api_keys(ServerOptions(api_key="one"), {})) == 1
    assert len(load_api_keys(ServerOptions(), {})) == 0  # no keys: open


def test_a_keys_file_without_keys_or_unreadable_is_an_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("# nothing yet\n\n")
    with pytest.raises(ConfigError, match="holds no keys"):
        load_api_keys(ServerOptions(api_keys_file=str(empty)), {})
    with pytest.raises(ConfigError, match="cannot read"):
        load_api_keys(ServerOptions(api_keys_file=str(tmp_path / "absent")), {})


def test_numeric_key_from_the_environment_stays_a_string(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMAFLEET_SERVER__API_KEY", "12345")
    assert parse_config({"model": {"path": "m.gguf"}}).server.api_key == "12345"
    monkeypatch.setenv("LLAMAFLEET_SERVER__API_KEY", '["a", "b"]')
    assert parse_config({"model": {"path": "m.gguf"}}).server.api_key == ["a", "b"]


def test_non_ascii_tokens_are_compared_not_crashed() -> None:
    assert not ApiKeys(["k"]).accepts("\udcff\u00e9")
