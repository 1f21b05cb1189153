"""Every sampling parameter the API accepts goes through a real generation, not only its validation.

A frequency_penalty of 0.1 once killed the worker (a ctypes signature mismatch) while every validation test
passed. Here each accepted field runs through completions and chat, streamed and not, on the tiny generated
model, and where greedy decoding makes the effect deterministic the test checks that the field changed (or
did not change) the output as it should. Afterwards the same worker process is still serving.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.server import Server, model_config, run_server

PROMPT = "hello world"
CHAT = [{"role": "user", "content": PROMPT}]
INT32_MAX = 2**31 - 1

# One case per accepted field (and a few combinations); each must generate.
COMMON_CASES: dict[str, dict[str, Any]] = {
    "frequency_penalty": {"frequency_penalty": 0.1},
    "frequency_penalty_max": {"frequency_penalty": 2.0},
    "frequency_penalty_negative": {"frequency_penalty": -2.0},
    "presence_penalty": {"presence_penalty": 0.6},
    "presence_penalty_negative": {"presence_penalty": -2.0},
    "repeat_penalty": {"repeat_penalty": 1.1},
    "repeat_penalty_whole_context": {"repeat_penalty": 1.3, "repeat_last_n": -1},
    "repeat_penalty_huge_window": {"repeat_penalty": 1.3, "repeat_last_n": INT32_MAX},
    "repeat_last_n_zero": {"repeat_penalty": 1.3, "repeat_last_n": 0},
    "temperature_max": {"temperature": 2.0, "seed": 3},
    "top_k": {"temperature": 0.8, "top_k": 5, "seed": 1},
    "top_k_huge": {"temperature": 0.8, "top_k": INT32_MAX, "seed": 1},
    "top_p": {"temperature": 0.8, "top_p": 0.5, "seed": 1},
    "min_p": {"temperature": 0.8, "min_p": 0.2, "seed": 1},
    "typical_p": {"temperature": 0.8, "typical_p": 0.5, "seed": 1},
    "seed_negative": {"temperature": 1.0, "seed": -(2**63)},
    "seed_max": {"temperature": 1.0, "seed": 2**63 - 1},
    "logit_bias": {"logit_bias": {"65": 5.0, "66": -100}},
    "ignore_eos": {"ignore_eos": True},
    "stop": {"stop": ["zz", "\n\n"]},
    "user": {"user": "someone"},
    "n": {"n": 2, "temperature": 0.9, "seed": 5},
    "grammar": {"grammar": 'root ::= [a-z]+ "."'},
    "json_object": {"response_format": {"type": "json_object"}},
    "everything": {
        "temperature": 0.7,
        "top_k": 40,
        "top_p": 0.9,
        "min_p": 0.05,
        "typical_p": 0.95,
        "repeat_penalty": 1.1,
        "repeat_last_n": 32,
        "presence_penalty": 0.3,
        "frequency_penalty": 0.3,
        "logit_bias": {"70": 1.0},
        "seed": 42,
        "n": 2,
        "stop": ["qq"],
    },
}
COMPLETION_CASES: dict[str, dict[str, Any]] = {
    "logprobs": {"logprobs": 3},
    "echo": {"echo": True},
    "best_of": {"best_of": 2, "n": 2},
    "token_prompt": {"prompt": [104, 101, 108, 108, 111]},
    "several_prompts": {"prompt": ["a", "b"], "frequency_penalty": 0.5},
}
CHAT_CASES: dict[str, dict[str, Any]] = {
    "logprobs": {"logprobs": True, "top_logprobs": 3},
    "max_completion_tokens": {"max_completion_tokens": 5},
    "reasoning_effort": {"reasoning_effort": "low"},
    "include_reasoning": {"include_reasoning": False},
    "chat_template_kwargs": {"chat_template_kwargs": {"enable_thinking": False}},
    "continue_final_message": {
        "messages": [*CHAT, {"role": "assistant", "content": "Sure"}],
        "add_generation_prompt": False,
        "continue_final_message": True,
    },
    "tools_none": {
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "tool_choice": "none",
        "parallel_tool_calls": False,
    },
    "json_schema": {
        "response_format": {
            "type": "json_schema",
            "json_schema": {
                "name": "x",
                "schema": {"type": "object", "properties": {"a": {"type": "integer"}}},
            },
        }
    },
}
RESPONSES_CASES: dict[str, dict[str, Any]] = {
    "penalties": {"frequency_penalty": 0.5, "presence_penalty": 0.5, "repeat_penalty": 1.2},
    "repeat_last_n": {"repeat_penalty": 1.2, "repeat_last_n": -1},
    "truncation": {"top_k": 10, "min_p": 0.1, "typical_p": 0.9, "top_p": 0.8, "temperature": 0.7, "seed": 9},
    "logit_bias": {"logit_bias": {"65": 3.0}, "ignore_eos": True},
    "stop": {"stop": ["zz"], "temperature": 0},
}


@pytest.fixture(scope="module")
def server(tiny_llama_gguf: Path) -> Iterator[Server]:
    # Flash attention off: exact greedy comparisons between requests (see test_sampling_api).
    with run_server(model_config(tiny_llama_gguf, n_seq_max=8, n_ctx=2048, flash_attn=False)) as running:
        running.workers()
        yield running


def _generate(http: httpx.Client, path: str, body: dict[str, Any]) -> list[str]:
    """Texts of every choice, by index: from the answer, or joined from the stream's chunks."""
    chat = path.endswith("chat/completions")
    if not body["stream"]:
        response = http.post(path, json=body)
        assert response.status_code == 200, response.text
        payload = response.json()
        assert payload["usage"]["completion_tokens"] >= 1
        choices = sorted(payload["choices"], key=lambda c: c["index"])
        return [(c["message"]["content"] or "") if chat else c["text"] for c in choices]
    texts: dict[int, str] = {}
    finished: set[int] = set()
    with http.stream("POST", path, json=body) as response:
        assert response.status_code == 200, response.read()
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    for event in events[:-1]:
        chunk = json.loads(event)
        assert "error" not in chunk, chunk
        for choice in chunk["choices"]:
            piece = (choice["delta"].get("content") or "") if chat else choice["text"]
            texts[choice["index"]] = texts.get(choice["index"], "") + piece
            if choice.get("finish_reason"):
                finished.add(choice["index"])
    assert finished == set(texts)
    return [texts[i] for i in sorted(texts)]


