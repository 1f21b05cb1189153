"""With several router processes (`server.router_processes`), a router counts each worker's load as the
larger of its own requests there and what the worker's last heartbeat reports (every router's), for both
routing and the admission budget; with one router, heartbeats never change its own count."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from router.client.dispatch import Dispatcher, Pending
from shared import protocol
from shared.config import parse_config
from tests.unit.test_protocol import INFO


def _dispatcher(tmp_path: Path, routers: int) -> Dispatcher:
    config = parse_config(
        {
            "server": {"router_processes": routers},
            "model": {"path": str(tmp_path / "model.gguf")},
            "workers": {
                "requests_endpoint": f"ipc://{tmp_path}/req.sock",
                "results_endpoint": f"ipc://{tmp_path}/res.sock",
            },
        },
        "test",
    )
    return Dispatcher(config, router=routers - 1)


@pytest.fixture(params=[1, 2])
def dispatcher(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Dispatcher]:
    dispatcher = _dispatcher(tmp_path, request.param)
    yield dispatcher
    dispatcher._ctx.term()


def _beat(dispatcher: Dispatcher, worker: int, running: int, queued: int) -> None:
    counters = protocol.WorkerStats(
        running_requests=running, running_sequences=running, queued_requests=queued
    )
    dispatcher._handle(protocol.Stats(worker=worker, pid=10 + worker, counters=counters))


def test_reported_load_counts_only_with_several_routers(dispatcher: Dispatcher) -> None:
    async def run() -> None:
        for index in (0, 1):
            dispatcher._handle(protocol.Ready(worker=index, pid=10 + index, info=INFO))
        # This router has one request on worker 0; worker 1's heartbeat says other routers gave it five.
        dispatcher.pending["mine"] = Pending("mine", 0)
        dispatcher.workers[0].in_flight.add("mine")
        _beat(dispatcher, 0, 1, 0)
        _beat(dispatcher, 1, 3, 2)
        shared = dispatcher.config.server.router_processes > 1
        assert dispatcher.workers[1].load == (5 if shared else 0)
        assert dispatcher.in_flight_sequences() == (1 + 5 if shared else 1)
        assert dispatcher.pick_worker().index == (0 if shared else 1)

    asyncio.run(run())


def test_endpoints_of_router_n_carry_its_index(tmp_path: Path) -> None:
    config = _dispatcher(tmp_path, 3).config
    assert config.router_endpoints() == [
        (f"ipc://{tmp_path}/req.sock", f"ipc://{tmp_path}/res.sock"),
        (f"ipc://{tmp_path}/req.sock-r1", f"ipc://{tmp_path}/res.sock-r1"),
        (f"ipc://{tmp_path}/req.sock-r2", f"ipc://{tmp_path}/res.sock-r2"),
    ]


def test_several_routers_need_ipc_endpoints(tmp_path: Path) -> None:
    from shared.config import ConfigError

    with pytest.raises(ConfigError, match="router_processes"):
        parse_config(
            {
                "server": {"router_processes": 2},
                "model": {"path": "m.gguf"},
                "workers": {"requests_endpoint": "tcp://127.0.0.1:5555", "insecure_tcp": True},
            },
            "test",
        )
