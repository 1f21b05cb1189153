"""HTTP servers on loopback for the media fetching tests: they record every connection and request.

`MediaServer` serves fixed routes (status, headers, body, or a handler function for odd behaviour such as
a slow drip); `SilentServer` accepts connections and never answers. Both bind loopback only (127.0.0.x,
or ::1 where asked): tests send traffic nowhere else (../shared/TESTING.md).
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Handler = Callable[[BaseHTTPRequestHandler], None]


@dataclass
class Route:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    handler: Handler | None = None  # replaces the fixed answer


@dataclass
class Seen:
    path: str
    headers: dict[str, str]


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], routes: dict[str, Route], tls: ssl.SSLContext | None
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _Handler)
        self.routes = routes
        self.seen: list[Seen] = []
        self.connections = 0
        self.tls = tls

    def get_request(self) -> tuple[Any, Any]:
        sock, peer = super().get_request()
        self.connections += 1
        if self.tls is not None:
            sock = self.tls.wrap_socket(sock, server_side=True)
        return sock, peer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def do_GET(self) -> None:
        self.server.seen.append(Seen(self.path, {k.lower(): v for k, v in self.headers.items()}))
        route = self.server.routes.get(self.path)
        if route is None:
            route = Route(404, b"not found")
        if route.handler is not None:
            route.handler(self)
            return
        self.send_response(route.status)
        for name, value in route.headers.items():
            self.send_header(name, value)
        if "Content-Length" not in route.headers:
            self.send_header("Content-Length", str(len(route.body)))
        self.end_headers()
        self.wfile.write(route.body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass
class MediaServer:
    host: str
    port: int
    routes: dict[str, Route]
    _server: _Server

    @property
    def seen(self) -> list[Seen]:
        return self._server.seen

    @property
    def connections(self) -> int:
        return self._server.connections


@contextmanager
def media_server(host: str = "127.0.0.1", tls: ssl.SSLContext | None = None) -> Iterator[MediaServer]:
    routes: dict[str, Route] = {}
    server = _Server((host, 0), routes, tls)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield MediaServer(host, server.server_address[1], routes, server)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@dataclass
class SilentServer:
    port: int
    accepted: list[socket.socket]


@contextmanager
def silent_server() -> Iterator[SilentServer]:
    """Accepts TCP connections on 127.0.0.1 and never sends a byte."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    state = SilentServer(listener.getsockname()[1], [])
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            state.accepted.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()
        for conn in state.accepted:
            conn.close()


def drip(chunks: int, delay: float, chunk: bytes = b"\x00") -> Handler:
    """A 200 whose body trickles out one small chunk every `delay` seconds (never stalls long enough for
    a per-read timeout, so only an overall deadline stops it)."""

    def handle(request: BaseHTTPRequestHandler) -> None:
        request.send_response(200)
        request.send_header("Content-Length", str(chunks * len(chunk)))
        request.end_headers()
        try:
            for _ in range(chunks):
                request.wfile.write(chunk)
                request.wfile.flush()
                time.sleep(delay)
        except OSError:
            pass

    return handle


def unsized(total: int, piece: int = 65536) -> Handler:
    """A 200 with no Content-Length: the body runs until the connection closes."""

    def handle(request: BaseHTTPRequestHandler) -> None:
        request.send_response(200)
        request.send_header("Connection", "close")
        request.end_headers()
        request.close_connection = True
        try:
            sent = 0
            while sent < total:
                request.wfile.write(b"\x00" * piece)
                sent += piece
        except OSError:
            pass

    return handle
