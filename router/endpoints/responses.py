"""OpenAI Responses requests turned into chat requests, and the `response` object that answers them.

A Responses request is a chat request in other clothes: `instructions` is a system message, `input`
items become chat messages (function calls and their outputs become assistant `tool_calls` and `tool`
messages, reasoning items become `reasoning_content`), flat function tools become chat tools and
`text.format` becomes `response_format`. Converting to a `ChatCompletionRequest` lets the chat
planner (router/preprocess/chat_plan.py) template the prompt and build the grammars and output parsers, so
tools, structured output and reasoning behave exactly as they do on /v1/chat/completions.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from router.api.errors import APIError, validation_error
from router.api.unicode_check import UnicodeCheckedModel
from router.client.generation import Generation, Usage
from router.openai.nullable import NullMeansDefault
from router.openai.requests import INT64_MAX, INT64_MIN, ChatCompletionRequest
from router.parsers.output import ChoiceOutput
from router.preprocess.chat_plan import ChatPlan, RequestFields, chat_generation
from router.preprocess.media_parts import PART_PARAM, load_media
from router.state import ServerState
from shared.vocab import TokenizerError

_LENIENT = ConfigDict(extra="allow")
_TEXT_PARTS = frozenset({"input_text", "output_text", "text", "summary_text", "reasoning_text"})
_MEDIA_PARTS = frozenset(
    {"input_image", "input_audio", "input_file", "input_video", "image_url", "audio_url"}
)
_MESSAGE_ROLES = frozenset({"user", "system", "developer", "assistant"})
# llama.cpp sampling extensions a client may send beside the Responses fields.
_FORWARDED = (
    "lora_scale",
    "top_k",
    "min_p",
    "typical_p",
    "repeat_penalty",
    "repeat_last_n",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "ignore_eos",
)


class TextOptions(BaseModel):
    model_config = _LENIENT
    format: dict[str, Any] | None = None


class ReasoningOptions(BaseModel):
    model_config = _LENIENT
    effort: str | None = None
    summary: str | None = None


class ResponsesRequest(NullMeansDefault, UnicodeCheckedModel):
    """POST /v1/responses (and the fields of a WebSocket `response.create`). Unknown fields are ignored."""

    model_config = _LENIENT

    model: str | None = None
    input: str | list[dict[str, Any]] | None = None
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    stop: str | list[str] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    text: TextOptions | None = None
    reasoning: ReasoningOptions | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    stream: bool = False
    previous_response_id: str | None = None
    conversation: Any = None
    background: bool | None = None
    truncation: Literal["auto", "disabled"] | None = None
    user: str | None = None

    @field_validator("metadata")
    @classmethod
    def _check_metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None:
            if len(value) > 16:
                raise ValueError("metadata has at most 16 keys")
            if any(len(k) > 64 or len(v) > 512 for k, v in value.items()):
                raise ValueError("metadata keys have at most 64 characters and values 512")
        return value


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# --- input items -> chat messages -----------------------------------------------------------------


def _media_error(kind: str, param: str, has_projector: bool) -> APIError:
    reason = (
        "multimodal input is not supported by this server yet"
        if has_projector
        else "this model has no multimodal projector"
    )
    return APIError(400, f"{param} is an {kind} part, but {reason}", param=param)


def _parts_text(content: Any, param: str, has_projector: bool) -> str:
    """The text of a content string or list of content parts; media parts are a 400."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{param} must be a string or a list of content parts", param=param)
    texts: list[str] = []
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _TEXT_PARTS:
            text = part.get("text")
            if not isinstance(text, str):
                raise APIError(400, f"{where}.text must be a string", param=f"{where}.text")
            texts.append(text)
        elif kind == "refusal":
            texts.append(str(part.get("refusal", "")))
        elif kind in _MEDIA_PARTS:
            raise _media_error(str(kind), where, has_projector)
        else:
            raise APIError(400, f"{where} has an unsupported content part type {kind!r}", param=where)
    return "".join(texts)


_LOADED_MEDIA = frozenset({"input_image", "input_audio", "image_url"})


def _message_content(content: Any, param: str, has_projector: bool) -> str | list[dict[str, Any]]:
    """A message's content: text, or (with a projector) chat content parts keeping the media parts,
    which router/preprocess/media_parts.py loads."""
    if not (has_projector and isinstance(content, list)):
        return _parts_text(content, param, has_projector)
    kinds = [part.get("type") if isinstance(part, dict) else None for part in content]
    if not any(kind in _LOADED_MEDIA for kind in kinds):
        return _parts_text(content, param, has_projector)
    parts: list[dict[str, Any]] = []
    for j, (part, kind) in enumerate(zip(content, kinds, strict=True)):
        if kind in _LOADED_MEDIA:
            parts.append({**part, PART_PARAM: f"{param}[{j}]"})  # errors name the input item
        else:
            parts.append({"type": "text", "text": _parts_text([part], f"{param}[{j}]", has_projector)})
    return parts


