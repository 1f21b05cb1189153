"""OpenAI-style error responses: `{"error": {"message", "type", "param", "code"}}` with a 4xx/5xx status.

Every 429 and 503 carries `Retry-After` (seconds), so clients back off by the server's word; a worker
failure gets a stable `code` (`worker_unavailable` for a dead or missing worker), the same in an HTTP
answer and in a stream's error event.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from router.api.unicode_check import lone_surrogate_param
from router.client.dispatch import WorkerFailure


class APIError(Exception):
    """Raised anywhere in a handler to answer with an OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.param = param
        self.code = code
        self.headers = headers


class ClientDisconnected(Exception):
    """The client went away before its answer; the request was cancelled and nobody reads the reply."""


# Status of the reply to a client that went away (nginx's "client closed request"); uvicorn drops it.
CLIENT_CLOSED_STATUS = 499

# Seconds a client should wait before retrying: a full queue drains in about a second; a worker that died
# is restarted by the supervisor within a few.
RETRY_AFTER_SECONDS = {429: 1, 503: 2}


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def retry_headers(status: int) -> dict[str, str]:
    """`Retry-After` for the statuses that mean "try again later", nothing for the others."""
    seconds = RETRY_AFTER_SECONDS.get(status)
    return {"Retry-After": str(seconds)} if seconds is not None else {}


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(
        error_body(error.message, error.kind, error.param, error.code),
        status_code=error.status,
        headers={**retry_headers(error.status), **(error.headers or {})},
    )


def from_worker_failure(failure: WorkerFailure) -> APIError:
    code = "worker_unavailable" if failure.status == 503 else None
    return APIError(failure.status, failure.message, failure.kind, code=code)


def worker_failure_body(failure: WorkerFailure) -> dict[str, Any]:
    """The error object of a stream's error event: what an HTTP answer to the same failure carries."""
    error = from_worker_failure(failure)
    return error_body(error.message, error.kind, error.param, error.code)


# pydantic puts the member of a union it tried in an error's location ("stop.str", "tool_choice.literal[...]",
# "response_format.function-after[...]", a model's class name): not a field the client sent.
_UNION_TAG = re.compile(r"^(str|int|float|bool|bytes|none|[a-z][a-z0-9_-]*\[.*\]|[A-Z]\w*)$")


def validation_error(errors: Sequence[Any], names: Mapping[str, str] | None = None) -> APIError:
    """pydantic's errors (`ValidationError.errors()`) as a 400 naming the first bad field as the client
    sent it: union members left out, and a request translated from another renamed by `names` (dotted
    prefixes, `*` for any one segment, longest first: {"tools.*.function": "tools.*"})."""
    first = dict(errors[0]) if errors else {}
    surrogate = lone_surrogate_param(first)
    if surrogate is not None:
        return APIError(400, str(surrogate), param=surrogate.param or None)
    if first.get("type") == "json_invalid":
        return APIError(400, "the request body is not valid JSON")
    location = [str(p) for p in first.get("loc", ()) if p != "body" and not _UNION_TAG.match(str(p))]
    cause = (first.get("ctx") or {}).get("error")
    named = getattr(cause, "param", None) if isinstance(cause, ValueError) else None
    if isinstance(named, str):  # a check across fields names its field, relative to the model checked
        location += named.split(".")
    param = ".".join(_renamed(location, names or {})) or None
    if isinstance(named, str):
        return APIError(400, str(cause), param=param)
    message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")  # pydantic's prefix
    return APIError(400, f"{param}: {message}" if param else message, param=param)


def _renamed(location: list[str], names: Mapping[str, str]) -> list[str]:
    for pattern in sorted(names, key=lambda p: -p.count(".")):
        parts = pattern.split(".")
        if len(parts) > len(location):
            continue
        if all(p in ("*", seg) for p, seg in zip(parts, location, strict=False)):
            wild = iter(seg for p, seg in zip(parts, location, strict=False) if p == "*")
            head = [next(wild) if r == "*" else r for r in names[pattern].split(".")]
            return head + location[len(parts) :]
    return location


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, error: ClientDisconnected) -> Response:
        return Response(status_code=CLIENT_CLOSED_STATUS)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(WorkerFailure)
    async def _worker_failure(request: Request, error: WorkerFailure) -> JSONResponse:
        return error_response(from_worker_failure(error))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(error.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return error_response(APIError(error.status_code, str(error.detail), kind))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        return error_response(APIError(500, f"internal error: {type(error).__name__}", "server_error"))
