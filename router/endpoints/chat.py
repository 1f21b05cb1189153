"""POST /v1/chat/completions: template the conversation, generate, answer as OpenAI chat objects.

Planning (prompt, tools, grammar, output parser) lives in preprocess/chat_plan.py, parsing in
parsers/output.py; this module formats the OpenAI response, streamed or whole.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from router.api.sse import ChunkFrame, EventStream, openai_object, run_unless_disconnected, sse_with_errors
from router.client.generation import ChoiceDelta, Generation
from router.endpoints.chat_format import chat_deltas, chat_message
from router.openai.requests import ChatCompletionRequest
from router.parsers.output import ChoiceOutput
from router.preprocess.chat_plan import ChatPlan, chat_generation, template_messages
from router.preprocess.media_parts import PromptMedia, load_media
from router.state import ServerState


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


def _build_generation(
    state: ServerState, body: ChatCompletionRequest, http: Request, media: PromptMedia | None
) -> tuple[Generation, ChatPlan]:
    return chat_generation(
        state,
        body,
        rid_prefix=http.headers.get("x-request-id", "chat"),
        endpoint="chat",
        output_limit=body.output_limit,
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        media=media,
    )


async def create_chat_completion(state: ServerState, body: ChatCompletionRequest, http: Request) -> Any:
    state.check_model(body.model)
    with state.admission.reserve(body.n, "n"):
        media = await load_media(state, body.messages)
        generation, plan = await state.preparer.run(_build_generation, state, body, http, media)
        await generation.start()
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    outputs = [plan.outputs() for _ in range(body.n)]
    if body.stream:
        return EventStream(sse_with_errors(_stream(state, body, generation, outputs, completion_id, created)))
    return await run_unless_disconnected(
        http, lambda: _collect(state, body, generation, outputs, completion_id, created)
    )


async def _collect(
    state: ServerState,
    body: ChatCompletionRequest,
    generation: Generation,
    outputs: list[ChoiceOutput],
    completion_id: str,
    created: int,
) -> JSONResponse:
    finish: list[str | None] = [None] * body.n
    closed = [False] * body.n
    logprobs: list[list[dict[str, Any]]] = [[] for _ in range(body.n)]
    async for delta in generation.events():
        closed[delta.index] |= delta.budget_closed
        outputs[delta.index].feed(delta.text)
        if body.logprobs and delta.logprobs:
            logprobs[delta.index] += _token_logprobs(state, delta)
        if delta.finish_reason:
            finish[delta.index] = delta.finish_reason
    choices = []
    for i, output in enumerate(outputs):
        _, reason = output.finish(finish[i])
        choice = {
            "index": i,
            "message": chat_message(output.message(), body.include_reasoning),
            "logprobs": {"content": logprobs[i]} if body.logprobs else None,
            "finish_reason": reason,
        }
        if closed[i]:
            choice["budget_closed"] = True
        choices.append(choice)
    return JSONResponse(
        openai_object(
            "chat.completion",
            completion_id,
            created,
            state.model_name,
            choices,
            usage=generation.usage.to_openai(),
        )
    )


async def _stream(
    state: ServerState,
    body: ChatCompletionRequest,
    generation: Generation,
    outputs: list[ChoiceOutput],
    completion_id: str,
    created: int,
) -> AsyncIterator[dict[str, Any] | bytes]:
    frame = ChunkFrame("chat.completion.chunk", completion_id, created, state.model_name, body.include_usage)

    def chunk(
        index: int, delta: dict[str, Any], logprobs: Any, finish: str | None, closed: bool = False
    ) -> bytes:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        if closed:
            choice["budget_closed"] = True
        return frame.event(choice)

    for i in range(body.n):
        yield chunk(i, {"role": "assistant", "content": ""}, None, None)
    async for delta in generation.events():
        logprobs = {"content": _token_logprobs(state, delta)} if body.logprobs and delta.logprobs else None
        output = outputs[delta.index]
        deltas = output.feed(delta.text)
        finish = None
        if delta.finish_reason is not None:
            last, finish = output.finish(delta.finish_reason)
            deltas += last
        for piece in chat_deltas(deltas, body.include_reasoning):
            yield chunk(delta.index, piece, logprobs, None)
            logprobs = None
        if logprobs is not None or finish is not None:
            yield chunk(delta.index, {}, logprobs, finish, delta.budget_closed)
    if body.include_usage:
        yield openai_object(
            "chat.completion.chunk",
            completion_id,
            created,
            state.model_name,
            [],
            usage=generation.usage.to_openai(),
        )


__all__ = ["create_chat_completion", "template_messages"]
