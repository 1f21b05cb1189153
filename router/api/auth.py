"""API keys: which Bearer tokens the router accepts, checked for HTTP requests and WebSocket handshakes alike.

Keys come from `server.api_key` (one string or a list), `server.api_keys_file` (one key per line; blank
lines and `#` comments ignored) and the `LLAMAFLEET_API_KEYS` environment variable (comma-separated); a
client may send any of them. With none configured every route is open. `/healthz` and `/metrics` stay open
for probes and scrapers unless `server.protect_health_and_metrics` is set.

The check is a plain ASGI middleware, so it sees WebSocket connections too (FastAPI's `@app.middleware
("http")` does not): a handshake without a valid key is refused before it is accepted, with the same 401
error body as HTTP. Tokens are compared as SHA-256 digests with `hmac.compare_digest` against every key,
without stopping at a match, so the time taken tells neither which key matched nor any key's length.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from pathlib import Path

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from router.api.errors import error_body
from shared.config import ConfigError, ServerOptions

ENV_VAR = "LLAMAFLEET_API_KEYS"
HEALTH_AND_METRICS = frozenset({"/healthz", "/metrics"})
# Liveness says only that the process answers: open even with protect_health_and_metrics, so a kubelet's
# probe needs no key.
ALWAYS_OPEN = frozenset({"/livez"})


class ApiKeys:
    """The accepted keys, kept only as digests."""

    def __init__(self, keys: list[str]) -> None:
        self._digests = [hashlib.sha256(key.encode()).digest() for key in dict.fromkeys(keys)]

    def __len__(self) -> int:
        return len(self._digests)

    def accepts(self, token: str) -> bool:
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        matched = False
        for known in self._digests:  # no early exit: every key is compared every time
            matched |= hmac.compare_digest(digest, known)
        return matched


def _read_keys_file(path: str) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"server.api_keys_file: cannot read {path}: {error}") from None
    keys = [line.strip() for line in text.splitlines()]
    keys = [key for key in keys if key and not key.startswith("#")]
    if not keys:
        # An empty file must not silently open the server to everyone.
        raise ConfigError(f"server.api_keys_file: {path} holds no keys")
    return keys


def load_api_keys(options: ServerOptions, environ: Mapping[str, str]) -> ApiKeys:
    """Every configured key: the config's, the keys file's and the environment's."""
    configured = options.api_key
    keys = [configured] if isinstance(configured, str) else list(configured or [])
    if options.api_keys_file:
        keys += _read_keys_file(options.api_keys_file)
    keys += environ.get(ENV_VAR, "").split(",")
    return ApiKeys([key.strip() for key in keys if key.strip()])


def _bearer_token(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return ""


class ApiKeyMiddleware:
    """Answers 401 (OpenAI's error JSON) to HTTP requests and WebSocket handshakes without a valid key."""

    def __init__(self, app: ASGIApp, keys: ApiKeys, protect_health_and_metrics: bool) -> None:
        self.app = app
        self.keys = keys
        self.open_paths = ALWAYS_OPEN | (frozenset() if protect_health_and_metrics else HEALTH_AND_METRICS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] not in ("http", "websocket")
            or not self.keys
            or scope["path"] in self.open_paths
            or self.keys.accepts(_bearer_token(scope))
        ):
            await self.app(scope, receive, send)
            return
        response = JSONResponse(
            error_body("invalid or missing API key", "authentication_error", code="invalid_api_key"),
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )
        if scope["type"] == "http":
            await response(scope, receive, send)
            return
        websocket = WebSocket(scope, receive, send)
        try:
            await websocket.send_denial_response(response)
        except RuntimeError:  # the server cannot send an HTTP answer to a handshake: close instead
            await websocket.close(code=1008, reason="invalid or missing API key")
