"""The FastAPI application: routes only; the work lives in the endpoint modules."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request, Response, WebSocket
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from router.api import openapi as docs
from router.api.auth import HEALTH_AND_METRICS, ApiKeyMiddleware, load_api_keys
from router.api.errors import APIError, install_error_handlers, retry_headers
from router.api.limits import BodySizeLimit
from router.api.metrics import RequestMetrics
from router.endpoints.adapters import (
    LoadLoraRequest,
    UnloadLoraRequest,
    load_lora_adapter,
    unload_lora_adapter,
)
from router.endpoints.chat import create_chat_completion
from router.endpoints.completions import create_completion
from router.endpoints.embeddings import EmbeddingRequest, check_generation, create_embeddings
from router.endpoints.responses import ResponsesRequest
from router.endpoints.responses_events import create_response
from router.endpoints.responses_ws import serve_responses_websocket
from router.openai.requests import ChatCompletionRequest, CompletionRequest
from router.state import ServerState
from shared.config import Config

log = logging.getLogger(__name__)

# Hooks a supervisor passes in to start and stop the workers it owns around the router's life.
LifecycleHook = Callable[[ServerState], Awaitable[None]]


def create_app(
    config: Config,
    on_startup: LifecycleHook | None = None,
    on_shutdown: LifecycleHook | None = None,
) -> FastAPI:
    state = ServerState.build(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.dispatcher.start()
        if on_startup is not None:
            await on_startup(state)
        try:
            yield
        finally:
            if on_shutdown is not None:
                await on_shutdown(state)
            await state.dispatcher.close()
            state.preparer.close()  # before the vocabulary it may be using goes
            state.vocab.close()

    app = FastAPI(title="llamafleet", lifespan=lifespan)
    app.state.llamafleet = state
    install_error_handlers(app)
    api_keys = load_api_keys(config.server, os.environ)
    protect = config.server.protect_health_and_metrics
    # Added before CORS, so CORS (the outer one) answers preflight requests, which carry no key.
    app.add_middleware(ApiKeyMiddleware, keys=api_keys, protect_health_and_metrics=protect)
    app.add_middleware(BodySizeLimit, max_bytes=config.server.max_request_bytes)
    docs.install_openapi(app, bool(api_keys), set() if protect else set(HEALTH_AND_METRICS))
    if config.server.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=config.server.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
        )

    app.add_middleware(RequestMetrics, metrics=state.metrics)  # outermost: counts every answer

    @app.get("/healthz", responses=docs.HEALTH)
    async def healthz() -> Response:
        up = len(state.dispatcher.up_workers())
        status = "ok" if up else "unavailable"
        body = {"status": status, "workers_up": up, "workers": len(state.dispatcher.workers)}
        return JSONResponse(body, status_code=200 if up else 503, headers=None if up else retry_headers(503))

    @app.get("/metrics", responses=docs.METRICS)
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", responses=docs.MODELS)
    async def list_models() -> dict[str, Any]:
        info = state.dispatcher.model_info()
        card: dict[str, Any] = {
            "id": state.model_name,
            "object": "model",
            "created": state.created,
            "owned_by": "llamafleet",
        }
        if info is not None:
            card["meta"] = {"n_ctx": info.n_ctx_seq, "n_vocab": info.n_vocab}
        return {"object": "list", "data": [card, *state.adapters.cards()]}

    @app.post("/v1/load_lora_adapter", responses=docs.LORA_ADMIN)
    async def load_lora(body: LoadLoraRequest) -> dict[str, str]:
        return await load_lora_adapter(state, body)

    @app.post("/v1/unload_lora_adapter", responses=docs.LORA_ADMIN)
    async def unload_lora(body: UnloadLoraRequest) -> dict[str, str]:
        return await unload_lora_adapter(state, body)

    @app.post("/v1/completions", responses=docs.COMPLETIONS)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        check_generation(state, body.model)
        return await create_completion(state, body, request)

    @app.post("/v1/chat/completions", responses=docs.CHAT_COMPLETIONS)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        check_generation(state, body.model)
        return await create_chat_completion(state, body, request)

    @app.post("/v1/responses", responses=docs.RESPONSES)
    async def responses(body: ResponsesRequest, request: Request) -> Any:
        check_generation(state, body.model)
        return await create_response(state, body, request)

    @app.get("/v1/responses", responses=docs.RESPONSES_UPGRADE)
    async def responses_upgrade_required() -> Response:
        """WS /v1/responses serves the Responses API over a WebSocket; a plain GET is told to upgrade."""
        raise APIError(
            426,
            "GET /v1/responses is the Responses WebSocket: open it with a WebSocket upgrade, "
            "or POST /v1/responses",
            code="upgrade_required",
            headers={"Upgrade": "websocket"},
        )

    @app.websocket("/v1/responses")
    async def responses_websocket(websocket: WebSocket) -> None:
        await serve_responses_websocket(state, websocket)

    @app.post("/v1/embeddings", responses=docs.EMBEDDINGS)
    async def embeddings(body: EmbeddingRequest) -> Response:
        return await create_embeddings(state, body)

    return app
