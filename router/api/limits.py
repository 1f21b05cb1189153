"""The request body-size limit, enforced before a body is read, so a huge request cannot freeze the router.

A pure ASGI middleware: a declared Content-Length over `server.max_request_bytes` is answered 413 at once,
without reading a byte of the body; a chunked body is counted as it streams in and cut off as soon as it
passes the limit. Either way the answer is OpenAI's error JSON and the event loop stays free for other
clients (`/healthz` included). WebSocket messages are bounded separately, by uvicorn's `ws_max_size`.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from router.api.errors import APIError, error_response


class BodyTooLarge(HTTPException):
    """Raised from `receive` when a streamed body passes the limit.

    An HTTPException, so FastAPI's body reader passes it on unchanged (other errors there become a 400)
    and the app's handler answers it as an OpenAI error; the middleware answers it itself otherwise.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(413, too_large_message(limit))


def too_large_message(limit: int) -> str:
    return f"the request body exceeds the server's limit of {limit} bytes (server.max_request_bytes)"


def too_large_error(limit: int) -> APIError:
    return APIError(413, too_large_message(limit), code="request_too_large")


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await error_response(too_large_error(self.max_bytes))(scope, receive, send)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, watched_send)
        except BodyTooLarge:
            if started:
                raise
            await error_response(too_large_error(self.max_bytes))(scope, receive, send)