def _completion(http: httpx.Client, fields: dict[str, Any], stream: bool) -> list[str]:
    body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, **fields, "stream": stream}
    return _generate(http, "/v1/completions", body)


def _chat(http: httpx.Client, fields: dict[str, Any], stream: bool) -> list[str]:
    body = {"messages": CHAT, "max_tokens": 12, "temperature": 0, **fields, "stream": stream}
    return _generate(http, "/v1/chat/completions", body)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("case", [*COMMON_CASES, *COMPLETION_CASES])
def test_completion_generates_with(server: Server, case: str, stream: bool) -> None:
    fields = COMMON_CASES.get(case) or COMPLETION_CASES[case]
    if stream and fields.get("best_of"):
        pytest.skip("best_of is a non-streaming field")
    with server.http() as http:
        texts = _completion(http, fields, stream)
    prompts = fields.get("prompt")
    expected = fields.get("n", 1) * (
        len(prompts) if isinstance(prompts, list) and isinstance(prompts[0], str) else 1
    )
    assert len(texts) == expected


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("case", [*COMMON_CASES, *CHAT_CASES])
def test_chat_generates_with(server: Server, case: str, stream: bool) -> None:
    fields = COMMON_CASES.get(case) or CHAT_CASES[case]
    with server.http() as http:
        texts = _chat(http, fields, stream)
    assert len(texts) == fields.get("n", 1)


@pytest.mark.parametrize("case", list(RESPONSES_CASES))
def test_responses_generates_with(server: Server, case: str) -> None:
    # Greedy unless the case samples (seeded): unseeded, the first token could be the end token (0 tokens).
    body = {"input": PROMPT, "max_output_tokens": 12, "temperature": 0, **RESPONSES_CASES[case]}
    with server.http() as http:
        response = http.post("/v1/responses", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["output_tokens"] >= 1


def _greedy(http: httpx.Client, **fields: Any) -> str:
    return _completion(http, {"max_tokens": 40, **fields}, stream=False)[0]


def test_penalties_change_greedy_output(server: Server) -> None:
    """The penalties reach the sampler: on the tiny model's repetitive greedy text each one changes it."""
    with server.http() as http:
        plain = _greedy(http)
        for fields in (
            {"frequency_penalty": 2.0},
            {"presence_penalty": 2.0},
            {"repeat_penalty": 1.5},
            {"repeat_penalty": 1.5, "repeat_last_n": -1},
        ):
            assert _greedy(http, **fields) != plain, fields
        # A window of zero turns the repeat penalty off; neutral values change nothing.
        assert _greedy(http, repeat_penalty=1.5, repeat_last_n=0) == plain
        assert _greedy(http, frequency_penalty=0.0, presence_penalty=0.0, repeat_penalty=1.0) == plain


def test_truncating_samplers_to_one_candidate_equal_greedy(server: Server) -> None:
    with server.http() as http:
        plain = _greedy(http)
        assert _greedy(http, temperature=1.5, top_k=1, seed=7) == plain
        assert _greedy(http, temperature=1.5, min_p=1.0, seed=7) == plain
        assert _greedy(http, temperature=1.5, top_p=1e-6, seed=7) == plain


def test_worker_survived_every_case(server: Server) -> None:
    """No case above restarted the worker (a crash turns into 503s only if someone checks)."""
    first = server._seen_workers
    assert server.workers() and set(server.workers()) <= first
    assert "restarting" not in server.log()
    with server.http() as http:
        assert http.post("/v1/completions", json={"prompt": "a", "max_tokens": 2}).status_code == 200
