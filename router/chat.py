"""POST /v1/chat/completions: template the conversation, generate, answer as OpenAI chat objects."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from router.errors import APIError
from router.generation import ChoiceDelta, Generation
from router.schemas import ChatCompletionRequest, ChatMessage
from router.state import ServerState, make_submit
from router.streaming import run_unless_disconnected, sse_with_errors


def _text_of(content: str | list[dict[str, Any]] | None, index: int) -> str | None:
    """Flattens OpenAI content parts to text; media parts need a multimodal model."""
    if content is None or isinstance(content, str):
        return content
    texts: list[str] = []
    for part in content:
        kind = part.get("type")
        if kind in ("text", "input_text"):
            texts.append(str(part.get("text", "")))
        elif kind in ("image_url", "input_image", "input_audio", "audio_url", "video_url"):
            raise APIError(
                400,
                f"messages[{index}] has a {kind} part but this model has no multimodal projector",
                param=f"messages[{index}].content",
            )
        else:
            raise APIError(400, f"messages[{index}] has an unknown content part type {kind!r}")
    return "".join(texts)


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the Hugging Face chat-template convention expects them."""
    rendered: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        item: dict[str, Any] = {"role": message.role, "content": _text_of(message.content, index)}
        if message.name:
            item["name"] = message.name
        if message.tool_call_id:
            item["tool_call_id"] = message.tool_call_id
        if message.reasoning_content:
            item["reasoning_content"] = message.reasoning_content
        if message.tool_calls:
            item["tool_calls"] = [call.model_dump(exclude_none=True) for call in message.tool_calls]
        rendered.append(item)
    return rendered


def _token_logprobs(state: ServerState, delta: ChoiceDelta) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    for token, lp in zip(delta.token_ids, delta.logprobs or [], strict=False):
        piece = state.vocab.piece(token)
        entries.append(
            {
                "token": state.vocab.display(token),
                "logprob": lp.logprob,
                "bytes": list(piece),
                "top_logprobs": [
                    {
                        "token": state.vocab.display(t),
                        "logprob": p,
                        "bytes": list(state.vocab.piece(t)),
                    }
                    for t, p in lp.top
                ],
            }
        )
    return entries


def _build_generation(state: ServerState, body: ChatCompletionRequest, http: Request) -> Generation:
    if body.tool_choice not in (None, "none", "auto"):
        raise APIError(400, "forced tool_choice is not supported yet", param="tool_choice")
    if body.response_format is not None and body.response_format.type != "text":
        raise APIError(
            400, "structured response_format is not supported yet", param="response_format"
        )
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    extra = dict(body.chat_template_kwargs or {})
    if body.reasoning_effort is not None:
        extra.setdefault("reasoning_effort", body.reasoning_effort)
    prompt_text = state.render_chat(
        template_messages(body.messages),
        tools if body.tool_choice != "none" else None,
        body.add_generation_prompt and not body.continue_final_message,
        extra,
    )
    tokens = state.tokenize_prompt(prompt_text)
    budget = state.output_budget(len(tokens), body.output_limit, body.n)
    prefix = http.headers.get("x-request-id", "chat")[:64]
    rid = state.dispatcher.new_request_id(prefix)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    submit = make_submit(state, rid, tokens, budget, body, logprobs)
    return Generation(
        state.dispatcher, state.vocab, state.metrics, [submit], body.stop_list, "chat"
    )


async def create_chat_completion(
    state: ServerState, body: ChatCompletionRequest, http: Request
) -> Any:
    state.check_model(body.model)
    state.admit()
    generation = _build_generation(state, body, http)
    await generation.start()
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if body.stream:
        return StreamingResponse(
            sse_with_errors(_stream(state, body, generation, completion_id, created)),
            media_type="text/event-stream",
        )
    return await run_unless_disconnected(
        http, lambda: _collect(state, body, generation, completion_id, created)
    )


async def _collect(
    state: ServerState,
    body: ChatCompletionRequest,
    generation: Generation,
    completion_id: str,
    created: int,
) -> JSONResponse:
    texts = [""] * body.n
    finish: list[str | None] = [None] * body.n
    logprobs: list[list[dict[str, Any]]] = [[] for _ in range(body.n)]
    async for delta in generation.events():
        texts[delta.index] += delta.text
        if body.logprobs and delta.logprobs:
            logprobs[delta.index] += _token_logprobs(state, delta)
        if delta.finish_reason:
            finish[delta.index] = delta.finish_reason
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": texts[i]},
            "logprobs": {"content": logprobs[i]} if body.logprobs else None,
            "finish_reason": finish[i],
        }
        for i in range(body.n)
    ]
    return JSONResponse(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": state.model_name,
            "choices": choices,
            "usage": generation.usage.to_openai(),
        }
    )


async def _stream(
    state: ServerState,
    body: ChatCompletionRequest,
    generation: Generation,
    completion_id: str,
    created: int,
) -> AsyncIterator[dict[str, Any]]:
    def chunk(
        index: int, delta: dict[str, Any], logprobs: Any, finish: str | None
    ) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": state.model_name,
            "choices": [
                {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            ],
        }
        if body.include_usage:
            data["usage"] = None
        return data

    for i in range(body.n):
        yield chunk(i, {"role": "assistant", "content": ""}, None, None)
    async for delta in generation.events():
        logprobs = (
            {"content": _token_logprobs(state, delta)} if body.logprobs and delta.logprobs else None
        )
        content: dict[str, Any] = {"content": delta.text} if delta.text else {}
        yield chunk(delta.index, content, logprobs, delta.finish_reason)
    if body.include_usage:
        yield {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": state.model_name,
            "choices": [],
            "usage": generation.usage.to_openai(),
        }
