"""API keys through a real server: several keys from the config, a keys file and the environment; every HTTP
route and the Responses WebSocket refuse a wrong key with OpenAI's 401 error; health and metrics both ways."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.integration.server import Server, model_config, run_server

CONFIG_KEYS = ["config-key-1", "config-key-2"]
FILE_KEYS = ["file-key-1", "file-key-2"]
ENV_KEYS = ["env-key-1", "env-key-2"]

# Every route the router serves, with a body it would accept.
ROUTES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "/v1/models", None),
    ("POST", "/v1/completions", {"model": "test-model", "prompt": "hi", "max_tokens": 1}),
    (
        "POST",
        "/v1/chat/completions",
        {"model": "test-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
    ),
    ("POST", "/v1/responses", {"model": "test-model", "input": "hi", "max_output_tokens": 1}),
    ("POST", "/v1/embeddings", {"model": "test-model", "input": "hi"}),
    ("GET", "/openapi.json", None),
    ("GET", "/docs", None),
    ("GET", "/v1/no-such-route", None),
]


def _keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "api-keys"
    path.write_text(f"# one key per line\n\n{FILE_KEYS[0]}\n  {FILE_KEYS[1]}  \n# {CONFIG_KEYS[0]}-not\n")
    return path


@pytest.fixture(scope="module")
def keyed(tiny_llama_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Keys from all three sources; /healthz and /metrics open (the default)."""
    keys_file = _keys_file(tmp_path_factory.mktemp("keys"))
    with run_server(
        model_config(tiny_llama_gguf, embedding_pooling="mean"),
        server={
            "api_key": CONFIG_KEYS,
            "api_keys_file": str(keys_file),
            "cors_origins": ["http://app.example"],
        },
        env={"LLAMAFLEET_API_KEYS": ",".join(ENV_KEYS)},
        api_key=None,
        client_key=FILE_KEYS[1],
    ) as server:
        yield server


def _call(server: Server, method: str, path: str, body: Any, key: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}".strip()} if key is not None else {}
    return httpx.request(method, f"{server.base_url}{path}", json=body, headers=headers, timeout=30)


def _assert_401(response: httpx.Response) -> None:
    assert response.status_code == 401, (response.status_code, response.text)
    assert response.json() == {
        "error": {
            "message": "invalid or missing API key",
            "type": "authentication_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }
    assert response.headers["www-authenticate"] == "Bearer"


def test_every_key_from_every_source_is_accepted(keyed: Server) -> None:
    for key in CONFIG_KEYS + FILE_KEYS + ENV_KEYS:
        response = _call(keyed, "GET", "/v1/models", None, key)
        assert response.status_code == 200, (key, response.text)
    # The official client with a key from the file: a real generation.
    client = openai.OpenAI(base_url=keyed.v1, api_key=FILE_KEYS[0], max_retries=0)
    # Greedy and past the end of generation: a sampled end token would cut the exact count.
    reply = client.completions.create(
        model="test-model", prompt="hello", max_tokens=2, temperature=0, extra_body={"ignore_eos": True}
    )
    assert reply.usage is not None and reply.usage.completion_tokens == 2


@pytest.mark.parametrize("key", [None, "wrong", "", f"{CONFIG_KEYS[0]}x", CONFIG_KEYS[0][:-1], "# one key"])
def test_wrong_or_missing_key_is_401_on_every_http_route(keyed: Server, key: str | None) -> None:
    for method, path, body in ROUTES:
        _assert_401(_call(keyed, method, path, body, key))
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed.v1, api_key=key or "x", max_retries=0).models.list()


def test_the_same_routes_answer_with_a_key(keyed: Server) -> None:
    for method, path, body in ROUTES:
        response = _call(keyed, method, path, body, ENV_KEYS[1])
        expected = 404 if path == "/v1/no-such-route" else 200
        assert response.status_code == expected, (path, response.text)


def _ws(server: Server, key: str | None) -> Any:
    url = server.base_url.replace("http://", "ws://") + "/v1/responses"
    headers = {"Authorization": f"Bearer {key}".strip()} if key is not None else {}
    return connect(url, additional_headers=headers, open_timeout=30)


def test_responses_websocket_needs_a_key(keyed: Server) -> None:
    for key in (None, "wrong"):
        with pytest.raises(InvalidStatus) as raised, _ws(keyed, key):
            pass
        response = raised.value.response
        assert response.status_code == 401
        assert json.loads(response.body or b"{}")["error"]["code"] == "invalid_api_key"
    with _ws(keyed, CONFIG_KEYS[1]) as ws:  # a key from the list opens it
        ws.send('{"type": "response.create", "model": "test-model", "input": "hi", "max_output_tokens": 1}')
        while (event := json.loads(ws.recv(timeout=30)))["type"] not in (
            "response.completed",
            "response.incomplete",
            "error",
        ):
            pass
        assert event["type"] == "response.incomplete", event


def test_cors_preflight_needs_no_key(keyed: Server) -> None:
    preflight = httpx.options(
        f"{keyed.base_url}/v1/chat/completions",
        headers={
            "Origin": "http://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
        timeout=10,
    )
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["access-control-allow-origin"] == "http://app.example"
    # The request that follows still needs its key.
    _assert_401(_call(keyed, "GET", "/v1/models", None, None))


def test_health_and_metrics_are_open_by_default(keyed: Server) -> None:
    assert httpx.get(f"{keyed.base_url}/healthz", timeout=10).status_code == 200
    assert httpx.get(f"{keyed.base_url}/metrics", timeout=10).status_code == 200


def test_protected_health_and_metrics_and_a_keys_file_alone(tiny_llama_gguf: Path, tmp_path: Path) -> None:
    keys_file = _keys_file(tmp_path)
    with run_server(
        model_config(tiny_llama_gguf),
        server={"api_keys_file": str(keys_file), "protect_health_and_metrics": True},
        api_key=None,
        client_key=FILE_KEYS[0],
    ) as server:
        for path in ("/healthz", "/metrics"):
            _assert_401(_call(server, "GET", path, None, None))
            _assert_401(_call(server, "GET", path, None, "wrong"))
            assert _call(server, "GET", path, None, FILE_KEYS[0]).status_code == 200
        assert _call(server, "GET", "/v1/models", None, FILE_KEYS[1]).status_code == 200
        _assert_401(_call(server, "GET", "/v1/models", None, CONFIG_KEYS[0]))
