"""The router's end of the socket pair `llamafleet serve` hands it: worker exits in, worker news out.

Under a supervisor the router learns of a worker's death from the process itself (at once) rather than from
heartbeats that stop, and asks the supervisor to kill a worker that stopped answering so that it is replaced
instead of left hanging. Typed JSON lines both ways (shared/link.py); the router runs on its own without a
link too.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket

from router.client.dispatch import Dispatcher
from shared import link

log = logging.getLogger(__name__)


class SupervisorLink:
    """`dispatchers`: one per model pool; the supervisor numbers workers pool after pool
    (`Config.worker_slots`), so worker N of the link is index N - offset of its pool's dispatcher."""

    def __init__(self, fd: int, dispatchers: list[Dispatcher]) -> None:
        self._fd = fd
        self._pools: list[tuple[int, Dispatcher]] = []
        offset = 0
        for dispatcher in dispatchers:
            self._pools.append((offset, dispatcher))
            offset += dispatcher.config.workers.count
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._codec = link.router_end()

    async def start(self) -> None:
        reader, self._writer = await asyncio.open_unix_connection(sock=socket.socket(fileno=self._fd))
        for offset, dispatcher in self._pools:
            dispatcher.on_ready = functools.partial(self._ready, offset)
            dispatcher.on_unresponsive = functools.partial(self._unresponsive, offset)
            # Workers whose `ready` arrived before the link existed (the dispatchers start first).
            for worker in dispatcher.up_workers():
                self._ready(offset, worker.index)
        self._task = asyncio.create_task(self._read(reader), name="supervisor-link")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._writer is not None:
            self._writer.close()

    def _ready(self, offset: int, index: int) -> None:
        self._send(link.WorkerReady(offset + index))

    def _unresponsive(self, offset: int, index: int, pid: int) -> None:
        self._send(link.WorkerUnresponsive(offset + index, pid))

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
            for offset, dispatcher in reversed(self._pools):
                if message.worker >= offset:
                    dispatcher.mark_down(message.worker - offset, f"exited with code {message.code}")
                    break
        log.warning("the supervisor closed its link")
