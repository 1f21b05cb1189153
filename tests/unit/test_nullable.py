"""router/openai/nullable.py: null for an optional request field is its default; where the field's type admits
None, null stays; a required field stays required."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from router.endpoints.embeddings import EmbeddingRequest
from router.endpoints.responses import ResponsesRequest
from router.openai.requests import ChatCompletionRequest, CompletionRequest

MESSAGES = [{"role": "user", "content": "hi"}]


def test_chat_nulls_take_the_defaults() -> None:
    nulls = ("n", "stream", "logprobs", "parallel_tool_calls", "ignore_eos", "speculative")
    request = ChatCompletionRequest.model_validate(
        {"messages": MESSAGES, **dict.fromkeys(nulls), "stream_options": {"include_usage": None}}
    )
    assert request.n == 1 and request.stream is False and request.logprobs is False
    assert request.parallel_tool_calls is True and request.ignore_eos is False and request.speculative is True
    assert request.stream_options is not None and request.stream_options.include_usage is False


def test_nulls_inside_tool_calls_take_the_defaults() -> None:
    call = {"id": "c1", "type": None, "function": {"name": "f", "arguments": None}}
    request = ChatCompletionRequest.model_validate(
        {"messages": [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [call]}]}
    )
    tool_calls = request.messages[1].tool_calls
    assert tool_calls is not None and tool_calls[0].type == "function"
    assert tool_calls[0].function.arguments == ""


def test_nullable_fields_keep_null_and_bad_values_still_fail() -> None:
    request = CompletionRequest.model_validate({"prompt": "x", "max_tokens": None, "echo": None, "n": None})
    assert request.max_tokens is None  # completions: null is no limit, not the default 16
    assert request.echo is False and request.n == 1
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"messages": MESSAGES, "n": 0})
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"messages": MESSAGES, "stream": "maybe"})


def test_required_fields_stay_required() -> None:
    with pytest.raises(ValidationError):
        EmbeddingRequest.model_validate({"input": None})
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"messages": None})


def test_responses_and_embeddings_nulls() -> None:
    responses = ResponsesRequest.model_validate({"input": "hi", "stream": None, "parallel_tool_calls": None})
    assert responses.stream is False and responses.parallel_tool_calls is True
    embeddings = EmbeddingRequest.model_validate({"input": "hi", "encoding_format": None, "truncate": None})
    assert embeddings.encoding_format == "float" and embeddings.truncate is False


def test_a_literal_that_admits_none_keeps_null() -> None:
    from typing import Literal

    from router.openai.nullable import NullMeansDefault

    class Body(NullMeansDefault):
        mode: Literal["auto", None] = "auto"
        flag: Literal["on", "off"] = "on"

    body = Body.model_validate({"mode": None, "flag": None})
    assert body.mode is None and body.flag == "on"
