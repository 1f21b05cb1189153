"""Pydantic models of what the routes answer, for the OpenAPI document only.

Handlers build their JSON directly (validating every answer on the hot path would cost time), so these
models describe that JSON and nothing checks it at run time except the fuzz test, which validates real
answers against the document (tests/integration/test_fuzz_api.py). Keep them in step with the handlers:
fields that are sometimes absent are optional, fields that may be null say so.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

_OPEN = ConfigDict(extra="allow")


class ErrorDetail(BaseModel):
    model_config = _OPEN
    message: str
    type: str = Field(description="invalid_request_error, not_found_error, rate_limit_error, ...")
    param: str | None = Field(description="the request field at fault, when one is")
    code: str | None = Field(description="a stable machine-readable code, e.g. model_not_found, queue_full")


class ErrorBody(BaseModel):
    """OpenAI's error body, answered with every 4xx and 5xx status."""

    model_config = _OPEN
    error: ErrorDetail


class PromptTokensDetails(BaseModel):
    model_config = _OPEN
    cached_tokens: int


class Usage(BaseModel):
    model_config = _OPEN
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    model_config = _OPEN
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    model_config = _OPEN
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class Completion(BaseModel):
    """A text completion (`stream: false`); streamed chunks have the same shape, one choice each."""

    model_config = _OPEN
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class FunctionCallOut(BaseModel):
    model_config = _OPEN
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    model_config = _OPEN
    id: str
    type: Literal["function"]
    function: FunctionCallOut


class AssistantMessage(BaseModel):
    model_config = _OPEN
    role: str = Field(description="assistant")
    content: str | None
    tool_calls: list[ToolCallOut] | None = None
    reasoning_content: str | None = None


class TopLogprob(BaseModel):
    model_config = _OPEN
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    model_config = _OPEN
    content: list[TokenLogprob]


class ChatChoice(BaseModel):
    model_config = _OPEN
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    model_config = _OPEN
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    """What a chunk adds to the message: the role first, then content, reasoning or tool-call pieces."""

    model_config = _OPEN
    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChunkChoice(BaseModel):
    model_config = _OPEN
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletionChunk(BaseModel):
    """One SSE event of a streamed chat completion (`usage` only with stream_options.include_usage)."""

    model_config = _OPEN
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ResponseStreamEvent(BaseModel):
    """One SSE event of a streamed response: `response.created` ... `response.completed` and the rest."""

    model_config = _OPEN
    type: str
    sequence_number: int


class Embedding(BaseModel):
    model_config = _OPEN
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str = Field(description="floats, or base64 little-endian float32")


class EmbeddingUsage(BaseModel):
    model_config = _OPEN
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    model_config = _OPEN
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ModelMeta(BaseModel):
    model_config = _OPEN
    n_ctx: int | None
    n_vocab: int | None


class ModelCard(BaseModel):
    model_config = _OPEN
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    meta: ModelMeta | None = None
    parent: str | None = Field(default=None, description="a LoRA adapter's base model")
    root: str | None = Field(default=None, description="a LoRA adapter's file")


class TokenPiece(BaseModel):
    model_config = _OPEN
    id: int
    piece: str | list[int] = Field(description="the text, or its bytes when not valid UTF-8 on their own")


class TokenizeAnswer(BaseModel):
    """POST /tokenize: llama-server's `tokens` (ids, or with pieces), vLLM's `count` and `max_model_len`."""

    model_config = _OPEN
    tokens: list[int] | list[TokenPiece]
    count: int
    max_model_len: int | None = Field(description="the context per sequence, once a worker reported it")
    token_strs: list[str] | None = None


class DetokenizeAnswer(BaseModel):
    """POST /detokenize: the text as llama-server's `content` and vLLM's `prompt`."""

    model_config = _OPEN
    content: str
    prompt: str


class ModelList(BaseModel):
    model_config = _OPEN
    object: Literal["list"]
    data: list[ModelCard]


class Placement(BaseModel):
    model_config = _OPEN
    backend: str = Field(description="CPU, CUDA, Vulkan, ...")
    devices: list[str]
    offloaded_layers: int
    layers: int


class PoolHealth(BaseModel):
    model_config = _OPEN
    workers_up: int
    workers: int
    placement: dict[str, Placement] = Field(description="each ready worker (by index): where it runs")


class Health(BaseModel):
    """200 with `ok` while every model has a worker up, 503 with `unavailable` otherwise."""

    model_config = _OPEN
    status: Literal["ok", "unavailable"]
    workers_up: int
    workers: int
    models: dict[str, PoolHealth] = Field(description="each model's pool, by the name clients send")


class ResponseObject(BaseModel):
    """A Responses API `response` (POST /v1/responses with `stream: false`)."""

    model_config = _OPEN
    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["completed", "incomplete", "failed", "in_progress"]
    completed_at: int | None
    error: dict[str, Any] | None
    incomplete_details: dict[str, Any] | None
    instructions: str | None
    max_output_tokens: int | None
    metadata: dict[str, str]
    model: str
    output: list[dict[str, Any]] = Field(description="message, reasoning and function_call items")
    parallel_tool_calls: bool
    previous_response_id: str | None
    temperature: float
    tool_choice: str | dict[str, Any]
    tools: list[dict[str, Any]]
    top_p: float
    usage: dict[str, Any] | None
