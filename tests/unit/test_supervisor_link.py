"""The router's end of the supervisor link numbers workers pool after pool, and reports workers that were
ready before the link started (their `ready` reached the dispatcher first)."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from router.process.supervisor_link import SupervisorLink
from shared import link


@dataclass
class FakeDispatcher:
    count: int
    up: list[int]
    down: list[tuple[int, str]] = field(default_factory=list)
    on_ready: Any = None
    on_unresponsive: Any = None

    @property
    def config(self) -> Any:
        return SimpleNamespace(workers=SimpleNamespace(count=self.count))

    def up_workers(self) -> list[Any]:
        return [SimpleNamespace(index=index) for index in self.up]

    def mark_down(self, index: int, reason: str) -> None:
        self.down.append((index, reason))


def test_pools_share_one_numbering_and_early_workers_are_reported() -> None:
    async def scenario() -> None:
        ours, theirs = socket.socketpair()
        first, second = FakeDispatcher(1, up=[0]), FakeDispatcher(2, up=[1])
        router_end = SupervisorLink(theirs.detach(), [first, second])  # type: ignore[list-item]
        await router_end.start()
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        codec = link.supervisor_end()

        async def line() -> bytes:
            return await asyncio.wait_for(reader.readline(), 5)

        seen = [codec.decode(await line()) for _ in range(2)]
        assert seen == [link.WorkerReady(0), link.WorkerReady(2)]  # worker 1 of the second pool is 1 + 1
        second.on_ready(0)
        second.on_unresponsive(1, 1234)
        assert codec.decode(await line()) == link.WorkerReady(1)
        assert codec.decode(await line()) == link.WorkerUnresponsive(2, 1234)
        writer.write(link.router_end().encode(link.WorkerExited(2, -9)))
        await writer.drain()
        for _ in range(50):
            if second.down:
                break
            await asyncio.sleep(0.01)
        assert second.down == [(1, "exited with code -9")] and not first.down
        await router_end.close()
        writer.close()

    asyncio.run(scenario())
