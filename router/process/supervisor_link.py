"""The router's end of the socket pair `llamafleet serve` hands it: worker exits in, worker news out.

Under a supervisor the router learns of a worker's death from the process itself (at once) rather than from
heartbeats that stop, and asks the supervisor to kill a worker that stopped answering so that it is replaced
instead of left hanging. JSON lines both ways; the router runs on its own without a link too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from typing import Any

from router.client.dispatch import Dispatcher

log = logging.getLogger(__name__)


class SupervisorLink:
    def __init__(self, fd: int, dispatcher: Dispatcher) -> None:
        self._fd = fd
        self._dispatcher = dispatcher
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        reader, self._writer = await asyncio.open_unix_connection(sock=socket.socket(fileno=self._fd))
        self._dispatcher.on_ready = lambda index: self._send({"t": "worker_ready", "worker": index})
        self._dispatcher.on_unresponsive = lambda index, pid: self._send(
            {"t": "worker_unresponsive", "worker": index, "pid": pid}
        )
        self._task = asyncio.create_task(self._read(reader), name="supervisor-link")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._writer is not None:
            self._writer.close()

    def _send(self, message: dict[str, Any]) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(json.dumps(message).encode() + b"\n")

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            try:
                message = json.loads(line)
                if message["t"] == "worker_exited":
                    self._dispatcher.mark_down(
                        int(message["worker"]), f"exited with code {message.get('code')}"
                    )
            except (ValueError, KeyError, TypeError):
                log.warning("bad message from the supervisor: %r", line[:200])
        log.warning("the supervisor closed its link")
