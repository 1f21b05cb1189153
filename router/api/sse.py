"""Server-sent events and the two ways a handler consumes a Generation: as a stream or to completion.

Both watch the client: a streaming response stops when starlette sees the disconnect (and closes its
iterator at once: see `EventStream`); a non-streaming one waits for the ASGI `http.disconnect` message beside
the generation, so an abandoned request frees its sequences within a step instead of generating to
max_tokens for nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from router.api.errors import ClientDisconnected, worker_failure_body
from router.client.dispatch import WorkerFailure

log = logging.getLogger(__name__)

T = TypeVar("T")


def openai_object(
    kind: str, object_id: str, created: int, model: str, choices: list[dict[str, Any]], **extra: Any
) -> dict[str, Any]:
    """The envelope every completion object and chunk shares (`usage` and the like go in `extra`)."""
    return {"id": object_id, "object": kind, "created": created, "model": model, "choices": choices, **extra}


# msgspec's JSON encoder: compact, UTF-8 as is (as json.dumps with ensure_ascii=False), several times faster
# than the standard library on a chunk (bench/router_capacity.py): it runs once per streamed token.
_json = msgspec.json.Encoder()


def sse(data: dict[str, Any] | str | bytes) -> bytes:
    """One SSE event; `bytes` are an event already framed (ChunkFrame)."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, str):
        return b"data: " + data.encode() + b"\n\n"
    return b"data: " + _json.encode(data) + b"\n\n"


class ChunkFrame:
    """One stream's chunk envelope (`openai_object` with a single choice), encoded once: per token only the
    choice is encoded. `event(choice)` is exactly `sse(openai_object(..., [choice], **usage))`."""

    def __init__(self, kind: str, object_id: str, created: int, model: str, include_usage: bool) -> None:
        head = _json.encode({"id": object_id, "object": kind, "created": created, "model": model})
        self._head = b"data: " + head[:-1] + b',"choices":['
        self._tail = b'],"usage":null}\n\n' if include_usage else b"]}\n\n"

    def event(self, choice: dict[str, Any]) -> bytes:
        return self._head + _json.encode(choice) + self._tail


SSE_DONE = sse("[DONE]")


async def sse_with_errors(chunks: AsyncIterator[dict[str, Any] | bytes]) -> AsyncIterator[bytes]:
    """Frames chunks as SSE; a failure after the stream began becomes an error event, then [DONE].

    However the stream ends (an unexpected error too), `chunks` is closed at once, so its generation is
    cancelled and its sequences freed now rather than whenever the garbage collector gets to it.
    """
    try:
        async for chunk in chunks:
            yield sse(chunk)
    except WorkerFailure as failure:
        yield sse(worker_failure_body(failure))
    finally:
        await close_iterator(chunks)
    yield SSE_DONE


class EventStream(StreamingResponse):
    """A text/event-stream response that closes its iterator however the response ends.

    On a client disconnect starlette stops iterating mid-stream (a cancelled task group, or an OSError from
    `send`) and abandons the iterator: the generator's `finally`, which cancels the generation and frees
    its sequences, would then run only when the garbage collector finalizes it, seconds later or more."""

    media_type = "text/event-stream"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await close_iterator(self.body_iterator)


async def _client_gone(request: Request) -> None:
    """Returns once the client has disconnected.

    A blocking `receive` rather than polling `request.is_disconnected()`: behind a BaseHTTPMiddleware (the
    API-key guard) `is_disconnected` never sees the disconnect, since its instantly-cancelled receive is
    cancelled inside the middleware's task group before the message comes through.
    """
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def close_iterator(iterator: AsyncIterable[Any]) -> None:
    close = getattr(iterator, "aclose", None)
    if close is not None:
        await close()


async def run_unless_disconnected(request: Request, work: Callable[[], Awaitable[T]]) -> T:
    """Runs `work`, cancelling it (and so its generation) as soon as the client goes away."""
    task = asyncio.ensure_future(work())
    watch = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise ClientDisconnected
    finally:
        for pending in (task, watch):
            if not pending.done():
                pending.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await watch
