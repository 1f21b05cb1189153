"""WS /v1/responses: the Responses API over one WebSocket per client session, with per-connection state.

A client sends `response.create` messages (the fields of POST /v1/responses, at the top level) and gets
the same events as the SSE stream, one JSON text message each. Responses run one at a time, in the
order they were sent. Each connection remembers its last `MAX_KEPT_RESPONSES` responses (the full
conversation each one continued, plus its output), so `previous_response_id` replays that
conversation; the replayed prompt starts with the tokens the worker just generated from, so the prefix
cache serves it and a turn costs only its new tokens. Nothing outlives the connection.

Problems with one message (bad JSON, an unknown id, a 400 of any kind) are `error` events and the
socket stays open; a client that disconnects mid-response has its generation cancelled at once.
Codex-style clients open the socket with `OpenAI-Beta: responses_websockets=...` and fall back to HTTP
on a 426, which is what they get when `server.responses_websocket` is false.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from fastapi import WebSocket
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.websockets import WebSocketDisconnect

from router.api.errors import APIError, error_body, from_worker_failure, validation_error
from router.api.unicode_check import LoneSurrogateError, find_lone_surrogate
from router.client.dispatch import WorkerFailure
from router.endpoints.embeddings import check_generation
from router.endpoints.responses import ResponsesRequest, input_items, start_response
from router.endpoints.responses_events import ResponseRun
from router.state import ServerState

# The state serving a request's `model` (router/models_registry.py); an APIError 404 for an unknown one.
Lookup = Callable[[str | None], ServerState]

log = logging.getLogger(__name__)

MAX_KEPT_RESPONSES = 64
_SEND_ERRORS = (WebSocketDisconnect, RuntimeError, OSError)


async def _deny(websocket: WebSocket, status: int, message: str, kind: str, code: str) -> None:
    """Refuses the handshake with an HTTP answer (or a close where the server cannot send one)."""
    response = JSONResponse(error_body(message, kind, code=code), status_code=status)
    try:
        await websocket.send_denial_response(response)
    except RuntimeError:
        await websocket.close(code=1008, reason=message[:120])


async def serve_responses_websocket(
    state: ServerState, websocket: WebSocket, lookup: Lookup | None = None
) -> None:
    """The WebSocket route: checks the handshake, then serves the connection until it closes.

    `lookup` finds the state serving each message's `model` (several models behind one router); without
    it every message goes to `state`. The API key was checked before this runs, by router/api/auth.py's
    middleware."""
    if not state.config.server.responses_websocket:
        await _deny(
            websocket,
            426,
            "the Responses WebSocket is disabled on this server; use POST /v1/responses",
            "invalid_request_error",
            "upgrade_required",
        )
        return
    await websocket.accept()
    await ResponsesSession(state, websocket, lookup).run()


class ResponsesSession:
    """One connection: its inbox, its kept responses, and the response running now."""

    def __init__(self, state: ServerState, websocket: WebSocket, lookup: Lookup | None = None) -> None:
        self.state = state
        self.lookup = lookup
        self.websocket = websocket
        # response id -> the input items that replay it (its conversation, then its output items)
        self.history: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
        self.inbox: asyncio.Queue[str | None] = asyncio.Queue()
        self.closed = asyncio.Event()

    async def run(self) -> None:
        reader = asyncio.create_task(self._read())
        try:
            while not self.closed.is_set():
                text = await self.inbox.get()
                if text is None:  # the client went away
                    break
                try:
                    await self._handle(text)
                except Exception:  # a bug answering one message must not end the session
                    log.exception("responses websocket: unexpected error")
                    await self._error(APIError(500, "internal error", "server_error"))
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            self.history.clear()

    async def _read(self) -> None:
        """Reads client messages into the inbox, so a disconnect is seen even while a response runs."""
        try:
            while True:
                message = await self.websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                text = message.get("text")
                if text is None:
                    text = (message.get("bytes") or b"").decode("utf-8", "replace")
                self.inbox.put_nowait(text)
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass
        finally:
            self.closed.set()
            self.inbox.put_nowait(None)

    async def _send(self, data: dict[str, Any]) -> bool:
        try:
            await self.websocket.send_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")))
        except _SEND_ERRORS:
            self.closed.set()
            return False
        return True

    async def _error(self, error: APIError, stream_id: str | None = None) -> None:
        event: dict[str, Any] = {"type": "error", "status": error.status, **error_body(
            error.message, error.kind, error.param, error.code
        )}  # fmt: skip
        if stream_id is not None:
            event["stream_id"] = stream_id
        await self._send(event)

    def _request(self, payload: dict[str, Any]) -> tuple[ResponsesRequest, list[dict[str, Any]]]:
        """The request with its previous response's conversation replayed in front of its input."""
        fields = {k: v for k, v in payload.items() if k not in ("type", "generate", "stream_id")}
        try:
            body = ResponsesRequest.model_validate(fields)
        except ValidationError as error:
            raise validation_error(error.errors()) from error
        if body.conversation is not None:
            raise APIError(
                400, "conversation is not supported: this server stores none", param="conversation"
            )
        items = input_items(body) if body.input is not None else []
        previous = body.previous_response_id
        if previous is not None:
            if previous not in self.history:
                raise APIError(
                    400,
                    f"previous response {previous!r} is not found on this connection (responses live "
                    f"only on the WebSocket that made them; the last {MAX_KEPT_RESPONSES} are kept)",
                    param="previous_response_id",
                    code="previous_response_not_found",
                )
            self.history.move_to_end(previous)
            items = self.history[previous] + items
        body = body.model_copy(update={"input": items, "previous_response_id": None})
        return body, items

    def _remember(self, response_id: str, items: list[dict[str, Any]], output: list[dict[str, Any]]) -> None:
        self.history[response_id] = items + output
        while len(self.history) > MAX_KEPT_RESPONSES:
            self.history.popitem(last=False)

    async def _handle(self, text: str) -> None:
        stream_id: str | None = None
        try:
            payload = json.loads(text)
        except ValueError:
            await self._error(APIError(400, "the message is not valid JSON"))
            return
        if not isinstance(payload, dict) or payload.get("type") != "response.create":
            kind = payload.get("type") if isinstance(payload, dict) else None
            await self._error(APIError(400, f"unsupported message type {kind!r}; send response.create"))
            return
        surrogate = find_lone_surrogate(payload)
        if surrogate is not None:  # not even its stream_id can be echoed back as UTF-8
            error = LoneSurrogateError(*surrogate)
            await self._error(APIError(400, str(error), param=error.param or None))
            return
        stream_id = payload.get("stream_id") if isinstance(payload.get("stream_id"), str) else None
        previous = payload.get("previous_response_id")
        try:
            body, items = self._request(payload)
            state = self.lookup(body.model) if self.lookup is not None else self.state
            check_generation(state, body.model)
            with state.admission.reserve(1, "input"):
                prepared = await start_response(
                    state,
                    body,
                    "ws",
                    previous_response_id=previous if isinstance(previous, str) else None,
                    generate=payload.get("generate") is not False,
                )
        except APIError as error:
            await self._error(error, stream_id)
            return
        except WorkerFailure as failure:
            await self._error(from_worker_failure(failure), stream_id)
            return
        run = ResponseRun(state, prepared, stream_id)
        if await self._stream(run) and run.final is not None and run.final["status"] != "failed":
            self._remember(run.final["id"], items, run.final["output"])

    async def _stream(self, run: ResponseRun) -> bool:
        """Sends the run's events; cancels the generation if the client leaves. True when it finished."""
        events = run.events()

        async def pump() -> bool:
            async for event in events:
                if not await self._send(event):
                    return False
            return True

        task = asyncio.create_task(pump())
        gone = asyncio.create_task(self.closed.wait())
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not task.done():
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            with contextlib.suppress(Exception):
                await events.aclose()
            await run.prepared.generation.cancel()  # no-op when it finished
        if task.cancelled():
            return False
        error = task.exception()
        if error is not None:  # re-raised for the session's error event
            raise error
        return task.result()
