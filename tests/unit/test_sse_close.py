"""A stream whose SSE framing fails closes its source at once (its generation is cancelled and its
sequences freed then), instead of leaving it to the garbage collector with the request still in flight."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import pytest

from router.api.sse import sse, sse_with_errors
from router.endpoints.responses_events import _sse


async def _source(closed: list[str]) -> AsyncGenerator[dict[str, Any], None]:
    try:
        yield {"type": "ok", "n": 1}
        yield {"type": "bad", "n": object()}  # no JSON encoder can write this: the framing fails
        yield {"type": "never"}
    finally:
        closed.append("closed")


class _Run:
    def __init__(self, closed: list[str]) -> None:
        self.closed = closed

    def events(self) -> AsyncGenerator[dict[str, Any], None]:
        return _source(self.closed)


def _consume(stream: Any, closed: list[str]) -> tuple[list[bytes], list[str]]:
    async def run() -> tuple[list[bytes], list[str]]:
        out: list[bytes] = []
        with pytest.raises(TypeError):
            async for frame in stream:
                out.append(frame)
        return out, list(closed)  # what was closed before the event loop's shutdown sweeps up

    return asyncio.run(run())


def test_chat_and_completion_streams_close_their_chunks_when_framing_fails() -> None:
    closed: list[str] = []
    out, closed_then = _consume(sse_with_errors(_source(closed)), closed)
    assert out == [sse({"type": "ok", "n": 1})]
    assert closed_then == ["closed"]


def test_responses_events_close_its_events_when_framing_fails() -> None:
    closed: list[str] = []
    out, closed_then = _consume(_sse(_Run(closed)), closed)  # a duck-typed ResponseRun
    assert len(out) == 1 and out[0].startswith(b"event: ok\n")
    assert closed_then == ["closed"]


def test_chunk_frames_encode_exactly_what_the_whole_object_would() -> None:
    from router.api.sse import ChunkFrame, openai_object

    choice = {"index": 1, "delta": {"content": 'é "quoted"\n'}, "logprobs": None, "finish_reason": "stop"}
    for include_usage in (False, True):
        frame = ChunkFrame("chat.completion.chunk", "chatcmpl-1", 17, 'model "x"', include_usage)
        extra = {"usage": None} if include_usage else {}
        whole = openai_object("chat.completion.chunk", "chatcmpl-1", 17, 'model "x"', [choice], **extra)
        assert frame.event(choice) == sse(whole)
