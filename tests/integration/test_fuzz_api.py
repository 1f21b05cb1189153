"""Fuzzes the HTTP API with schemathesis against its own /openapi.json, on a real server over HTTP.

The server runs the tiny generated model with `max_output_tokens: 64` (room for the shortest structured
document or tool call, which the budget check requires of a request), so the cases exercise validation
and the answer shapes, not generation. The bar: no 5xx, no hang (every request has a timeout), every
status, content type, header and body as the document says. A short derandomized run (the same cases
every time) is part of the suite; `make fuzz` sets LLAMAFLEET_FUZZ_EXAMPLES to run thousands.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.integration.server import Server, model_config, run_server

# Examples per operation (8 operations): a few hundred cases in the suite, thousands under `make fuzz`.
EXAMPLES = int(os.environ.get("LLAMAFLEET_FUZZ_EXAMPLES", "50"))
REQUEST_TIMEOUT = 30.0
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


def _auth(server: Server) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.api_key}"}


@pytest.fixture(scope="module")
def fuzz_server(tiny_llama_gguf: Path) -> Iterator[Server]:
    model = model_config(tiny_llama_gguf, max_output_tokens=64, n_ctx=1024, embedding_pooling="mean")
    env = {"LLAMAFLEET_INJECT_FAULTS": "decode=boom"}  # for the stream error events below
    with run_server(model, server={"max_queued_requests": 64}, env=env) as server:
        yield server


@pytest.fixture(scope="module")
def api_schema(fuzz_server: Server) -> Any:
    return schemathesis.openapi.from_url(
        f"{fuzz_server.base_url}/openapi.json", headers=_auth(fuzz_server), timeout=REQUEST_TIMEOUT
    )


def _fuzz(operation: Any, mode: GenerationMode, server: Server, counter: list[int]) -> str | None:
    """Runs one operation's cases; the first failure (shrunk by hypothesis) as text, or None."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        deadline=None,
        database=None,
        print_blob=False,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        counter[0] += 1
        case.call_and_validate(
            base_url=server.base_url, headers=_auth(server), timeout=REQUEST_TIMEOUT, checks=CHECKS
        )

    try:
        run()
    except Unsatisfiable:  # nothing to negate: an operation without parameters or body
        return None
    except BaseException as error:  # schemathesis raises a BaseExceptionGroup of its failures
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            raise
        return f"{operation.label} ({mode.value}): {error}"  # each is reported, then the test fails
    return None


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
def test_api_matches_its_openapi_document(api_schema: Any, fuzz_server: Server, mode: GenerationMode) -> None:
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 8
    counter = [0]
    failures = [f for f in (_fuzz(op, mode, fuzz_server, counter) for op in operations) if f is not None]
    print(f"{counter[0]} {mode.value} cases over {len(operations)} operations")
    assert not failures, "\n\n".join(failures)
    # Nothing the cases took is kept: no request in flight, no sequence or KV reservation held.
    _wait_idle(fuzz_server)


def _wait_idle(server: Server, timeout: float = 10.0) -> None:
    names = [f'llamafleet_worker_{n}{{worker="0"}}' for n in ("in_flight_requests", "kv_cells_reserved")]
    deadline = time.monotonic() + timeout
    while any((held := server.metrics()).get(name) != 0 for name in names):
        assert time.monotonic() < deadline, {name: held.get(name) for name in names}
        time.sleep(0.1)


# Requests the fuzzer rarely builds (streams, logprobs, tool calls, n > 1, a failure mid-stream), checked
# against the document the same way: every SSE event's JSON must match its declared schema too.
CHAT = [{"role": "user", "content": "hello"}]
TOOLS = [{"type": "function", "function": {"name": "get", "parameters": {"type": "object"}}}]
FLAT_TOOLS = [{"type": "function", "name": "get", "parameters": {"type": "object"}}]
STREAM_USAGE = {"stream": True, "stream_options": {"include_usage": True}}
KNOWN: list[tuple[str, Any, dict[str, str], int]] = [
    ("GET /healthz", None, {}, 200),
    ("GET /metrics", None, {}, 200),
    ("GET /v1/models", None, {}, 200),
    ("GET /v1/responses", None, {}, 426),
    ("POST /v1/completions", {"prompt": "hello", "logprobs": 2, **STREAM_USAGE}, {}, 200),
    ("POST /v1/completions", {"prompt": ["a", "b"], "n": 2, "echo": True, "logprobs": None}, {}, 200),
    ("POST /v1/completions", {"prompt": [1, 2, 3], "logprobs": 3}, {}, 200),
    ("POST /v1/completions", {"prompt": "hello", "stream": True}, {"x-request-id": "boom"}, 200),
    ("POST /v1/completions", {"prompt": "hello"}, {"x-request-id": "boom"}, 500),
    (
        "POST /v1/chat/completions",
        {"messages": CHAT, "logprobs": True, "top_logprobs": 2, **STREAM_USAGE},
        {},
        200,
    ),
    ("POST /v1/chat/completions", {"messages": CHAT, "n": 2, "logprobs": True, "top_logprobs": 1}, {}, 200),
    ("POST /v1/chat/completions", {"messages": CHAT, "tools": TOOLS, "tool_choice": "required"}, {}, 200),
    (
        "POST /v1/chat/completions",
        {"messages": CHAT, "tools": TOOLS, "tool_choice": "required", "stream": True},
        {},
        200,
    ),
    ("POST /v1/chat/completions", {"messages": CHAT, "stream": True}, {"x-request-id": "boom"}, 200),
    ("POST /v1/responses", {"input": "hi", "stream": True}, {}, 200),
    ("POST /v1/responses", {"input": "hi", "tools": FLAT_TOOLS, "tool_choice": "required"}, {}, 200),
    ("POST /v1/responses", {"input": "hi", "stream": True}, {"x-request-id": "boom"}, 200),
    ("POST /v1/embeddings", {"input": ["a", "b c"]}, {}, 200),
    ("POST /v1/embeddings", {"input": [[1, 2], [3]], "encoding_format": "base64", "dimensions": 4}, {}, 200),
]


@pytest.mark.parametrize(("label", "body", "headers", "status"), KNOWN, ids=lambda v: str(v)[:40])
def test_known_requests_match_the_document(
    api_schema: Any, fuzz_server: Server, label: str, body: Any, headers: dict[str, str], status: int
) -> None:
    method, path = label.split(" ")
    operation = api_schema[path][method]
    case = operation.Case(body=body) if body is not None else operation.Case()
    response = case.call_and_validate(
        base_url=fuzz_server.base_url,
        headers={**_auth(fuzz_server), **headers},
        timeout=REQUEST_TIMEOUT,
        checks=CHECKS if status < 500 else [c for c in CHECKS if c is not not_a_server_error],  # injected
    )
    assert response.status_code == status, response.text
