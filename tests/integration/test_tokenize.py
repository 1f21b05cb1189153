"""POST /tokenize and /detokenize through a real server, in llama-server's and vLLM's request shapes."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.integration.server import Server

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


def _post(server: Server, path: str, body: dict[str, Any]) -> httpx.Response:
    with server.http() as http:
        return http.post(path, json=body)


def _ok(server: Server, path: str, body: dict[str, Any]) -> dict[str, Any]:
    answer = _post(server, path, body)
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


def test_llama_server_shape_round_trips(tiny_server: Server) -> None:
    text = "Hello, world! 42"
    tokens = _ok(tiny_server, "/tokenize", {"content": text})["tokens"]
    assert tokens and all(isinstance(t, int) for t in tokens)
    assert _ok(tiny_server, "/detokenize", {"tokens": tokens})["content"] == text


def test_add_special_defaults_follow_each_server(tiny_server: Server) -> None:
    text = "abc"
    plain = _ok(tiny_server, "/tokenize", {"content": text})["tokens"]  # llama-server: add_special false
    with_bos = _ok(tiny_server, "/tokenize", {"content": text, "add_special": True})["tokens"]
    assert len(with_bos) == len(plain) + 1 and with_bos[1:] == plain
    vllm = _ok(
        tiny_server, "/tokenize", {"model": "test-model", "prompt": text}
    )  # vLLM: add_special_tokens true
    assert vllm["tokens"] == with_bos and vllm["count"] == len(with_bos)
    models = tiny_server.client().models.list().data
    assert vllm["max_model_len"] == models[0].meta["n_ctx"] > 0  # type: ignore[attr-defined]
    off = _ok(tiny_server, "/tokenize", {"prompt": text, "add_special_tokens": False})
    assert off["tokens"] == plain
    # The BOS renders as its text when detokenized, as both servers do.
    assert _ok(tiny_server, "/detokenize", {"tokens": with_bos})["prompt"] == "<s> abc"


def test_pieces_and_token_strs(tiny_server: Server) -> None:
    text = "hi €"  # the tiny vocabulary spells the euro sign in three byte tokens
    tokens = _ok(tiny_server, "/tokenize", {"content": text})["tokens"]
    pieces = _ok(tiny_server, "/tokenize", {"content": text, "with_pieces": True})["tokens"]
    assert [p["id"] for p in pieces] == tokens
    texts = [p["piece"] for p in pieces if isinstance(p["piece"], str)]
    raw = [p["piece"] for p in pieces if isinstance(p["piece"], list)]
    assert "".join(texts).replace("▁", " ").strip() == "hi" or "".join(texts).strip() == "hi"
    assert bytes(b for piece in raw for b in piece) == "€".encode()
    strs = _ok(tiny_server, "/tokenize", {"prompt": text, "return_token_strs": True})["token_strs"]
    assert len(strs) == len(tokens) + 1


def test_chat_messages_count_equals_chat_prompt_tokens(tiny_server: Server) -> None:
    answer = _ok(tiny_server, "/tokenize", {"model": "test-model", "messages": MESSAGES})
    completion = tiny_server.client().chat.completions.create(
        model="test-model",
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=1,
        temperature=0,
    )
    assert completion.usage is not None
    assert answer["count"] == completion.usage.prompt_tokens
    text = _ok(tiny_server, "/detokenize", {"tokens": answer["tokens"]})["content"]
    assert "Hello there<|im_end|>" in text and text.rstrip().endswith("assistant")
    bare = _ok(tiny_server, "/tokenize", {"messages": MESSAGES, "add_generation_prompt": False})
    assert bare["count"] < answer["count"]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/detokenize", {"tokens": [1, 10**9]}, "tokens"),
        ("/detokenize", {"tokens": [-1]}, "tokens"),
        ("/detokenize", {"tokens": [2**63]}, "tokens"),
        ("/detokenize", {"tokens": ["a"]}, "tokens"),
        ("/detokenize", {"tokens": [1.5]}, "tokens"),
        ("/detokenize", {}, "tokens"),
        ("/tokenize", {}, None),
        ("/tokenize", {"content": "a", "prompt": "b"}, None),
        ("/tokenize", {"content": 5}, "content"),
        ("/tokenize", {"messages": []}, "messages"),
        ("/tokenize", {"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ],
)
def test_bad_input_is_a_400(tiny_server: Server, path: str, body: dict[str, Any], param: str | None) -> None:
    answer = _post(tiny_server, path, body)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] is not None and error["param"].startswith(param)


def test_unknown_model_is_a_404_and_the_server_lives_on(tiny_server: Server) -> None:
    answer = _post(tiny_server, "/tokenize", {"model": "nope", "content": "x"})
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "model_not_found"
    answer = _post(tiny_server, "/detokenize", {"model": "nope", "tokens": [1]})
    assert answer.status_code == 404
    # After every bad id above, the router (which would have aborted in llama.cpp) still answers.
    assert _ok(tiny_server, "/detokenize", {"tokens": [72, 105]})["content"]
    assert httpx.get(f"{tiny_server.base_url}/healthz", timeout=5).status_code == 200
