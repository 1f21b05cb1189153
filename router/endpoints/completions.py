"""POST /v1/completions: legacy text completions, streamed or not, with logprobs and echo."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from router.api.errors import APIError
from router.api.sse import ChunkFrame, EventStream, openai_object, run_unless_disconnected, sse_with_errors
from router.client.generation import ChoiceDelta, Generation
from router.openai.requests import CompletionRequest
from router.state import ServerState, make_submit
from router.structured.response_format import structured_grammar
from shared.protocol import SubmitRequest


@dataclass
class _LogprobsAccumulator:
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[str, float]] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)

    def to_openai(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        }


def _logprobs_of(state: ServerState, delta: ChoiceDelta, offset: int) -> _LogprobsAccumulator:
    """Completion-style logprobs for a delta; `offset` is the text length before it."""
    out = _LogprobsAccumulator()
    for token, text, lp in zip(delta.token_ids, delta.token_texts, delta.logprobs or [], strict=False):
        out.tokens.append(state.vocab.display(token))
        out.token_logprobs.append(lp.logprob)
        out.top_logprobs.append({state.vocab.display(t): p for t, p in lp.top})
        out.text_offset.append(offset)
        offset += len(text)
    return out


def _build_generation(state: ServerState, body: CompletionRequest, http: Request) -> Generation:
    if body.echo and body.logprobs is not None:
        raise APIError(400, "echo together with logprobs is not supported", param="echo")
    try:
        prompts = body.prompts()
    except ValueError as error:
        raise APIError(400, str(error), param="prompt") from error
    plan = structured_grammar(body.response_format, body.grammar)
    prefix = http.headers.get("x-request-id", "cmpl")[:64]
    submits: list[SubmitRequest] = []
    for prompt in prompts:
        if isinstance(prompt, str):
            tokens = state.tokenize_prompt(prompt)
        else:
            tokens = state.check_tokens(list(prompt), "prompt")
        if not tokens:
            raise APIError(400, "the prompt is empty", param="prompt")
        budget = state.output_budget(len(tokens), body.max_tokens, body.n)
        rid = state.dispatcher.new_request_id(prefix)
        grammar = plan.grammar if plan else None
        submits.append(make_submit(state, rid, tokens, budget, body, body.logprobs, grammar))
    return Generation(state.dispatcher, state.vocab, state.metrics, submits, body.stop_list, "completions")


def _echo_text(state: ServerState, body: CompletionRequest, index: int, n: int) -> str:
    if not body.echo:
        return ""
    prompt = body.prompts()[index // n]
    return prompt if isinstance(prompt, str) else state.vocab.detokenize(list(prompt))


def _sequences(body: CompletionRequest) -> int:
    """What admission charges the call: a sequence per prompt and choice."""
    try:
        return len(body.prompts()) * body.n
    except ValueError as error:
        raise APIError(400, str(error), param="prompt") from error


async def create_completion(state: ServerState, body: CompletionRequest, http: Request) -> Any:
    state.check_model(body.model)
    with state.admission.reserve(_sequences(body), "n" if body.n > 1 else "prompt"):
        generation = await state.preparer.run(_build_generation, state, body, http)
        await generation.start()
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if body.stream:
        return EventStream(sse_with_errors(_stream(state, body, generation, completion_id, created)))
    return await run_unless_disconnected(
        http, lambda: _collect(state, body, generation, completion_id, created)
    )


async def _collect(
    state: ServerState,
    body: CompletionRequest,
    generation: Generation,
    completion_id: str,
    created: int,
) -> JSONResponse:
    count = len(generation.submits) * body.n
    texts = [_echo_text(state, body, i, body.n) for i in range(count)]
    finish: list[str | None] = [None] * count
    closed = [False] * count
    logprobs = [_LogprobsAccumulator() for _ in range(count)]
    async for delta in generation.events():
        closed[delta.index] |= delta.budget_closed
        if body.logprobs is not None and delta.logprobs:
            part = _logprobs_of(state, delta, len(texts[delta.index]))
            acc = logprobs[delta.index]
            acc.tokens += part.tokens
            acc.token_logprobs += part.token_logprobs
            acc.top_logprobs += part.top_logprobs
            acc.text_offset += part.text_offset
        texts[delta.index] += delta.text
        if delta.finish_reason:
            finish[delta.index] = delta.finish_reason
    choices = [
        {
            "index": i,
            "text": texts[i],
            "logprobs": logprobs[i].to_openai() if body.logprobs is not None else None,
            "finish_reason": finish[i],
            **({"budget_closed": True} if closed[i] else {}),
        }
        for i in range(count)
    ]
    return JSONResponse(
        openai_object(
            "text_completion",
            completion_id,
            created,
            state.model_name,
            choices,
            usage=generation.usage.to_openai(),
        )
    )


async def _stream(
    state: ServerState,
    body: CompletionRequest,
    generation: Generation,
    completion_id: str,
    created: int,
) -> AsyncIterator[dict[str, Any] | bytes]:
    count = len(generation.submits) * body.n
    offsets = [0] * count
    frame = ChunkFrame("text_completion", completion_id, created, state.model_name, body.include_usage)

    def chunk(index: int, text: str, logprobs: Any, finish: str | None, closed: bool = False) -> bytes:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        if closed:
            choice["budget_closed"] = True
        return frame.event(choice)

    if body.echo:
        for i in range(count):
            text = _echo_text(state, body, i, body.n)
            offsets[i] = len(text)
            yield chunk(i, text, None, None)
    async for delta in generation.events():
        logprobs = None
        if body.logprobs is not None and delta.logprobs:
            logprobs = _logprobs_of(state, delta, offsets[delta.index]).to_openai()
        offsets[delta.index] += len(delta.text)
        yield chunk(delta.index, delta.text, logprobs, delta.finish_reason, delta.budget_closed)
    if body.include_usage:
        yield openai_object(
            "text_completion",
            completion_id,
            created,
            state.model_name,
            [],
            usage=generation.usage.to_openai(),
        )
