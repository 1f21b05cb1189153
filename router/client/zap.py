"""The router's ZAP authenticator: which CURVE client keys may connect to the worker sockets.

libzmq asks the ZAP handler of the socket's context about every CURVE handshake; without a handler it
would let any client key in, so `start_authenticator` must run before the sockets bind. It runs on a thread
of its own (pyzmq's ThreadAuthenticator), so handshakes are answered even while the event loop is busy.
A refused key is logged at WARNING (once a minute per key: ZeroMQ retries the handshake every 100 ms).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator

from shared.curve import ZAP_DOMAIN, RouterKeys

log = logging.getLogger(__name__)

_LOG_EVERY_SECONDS = 60.0


class _AllowList:
    """A pyzmq credentials provider: `callback(domain, z85_key)` says whether a worker key is known."""

    def __init__(self, allowed: dict[bytes, str]) -> None:
        self.allowed = allowed
        self._logged: dict[bytes, float] = {}
        self._lock = threading.Lock()

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.allowed:
            return True
        now = time.monotonic()
        with self._lock:
            if now - self._logged.get(key, float("-inf")) < _LOG_EVERY_SECONDS:
                return False
            if len(self._logged) > 10_000:  # a flood of random keys must not grow this forever
                self._logged.clear()
            self._logged[key] = now
        log.warning(
            "refused a worker connection: CURVE public key %s is not in workers.keys_dir's allow-list",
            key.decode(errors="replace"),
        )
        return False


class _Authenticator(ThreadAuthenticator):
    def __init__(self, context: zmq.Context[Any], allowed: dict[bytes, str]) -> None:
        super().__init__(context, log=logging.getLogger("zmq.auth"))
        self._names = allowed

    def curve_user_id(self, client_public_key: bytes) -> str:
        """The ZAP User-Id of an accepted worker: its key file's name (e.g. `worker-0`)."""
        name = self._names.get(zmq.utils.z85.encode(client_public_key))
        return name or super().curve_user_id(client_public_key)


def start_authenticator(context: zmq.Context[Any], keys: RouterKeys) -> ThreadAuthenticator:
    """Starts the ZAP handler of `context` with the allow-list of worker keys; stop it at shutdown."""
    authenticator = _Authenticator(context, keys.allowed)
    authenticator.configure_curve_callback(ZAP_DOMAIN, credentials_provider=_AllowList(keys.allowed))
    authenticator.start()
    log.info("CURVE on: %d worker key(s) allowed (%s)", len(keys.allowed), ", ".join(keys.allowed.values()))
    return authenticator