def _reasoning_text(item: dict[str, Any], param: str) -> str:
    content = item.get("content")
    if isinstance(content, list) and content:
        return _parts_text(content, f"{param}.content", False)
    summary = item.get("summary")
    if isinstance(summary, list) and summary:
        return _parts_text(summary, f"{param}.summary", False)
    return ""


def _required_string(item: dict[str, Any], key: str, param: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value:
        raise APIError(400, f"{param}.{key} is required (a non-empty string)", param=f"{param}.{key}")
    return value


class _Conversation:
    """Chat messages built item by item; adjacent assistant items (reasoning, text, calls) form one turn."""

    def __init__(self, has_projector: bool) -> None:
        self.messages: list[dict[str, Any]] = []
        self.has_projector = has_projector
        self.call_names: dict[str, str] = {}

    def _assistant_turn(self, *, for_content: bool) -> dict[str, Any] | None:
        last = self.messages[-1] if self.messages else None
        if last is None or last["role"] != "assistant" or not last.get("_from_items"):
            return None
        if for_content and (last.get("content") or last.get("tool_calls")):
            return None
        return last

    def add(self, item: dict[str, Any], index: int) -> None:
        param = f"input[{index}]"
        if not isinstance(item, dict):
            raise APIError(400, f"{param} must be an object", param=param)
        kind = item.get("type") or ("message" if "role" in item else None)
        if kind == "message":
            self._message(item, param)
        elif kind == "reasoning":
            text = _reasoning_text(item, param)
            if text:
                turn = self._assistant_turn(for_content=True)
                if turn is None or turn.get("reasoning_content"):
                    turn = {"role": "assistant", "content": "", "_from_items": True}
                    self.messages.append(turn)
                turn["reasoning_content"] = text
        elif kind == "function_call":
            self._function_call(item, param)
        elif kind == "function_call_output":
            call_id = _required_string(item, "call_id", param)
            output = _parts_text(item.get("output", ""), f"{param}.output", self.has_projector)
            message: dict[str, Any] = {"role": "tool", "tool_call_id": call_id, "content": output}
            if call_id in self.call_names:
                message["name"] = self.call_names[call_id]
            self.messages.append(message)
        elif kind == "item_reference":
            raise APIError(
                400,
                f"{param} is an item_reference, but this server does not store items; send the item itself",
                param=param,
            )
        else:
            raise APIError(400, f"{param} has an unsupported item type {kind!r}", param=f"{param}.type")

    def _message(self, item: dict[str, Any], param: str) -> None:
        role = item.get("role", "user")
        if role not in _MESSAGE_ROLES:
            raise APIError(400, f"{param}.role {role!r} is not one of {sorted(_MESSAGE_ROLES)}", param=param)
        content, where = item.get("content", ""), f"{param}.content"
        text: Any = (
            _parts_text(content, where, self.has_projector)
            if role == "assistant"
            else _message_content(content, where, self.has_projector)
        )
        if role == "assistant":
            turn = self._assistant_turn(for_content=True)
            if turn is not None:
                turn["content"] = text
                return
            self.messages.append({"role": "assistant", "content": text, "_from_items": True})
            return
        self.messages.append({"role": role, "content": text})

    def _function_call(self, item: dict[str, Any], param: str) -> None:
        name = _required_string(item, "name", param)
        call_id = item.get("call_id") or item.get("id") or new_id("call")
        arguments = item.get("arguments", "")
        if not isinstance(arguments, str):
            raise APIError(400, f"{param}.arguments must be a JSON string", param=f"{param}.arguments")
        self.call_names[str(call_id)] = name
        call = {"id": str(call_id), "type": "function", "function": {"name": name, "arguments": arguments}}
        turn = self._assistant_turn(for_content=False)
        if turn is None:
            turn = {"role": "assistant", "content": None, "_from_items": True}
            self.messages.append(turn)
        turn.setdefault("tool_calls", []).append(call)

    def result(self) -> list[dict[str, Any]]:
        return [{k: v for k, v in m.items() if k != "_from_items"} for m in self.messages]


def input_messages(body: ResponsesRequest, has_projector: bool = False) -> list[dict[str, Any]]:
    """`instructions` and `input` as chat messages."""
    conversation = _Conversation(has_projector)
    if body.instructions:
        conversation.messages.append({"role": "system", "content": body.instructions})
    if isinstance(body.input, str):
        conversation.messages.append({"role": "user", "content": body.input})
    else:
        for index, item in enumerate(body.input or []):
            conversation.add(item, index)
    if not conversation.messages:
        raise APIError(400, "input is required (a string or a list of input items)", param="input")
    return conversation.result()


def input_items(body: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's `input` as a list of items (a string is one user message)."""
    if isinstance(body.input, str):
        return [{"type": "message", "role": "user", "content": body.input}]
    return list(body.input or [])


# --- tools, tool_choice, text.format --------------------------------------------------------------


def chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Flat Responses function tools as chat tools; every other tool type is a 400."""
    if not tools:
        return None
    converted = []
    for index, tool in enumerate(tools):
        kind = tool.get("type")
        if kind != "function":
            raise APIError(
                400,
                f"tools[{index}] has type {kind!r}; this server supports only function tools",
                param=f"tools[{index}].type",
            )
        nested: dict[str, Any] = tool["function"] if isinstance(tool.get("function"), dict) else {}
        function = {
            "name": tool.get("name") or nested.get("name"),
            "description": tool.get("description") or nested.get("description"),
            "parameters": tool.get("parameters") or nested.get("parameters"),
            "strict": tool.get("strict", nested.get("strict")),
        }
        converted.append(
            {"type": "function", "function": {k: v for k, v in function.items() if v is not None}}
        )
    return converted


def chat_tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    if choice is None:
        return None
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise APIError(400, f"tool_choice {choice!r} is not none, auto or required", param="tool_choice")
        return choice
    if choice.get("type") != "function":
        raise APIError(
            400,
            f"tool_choice of type {choice.get('type')!r} is not supported; only function tools are",
            param="tool_choice",
        )
    name = choice.get("name") or (choice.get("function") or {}).get("name")
    if not isinstance(name, str) or not name:
        raise APIError(400, "tool_choice needs the function's name", param="tool_choice.name")
    return {"type": "function", "function": {"name": name}}


def chat_response_format(text: TextOptions | None) -> dict[str, Any] | None:
    fmt = text.format if text is not None else None
    if not fmt or fmt.get("type") == "text":
        return None
    kind = fmt.get("type")
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        nested: dict[str, Any] = fmt["json_schema"] if isinstance(fmt.get("json_schema"), dict) else {}
        schema = fmt.get("schema", nested.get("schema"))
        if not isinstance(schema, dict):
            raise APIError(400, "text.format.schema is required (a JSON Schema object)", param="text.format")
        spec = {"name": fmt.get("name") or nested.get("name") or "response", "schema": schema}
        if fmt.get("strict") is not None:
            spec["strict"] = fmt["strict"]
        return {"type": "json_schema", "json_schema": spec}
    raise APIError(
        400, f"text.format type {kind!r} is not text, json_object or json_schema", param="text.format.type"
    )


def to_chat_request(body: ResponsesRequest, has_projector: bool = False) -> ChatCompletionRequest:
    """The chat request that generates this response (planned by the chat planner)."""
    data: dict[str, Any] = {
        "model": body.model,
        "messages": input_messages(body, has_projector),
        "max_tokens": body.max_output_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "seed": body.seed,
        "stop": body.stop,
        "tools": chat_tools(body.tools),
        "tool_choice": chat_tool_choice(body.tool_choice),
        "parallel_tool_calls": body.parallel_tool_calls,
        "response_format": chat_response_format(body.text),
        "reasoning_effort": body.reasoning.effort if body.reasoning else None,
    }
    extra = body.model_extra or {}
    data.update({key: extra[key] for key in _FORWARDED if key in extra})
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as error:
        raise validation_error(error.errors(), _CHAT_TO_RESPONSES) from error


# The chat request's fields that stand for Responses fields, named as the client sent them.
RESPONSES_FIELDS = RequestFields(
    messages="input",
    max_tokens="max_output_tokens",
    response_format="text.format",
    schema="text.format.schema",
)
_CHAT_TO_RESPONSES = {
    "messages": RESPONSES_FIELDS.messages,
    "max_tokens": RESPONSES_FIELDS.max_tokens,
    "response_format": RESPONSES_FIELDS.response_format,
    "response_format.json_schema": RESPONSES_FIELDS.response_format,  # text.format holds its fields flat
    "tools.*.function": "tools.*",  # Responses tools hold the function's fields flat
}


def check_stateless(body: ResponsesRequest) -> None:
    """What HTTP /v1/responses cannot do without stored responses: a clear 400 each."""
    if body.previous_response_id is not None:
        raise APIError(
            400,
            "previous_response_id is not supported over HTTP: POST /v1/responses is stateless (store is "
            "always false); send the whole conversation as input items, or use the WebSocket transport "
            "(WS /v1/responses), which keeps the responses of its connection",
            param="previous_response_id",
            code="previous_response_not_supported",
        )
    if body.conversation is not None:
        raise APIError(
            400, "conversation is not supported: this server stores no conversations", param="conversation"
        )
    if body.background:
        raise APIError(400, "background responses are not supported", param="background")


# --- the response object --------------------------------------------------------------------------


def usage_object(usage: Usage, reasoning_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": min(reasoning_tokens, usage.completion_tokens)},
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


def responses_tool(tool: dict[str, Any]) -> dict[str, Any]:
    """A chat tool back in the flat Responses shape (echoed in the response object)."""
    function = tool["function"]
    return {
        "type": "function",
        "name": function["name"],
        "description": function.get("description"),
        "parameters": function.get("parameters"),
        "strict": function.get("strict", True),
    }


@dataclass
class ResponseDraft:
    """What the response object says besides its output: ids, echoed request fields."""

    id: str
    created_at: int
    model: str
    body: ResponsesRequest
    chat: ChatCompletionRequest
    previous_response_id: str | None = None

    def envelope(
        self,
        status: str,
        output: list[dict[str, Any]],
        usage: dict[str, Any] | None,
        incomplete_details: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        body, chat = self.body, self.chat
        text = body.text.model_dump(exclude_none=True) if body.text is not None else {}
        text.setdefault("format", {"type": "text"})
        reasoning = body.reasoning
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "completed_at": int(time.time()) if status in ("completed", "incomplete") else None,
            "background": False,
            "error": error,
            "incomplete_details": incomplete_details,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "max_tool_calls": None,
            "metadata": body.metadata or {},
            "model": self.model,
            "output": output,
            "parallel_tool_calls": body.parallel_tool_calls,
            "previous_response_id": self.previous_response_id,
            "reasoning": {
                "effort": reasoning.effort if reasoning else None,
                "summary": reasoning.summary if reasoning else None,
            },
            "store": False,
            "temperature": 1.0 if body.temperature is None else body.temperature,
            "text": text,
            "tool_choice": body.tool_choice if body.tool_choice is not None else "auto",
            "tools": [responses_tool(t.model_dump(exclude_none=True)) for t in chat.tools or []],
            "top_p": 1.0 if body.top_p is None else body.top_p,
            "truncation": body.truncation or "disabled",
            "usage": usage,
            "user": body.user,
        }


@dataclass
class PreparedResponse:
    """A response ready to run: its draft, the submitted generation and a fresh output parser."""

    draft: ResponseDraft
    generation: Generation
    output: ChoiceOutput
    discard_output: bool = False  # `generate: false` (WebSocket): prefill only, report no output

    def reasoning_tokens(self, state: ServerState, text: str) -> int:
        if not text:
            return 0
        try:
            return len(state.vocab.tokenize(text, add_special=False, parse_special=False))
        except TokenizerError:
            return 0


async def start_response(
    state: ServerState,
    body: ResponsesRequest,
    request_prefix: str = "resp",
    *,
    previous_response_id: str | None = None,
    generate: bool = True,
) -> PreparedResponse:
    """Plans the prompt and grammar as chat does and submits the generation to a worker."""

    chat = await state.preparer.run(to_chat_request, body, state.config.model.mtmd is not None)
    media = await load_media(state, chat.messages)

    def prepare() -> tuple[ChatCompletionRequest, Generation, ChatPlan]:  # on a pool thread: see offload.py
        generation, plan = chat_generation(
            state,
            chat,
            rid_prefix=request_prefix,
            endpoint="responses",
            output_limit=chat.output_limit if generate else 1,
            fields=RESPONSES_FIELDS,
            media=media,
        )
        return chat, generation, plan

    chat, generation, plan = await state.preparer.run(prepare)
    draft = ResponseDraft(
        new_id("resp"), int(time.time()), state.model_name, body, chat, previous_response_id
    )
    await generation.start()
    return PreparedResponse(draft, generation, plan.outputs(), discard_output=not generate)
