"""`server.router_processes: 2`: two router processes share the port, each connected to every worker.

On the tiny model: both routers answer (each has its own /metrics, labelled with its index), a request gets
the same greedy answer whichever router it reached, and a killed router process is restarted by the
supervisor while the other keeps serving.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.server import Server, child_pids, model_config, run_server

ROUTERS = 2


@pytest.fixture(scope="module")
def server(tiny_llama_gguf: Path) -> Iterator[Server]:
    model = model_config(tiny_llama_gguf)
    with run_server(model, server={"router_processes": ROUTERS}, workers={"count": 2}) as handle:
        wait_all_routers_ready(handle)
        yield handle


def wait_all_routers_ready(server: Server, timeout: float = 30.0) -> None:
    """/healthz answered by one router says nothing of the other: each must see both workers up (a router
    that bound its sockets after a worker's first `ready` gets it after its `hello`)."""
    deadline = time.monotonic() + timeout
    up: dict[str, float] = {}
    while len(up) < ROUTERS or any(count < 2 for count in up.values()):
        assert time.monotonic() < deadline, f"workers up per router: {up}"
        samples = Server.metrics(server)
        index = next(k for k in samples if k.startswith("llamafleet_router_process{")).split('"')[1]
        up[index] = sum(v for k, v in samples.items() if k.startswith("llamafleet_worker_up{"))
        time.sleep(0.05)


def routers(server: Server) -> list[int]:
    pids = child_pids(server.process.pid, "router")
    server._seen_workers.update(pids)  # checked for leftovers at the end
    return pids


def completion(server: Server) -> str:
    """One greedy completion on a fresh connection (the kernel spreads connections over the routers)."""
    body = {"model": "test-model", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
    headers = {"Authorization": f"Bearer {server.api_key}"}
    response = httpx.post(f"{server.v1}/completions", json=body, headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["text"])


def served_by_router(server: Server, scrapes: int = 60) -> dict[str, float]:
    """Completions counted by each router process, scraping /metrics on fresh connections until every
    router answered once."""
    seen: dict[str, float] = {}
    for _ in range(scrapes):
        samples = Server.metrics(server)
        index = next(k for k in samples if k.startswith("llamafleet_router_process{")).split('"')[1]
        seen[index] = sum(
            v
            for k, v in samples.items()
            if k.startswith('llamafleet_requests_total{endpoint="/v1/completions"')
        )
        if len(seen) == ROUTERS:
            break
    return seen


def test_both_routers_serve_the_same_answers(server: Server) -> None:
    assert len(routers(server)) == ROUTERS
    answers = {completion(server) for _ in range(24)}
    assert len(answers) == 1  # greedy, one model: the same text whichever router and worker served it
    seen = served_by_router(server)
    assert sorted(seen) == [str(r) for r in range(ROUTERS)], seen
    assert all(count > 0 for count in seen.values()), seen


def test_a_killed_router_process_is_restarted(server: Server) -> None:
    before = routers(server)
    os.kill(before[1], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while True:
        now = routers(server)
        if len(now) == ROUTERS and before[1] not in now:
            break
        assert time.monotonic() < deadline, f"router not restarted: {before} -> {now}"
        completion(server)  # the other router keeps serving meanwhile
        time.sleep(0.2)
    # The new router re-joined the workers (hello / ready) and serves too.
    wait_all_routers_ready(server)
    deadline = time.monotonic() + 30
    while len(served_by_router(server)) < ROUTERS or not all(served_by_router(server).values()):
        assert time.monotonic() < deadline, "the restarted router never served"
        for _ in range(8):
            completion(server)
