"""What /openapi.json says each route answers: statuses, bodies, headers, and the WebSocket.

FastAPI derives the request schemas from the request models; it cannot know the rest. Each route's
`responses=` comes from here: the OpenAI error body (router/openai/answers.py) on every status the route
really answers, success schemas (documentation only, handlers keep writing their own JSON), SSE as the
streaming alternative, and `Retry-After` on 429 and 503. `install_openapi` then removes FastAPI's
automatic 422 (validation errors are 400s here, router/api/errors.py), declares the bearer key when one is
configured, and notes the WebSocket on /v1/responses (OpenAPI has no WebSockets: an `x-websocket`
extension, and GET /v1/responses without an upgrade answers 426 as documented).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from router.api.errors import RETRY_AFTER_SECONDS
from router.openai.answers import (
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    DetokenizeAnswer,
    EmbeddingList,
    ErrorBody,
    Health,
    ModelList,
    ResponseObject,
    ResponseStreamEvent,
    TokenizeAnswer,
)

Responses = dict[int | str, dict[str, Any]]

_ERROR_DESCRIPTIONS = {
    400: "Invalid request: a malformed body, a value out of range, a prompt beyond the context",
    401: "Invalid or missing API key (only when the server has one)",
    404: "The requested model is not one this server serves",
    413: "The request body is larger than the server accepts",
    426: "Not a WebSocket upgrade: this path serves the Responses WebSocket",
    429: "The queue is full; retry after Retry-After seconds",
    500: "The worker failed this request (a llama.cpp error); other requests go on",
    503: "No worker is ready (starting or restarting) or the worker failed; retry after Retry-After seconds",
}

_SSE_DESCRIPTION = (
    "With `stream: true`: server-sent events, one `data: {json}` line per chunk (the JSON object's shape, "
    "one choice each), then `data: [DONE]`. A failure after the stream began is an event carrying the "
    "OpenAI error body (`code` e.g. `worker_unavailable`) before `[DONE]`."
)
_RESPONSES_SSE_DESCRIPTION = (
    "With `stream: true`: server-sent events, `event: response.<kind>` and `data: {json}` per event, from "
    "`response.created` to `response.completed`, `.incomplete` or `.failed`."
)


def _error(status: int) -> dict[str, Any]:
    entry: dict[str, Any] = {"model": ErrorBody, "description": _ERROR_DESCRIPTIONS[status]}
    if status in RETRY_AFTER_SECONDS:
        entry["headers"] = {
            "Retry-After": {
                "description": "Seconds to wait before retrying",
                "schema": {"type": "integer", "minimum": 0},
            }
        }
    return entry


def _errors(*statuses: int) -> Responses:
    return {status: _error(status) for status in statuses}


def _sse_event(description: str, chunk: type[BaseModel]) -> dict[str, Any]:
    """One server-sent event (OpenAPI before 3.2 has a text/event-stream `schema` describe each event)."""
    return {
        "type": "object",
        "description": description,
        "required": ["data"],
        "properties": {
            "event": {"type": "string", "description": "the event type (Responses API events only)"},
            "data": {
                "description": f"a {chunk.__name__} or an error as JSON, or [DONE] closing a chat stream",
                "anyOf": [
                    {"type": "string", "const": "[DONE]"},
                    {
                        "type": "string",
                        "contentMediaType": "application/json",
                        "contentSchema": {
                            "anyOf": [
                                {"$ref": f"#/components/schemas/{chunk.__name__}"},
                                {"$ref": "#/components/schemas/ErrorBody"},
                            ]
                        },
                    },
                ],
            },
        },
    }


def _json_or_sse(
    model: type, chunk: type[BaseModel], description: str, sse_description: str
) -> dict[str, Any]:
    return {
        "model": model,
        "description": description,
        "content": {"text/event-stream": {"schema": _sse_event(sse_description, chunk)}},
    }


# Statuses every POST route can answer beyond its own: h-load's body-size limit answers 413.
_POST_ERRORS = (400, 404, 413, 429, 500, 503)

COMPLETIONS: Responses = {
    200: _json_or_sse(Completion, Completion, "A text completion, or its chunks as SSE", _SSE_DESCRIPTION),
    **_errors(*_POST_ERRORS),
}
CHAT_COMPLETIONS: Responses = {
    200: _json_or_sse(
        ChatCompletion, ChatCompletionChunk, "A chat completion, or its chunks as SSE", _SSE_DESCRIPTION
    ),
    **_errors(*_POST_ERRORS),
}
RESPONSES: Responses = {
    200: _json_or_sse(
        ResponseObject,
        ResponseStreamEvent,
        "The response object, or its events as SSE",
        _RESPONSES_SSE_DESCRIPTION,
    ),
    **_errors(*_POST_ERRORS),
}
RESPONSES_UPGRADE: Responses = {426: _error(426)}
EMBEDDINGS: Responses = {
    200: {"model": EmbeddingList, "description": "The vectors"},
    **_errors(*_POST_ERRORS),
}
# The router answers these from its vocabulary: no worker, so no 429, 500 or 503.
TOKENIZE: Responses = {
    200: {"model": TokenizeAnswer, "description": "The token ids"},
    **_errors(400, 404, 413),
}
DETOKENIZE: Responses = {
    200: {"model": DetokenizeAnswer, "description": "The text"},
    **_errors(400, 404, 413),
}
MODELS: Responses = {
    200: {
        "model": ModelList,
        "description": "The models this server serves and their named LoRA adapters (with `parent`)",
    }
}
LORA_ADMIN: Responses = {
    200: {
        "description": "The adapter was loaded (or unloaded) on every ready worker",
        "content": {"application/json": {"schema": {"type": "object"}}},
    },
    **_errors(400, 404, 413, 503),
}
HEALTH: Responses = {
    200: {"model": Health, "description": "Every model has a worker ready"},
    503: {**_error(503), "model": Health, "description": "Some model has no worker ready"},
}
LIVE: Responses = {
    200: {
        "description": "The router process answers (liveness; readiness is /healthz)",
        "content": {
            "application/json": {"schema": {"type": "object", "properties": {"status": {"const": "alive"}}}}
        },
    }
}
METRICS: Responses = {
    200: {
        "description": "Prometheus metrics (text exposition format)",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
}

_WEBSOCKET_NOTE = {
    "path": "/v1/responses",
    "protocol": "websocket",
    "description": (
        "WS /v1/responses: the Responses API over a WebSocket. Send `response.create` messages (the fields "
        "of POST /v1/responses at the top level); each event of the SSE stream comes back as one JSON text "
        "message, errors as `error` events. A handshake is refused with 426 when the server disables it "
        "and with 401 on a bad API key."
    ),
}


# Models that only SSE events reference (FastAPI adds the rest to the components itself).
_STREAM_MODELS: tuple[type[BaseModel], ...] = (ChatCompletionChunk, ResponseStreamEvent)


def _add_stream_models(document: dict[str, Any]) -> None:
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for model in _STREAM_MODELS:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}", mode="serialization")
        for name, definition in schema.pop("$defs", {}).items():
            schemas.setdefault(name, definition)
        schemas[model.__name__] = schema


def _strip_validation_errors(document: dict[str, Any]) -> None:
    """FastAPI documents 422 on every route with a body; this server answers 400 instead."""
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            if isinstance(operation, dict):
                operation.get("responses", {}).pop("422", None)
    schemas = document.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)


def _add_auth(document: dict[str, Any], open_paths: set[str]) -> None:
    components = document.setdefault("components", {})
    components.setdefault("securitySchemes", {})["bearer"] = {"type": "http", "scheme": "bearer"}
    for path, operations in document.get("paths", {}).items():
        if path in open_paths:
            continue
        for operation in operations.values():
            if isinstance(operation, dict):
                operation["security"] = [{"bearer": []}]
                operation.setdefault("responses", {})["401"] = {
                    "description": _ERROR_DESCRIPTIONS[401],
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
                }


def install_openapi(app: FastAPI, api_key_required: bool, open_paths: set[str]) -> None:
    """Replaces `app.openapi` with a builder of the truthful document (built once, then cached)."""

    def build() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title,
                version=app.version,
                description="OpenAI-compatible inference for GGUF models on llama.cpp.",
                routes=app.routes,
            )
            _strip_validation_errors(document)
            _add_stream_models(document)
            if api_key_required:
                _add_auth(document, open_paths)
            upgrade = document["paths"].get("/v1/responses", {})
            upgrade["x-websocket"] = _WEBSOCKET_NOTE
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = build  # type: ignore[method-assign]
