"""Request bodies of the OpenAI endpoints, validated as OpenAI validates them (bad values are 400s; null
for an optional field is the default: router/openai/nullable.py).

Unknown fields are accepted and ignored, as OpenAI-compatible servers do, so newer clients keep working;
llama.cpp extensions (top_k, min_p, repeat_penalty, grammar, ...) are accepted by name.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from router.api.unicode_check import UnicodeCheckedModel
from router.openai.nullable import NullMeansDefault
from shared.config import LORA_SCALE_LIMIT

_LENIENT = ConfigDict(extra="allow")

# Integers travel to the worker as msgpack (64-bit) and into llama.cpp as C ints: bound them here so an
# absurd value is a 400, not an overflow further down.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MAX = 2**31 - 1


class FieldError(ValueError):
    """A check across fields that names the field to blame, relative to the model checked: the 400's
    `param` (router/api/errors.py puts the model's own place in front)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class StreamOptions(NullMeansDefault):
    model_config = _LENIENT
    include_usage: bool = False


class JsonSchemaFormat(NullMeansDefault):
    model_config = _LENIENT
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = _LENIENT
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _check(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise FieldError("json_schema", "response_format json_schema needs a json_schema object")
        return self


class SamplingFields(NullMeansDefault, UnicodeCheckedModel):
    """Fields shared by completions and chat completions."""

    model_config = _LENIENT

    model: str | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    user: str | None = None
    # llama.cpp / vLLM extensions
    top_k: int | None = Field(default=None, ge=0, le=INT32_MAX)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    typical_p: float | None = Field(default=None, gt=0.0, le=1.0)
    repeat_penalty: float | None = Field(default=None, gt=0.0)
    repeat_last_n: int | None = Field(default=None, ge=-1, le=INT32_MAX)
    ignore_eos: bool = False
    grammar: str | None = None
    # Structured output: also accepted on /v1/completions, as llama-server does.
    response_format: ResponseFormat | None = None
    # llamafleet: false keeps this request out of speculative decoding (README: speculative decoding).
    speculative: bool = True
    # llamafleet: the scale of the LoRA adapter that `model` names (0 to model.lora_max_scale).
    lora_scale: float | None = Field(default=None, ge=0.0, le=LORA_SCALE_LIMIT, allow_inf_nan=False)

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _check_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not key.lstrip("-").isdigit():
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError("logit_bias values must be between -100 and 100")
        return value

    @property
    def stop_list(self) -> list[str]:
        return list(self.stop or [])  # normalised to a list by the validator

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    suffix: str | None = None
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _check(self) -> CompletionRequest:
        if self.suffix:
            raise FieldError("suffix", "suffix (fill-in-the-middle) is not supported by this server")
        if self.best_of is not None and self.best_of != self.n:
            raise FieldError("best_of", "best_of other than n is not supported")
        if self.stream and self.n > 1 and self.echo:
            raise FieldError("echo", "echo with n > 1 is not supported in streaming mode")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of prompts, each text or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise ValueError("prompt must not be empty")
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]


class FunctionCall(NullMeansDefault):
    model_config = _LENIENT
    name: str
    arguments: str | dict[str, Any] = ""


class ToolCall(NullMeansDefault):
    model_config = _LENIENT
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = _LENIENT

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class FunctionDefinition(BaseModel):
    model_config = _LENIENT
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = _LENIENT
    type: Literal["function"]
    function: FunctionDefinition


class ToolChoiceFunction(BaseModel):
    name: str


class ToolChoiceObject(BaseModel):
    model_config = _LENIENT
    type: Literal["function"]
    function: ToolChoiceFunction


class PredictionTextPart(BaseModel):
    model_config = _LENIENT

    type: Literal["text"]
    text: str


class Prediction(BaseModel):
    """OpenAI predicted outputs: text the completion is expected to largely repeat."""

    model_config = _LENIENT

    type: Literal["content"]
    content: str | list[PredictionTextPart]

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    prediction: Prediction | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceObject | None = None
    parallel_tool_calls: bool = True
    reasoning_effort: str | None = None
    # False drops reasoning from the answer (it is still generated).
    include_reasoning: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise FieldError("top_logprobs", "top_logprobs requires logprobs to be true")
        forced = isinstance(self.tool_choice, ToolChoiceObject) or self.tool_choice == "required"
        if forced and not self.tools:
            raise FieldError("tool_choice", "tool_choice requires tools")
        if isinstance(self.tool_choice, ToolChoiceObject):
            names = {t.function.name for t in self.tools or []}
            if self.tool_choice.function.name not in names:
                raise FieldError(
                    "tool_choice", f"tool_choice names an unknown function {self.tool_choice.function.name!r}"
                )
        return self

    @property
    def output_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
