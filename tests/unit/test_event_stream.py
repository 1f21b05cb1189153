"""A streamed response whose client went away closes its generator at once, not when the GC gets to it.

Starlette abandons a streaming response's iterator mid-iteration on a disconnect; the generator's `finally`
(which cancels the generation and frees its sequences) then waited for the garbage collector, which made
freeing after a disconnect take seconds whenever few allocations happened meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator
from typing import Any

import pytest
from starlette.requests import ClientDisconnect

from router.api.sse import EventStream


@pytest.mark.parametrize("spec_version", ["2.4", "2.3"])
def test_disconnect_closes_the_iterator_at_once(spec_version: str) -> None:
    closed: list[bool] = []

    async def chunks() -> AsyncIterator[bytes]:
        try:
            while True:
                yield b"data: x\n\n"
                await asyncio.sleep(0)
        finally:
            closed.append(True)

    async def scenario() -> None:
        sent = 0
        gone = asyncio.Event()

        async def send(message: dict[str, Any]) -> None:
            nonlocal sent
            sent += 1
            if sent == 3:  # the client hangs up after two chunks
                gone.set()
                if spec_version == "2.4":
                    raise OSError("connection reset")
                await asyncio.sleep(3600)

        async def receive() -> dict[str, Any]:
            await gone.wait()
            return {"type": "http.disconnect"}

        response = EventStream(chunks())
        scope = {"type": "http", "asgi": {"spec_version": spec_version}}
        expected = pytest.raises(ClientDisconnect) if spec_version == "2.4" else contextlib.nullcontext()
        with expected:
            await response(scope, receive, send)
        assert closed, "the generator's cleanup ran before the response returned"
        del response

    gc.disable()  # the point: no collection is needed for the cleanup
    try:
        asyncio.run(scenario())
    finally:
        gc.enable()
