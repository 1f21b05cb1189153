"""The router's end of the socket pair `llamafleet serve` hands it: worker exits in, worker news out.

Under a supervisor the router learns of a worker's death from the process itself (at once) rather than from
heartbeats that stop, and asks the supervisor to kill a worker that stopped answering so that it is replaced
instead of left hanging. Typed JSON lines both ways (shared/link.py); the router runs on its own without a
link too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

from router.client.dispatch import Dispatcher
from shared import link

log = logging.getLogger(__name__)


class SupervisorLink:
    def __init__(self, fd: int, dispatcher: Dispatcher) -> None:
        self._fd = fd
        self._dispatcher = dispatcher
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._codec = link.router_end()

    async def start(self) -> None:
        reader, self._writer = await asyncio.open_unix_connection(sock=socket.socket(fileno=self._fd))
        self._dispatcher.on_ready = lambda index: self._send(link.WorkerReady(index))
        self._dispatcher.on_unresponsive = lambda index, pid: self._send(link.WorkerUnresponsive(index, pid))
        self._task = asyncio.create_task(self._read(reader), name="supervisor-link")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._writer is not None:
            self._writer.close()

    def _send(self, message: link.ToSupervisor) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(self._codec.encode(message))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            try:
                message = self._codec.decode(line)
            except link.LinkError as error:
                log.warning("bad message from the supervisor (%s): %r", error, line[:200])
                continue
            self._dispatcher.mark_down(message.worker, f"exited with code {message.code}")
        log.warning("the supervisor closed its link")
