"""The FastAPI application: routes only; the work lives in the endpoint modules."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request, Response, WebSocket
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from router.api import openapi as docs
from router.api.auth import ALWAYS_OPEN, HEALTH_AND_METRICS, ApiKeyMiddleware, load_api_keys
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
from router.endpoints.tokenize import DetokenizeRequest, TokenizeRequest, detokenize, tokenize
from router.models_registry import ModelRegistry
from router.openai.requests import ChatCompletionRequest, CompletionRequest
from shared.config import Config

log = logging.getLogger(__name__)

# Hooks a supervisor passes in to start and stop the workers it owns around the router's life.
LifecycleHook = Callable[[ModelRegistry], Awaitable[None]]


def create_app(
    config: Config,
    on_startup: LifecycleHook | None = None,
    on_shutdown: LifecycleHook | None = None,
    router: int = 0,
) -> FastAPI:
    registry = ModelRegistry.build(config, router)
    state = registry.default  # what every model shares: server options, metrics
    lookup = registry.lookup

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for pool in registry.states:
            await pool.dispatcher.start()
        if on_startup is not None:
            await on_startup(registry)
        # What start-up built (modules, the app, schemas, the vocabulary's pieces) lives as long as the
        # process: move it out of the collector's generations, so that the collections which every few
        # thousand allocations of streaming trigger do not walk it again and again.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            if on_shutdown is not None:
                await on_shutdown(registry)
            for pool in registry.states:
                await pool.dispatcher.close()
                pool.preparer.close()  # before the vocabulary it may be using goes
                pool.vocab.close()

    app = FastAPI(title="llamafleet", lifespan=lifespan)
    app.state.llamafleet = state
    app.state.registry = registry
    install_error_handlers(app)
    api_keys = load_api_keys(config.server, os.environ)
    protect = config.server.protect_health_and_metrics
    # Added before CORS, so CORS (the outer one) answers preflight requests, which carry no key.
    app.add_middleware(ApiKeyMiddleware, keys=api_keys, protect_health_and_metrics=protect)
    app.add_middleware(BodySizeLimit, max_bytes=config.server.max_request_bytes)
    docs.install_openapi(
        app, bool(api_keys), set(ALWAYS_OPEN) | (set() if protect else set(HEALTH_AND_METRICS))
    )
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
        up, body = registry.health()
        return JSONResponse(body, status_code=200 if up else 503, headers=None if up else retry_headers(503))

    @app.get("/livez", responses=docs.LIVE)
    async def livez() -> dict[str, str]:
        """Liveness: 200 while the router answers, whether or not workers are ready (that is /healthz)."""
        return {"status": "alive"}

    @app.get("/metrics", responses=docs.METRICS)
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", responses=docs.MODELS)
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": registry.model_cards()}

    @app.post("/v1/load_lora_adapter", responses=docs.LORA_ADMIN)
    async def load_lora(body: LoadLoraRequest) -> dict[str, str]:
        """Adapters loaded at run time join the first model's pool (vLLM's request names no base model)."""
        if body.lora_name in registry.names:
            raise APIError(400, f"{body.lora_name!r} is the name of a served model", param="lora_name")
        return await load_lora_adapter(registry.default, body)

    @app.post("/v1/unload_lora_adapter", responses=docs.LORA_ADMIN)
    async def unload_lora(body: UnloadLoraRequest) -> dict[str, str]:
        return await unload_lora_adapter(registry.default, body)

    @app.post("/v1/completions", responses=docs.COMPLETIONS)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        pool = lookup(body.model)
        check_generation(pool, body.model)
        return await create_completion(pool, body, request)

    @app.post("/v1/chat/completions", responses=docs.CHAT_COMPLETIONS)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        pool = lookup(body.model)
        check_generation(pool, body.model)
        return await create_chat_completion(pool, body, request)

    @app.post("/v1/responses", responses=docs.RESPONSES)
    async def responses(body: ResponsesRequest, request: Request) -> Any:
        pool = lookup(body.model)
        check_generation(pool, body.model)
        return await create_response(pool, body, request)

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
        await serve_responses_websocket(state, websocket, lookup)

    @app.post("/v1/embeddings", responses=docs.EMBEDDINGS)
    async def embeddings(body: EmbeddingRequest) -> Response:
        return await create_embeddings(lookup(body.model), body)

    @app.post("/tokenize", responses=docs.TOKENIZE)
    async def tokenize_text(body: TokenizeRequest) -> dict[str, Any]:
        pool = lookup(body.model)
        return await pool.preparer.run(tokenize, pool, body)

    @app.post("/detokenize", responses=docs.DETOKENIZE)
    async def detokenize_tokens(body: DetokenizeRequest) -> dict[str, Any]:
        pool = lookup(body.model)
        return await pool.preparer.run(detokenize, pool, body)

    return app
