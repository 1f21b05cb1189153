"""The router's end of the wire: what a worker sends that does not type-check is dropped, never delivered.

`Dispatcher.receive` is what both reader tasks call for every payload from a worker. Fed malformed payloads
(another version, unknown tags, mistyped fields that still decode as msgpack), it must log and drop them:
no exception escapes, no worker becomes ready, nothing reaches a request's queue where a handler would meet
a float token id or a status that is not HTTP. Valid messages still work afterwards.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import msgspec
import pytest

from router.client.dispatch import Dispatcher, Pending, WorkerFailure
from shared import protocol
from shared.config import parse_config
from tests.unit.test_protocol import INFO

V = protocol.PROTOCOL_VERSION


def _payload(body: Any, version: int = V) -> bytes:
    return bytes(msgpack.packb([version, body]))


@pytest.fixture
def dispatcher(tmp_path: Path) -> Iterator[Dispatcher]:
    config = parse_config(
        {
            "model": {"path": str(tmp_path / "model.gguf")},
            "workers": {
                "requests_endpoint": f"ipc://{tmp_path}/req.sock",
                "results_endpoint": f"ipc://{tmp_path}/res.sock",
            },
        },
        "test",
    )
    dispatcher = Dispatcher(config)
    yield dispatcher
    dispatcher._ctx.term()


READY = {"t": "ready", "worker": 0, "pid": 11, "info": msgspec.to_builtins(INFO)}

MALFORMED = [
    b"\xc1 not msgpack",
    msgpack.packb({**READY, "v": 1}),  # a version-1 worker
    _payload(READY, version=V + 1),
    _payload({**READY, "worker": "0"}),
    _payload({**READY, "worker": -3}),
    _payload({**READY, "info": {**READY["info"], "n_seq_max": 2.5}}),
    _payload({**READY, "info": {"n_ctx": 5}}),
    _payload({"t": "stats", "worker": 0, "pid": 11, "counters": {"steps_total": "many"}}),
    _payload({"t": "error", "rid": "r", "status": 7, "kind": "k", "message": "m"}),
    _payload({"t": "error", "rid": "r", "status": "500", "kind": "k", "message": "m"}),
    _payload({"t": "frames", "items": [["r", 0, [1.5], None, None, None]]}),
    _payload({"t": "frames", "items": [["r", 0, ["a"], None, None, None]]}),
    _payload({"t": "frames", "items": [["r", "0", [1], None, None, None]]}),
    _payload({"t": "frames", "items": [["r", 0, [1], [[-0.5, [["x", 0.1]]]], None, None]]}),
    _payload({"t": "frames", "items": [{"rid": "r"}]}),
    _payload({"t": "embeddings", "rid": "r", "vectors": ["text"], "token_counts": [1]}),
    _payload({"t": "frames", "step": 3, "items": []}),  # version 1's unread field
    _payload({"t": "submit", "rid": "r", "prompt": [1], "max_tokens": 1}),  # a router's message
    _payload({"t": "no-such-type"}),
]


def test_malformed_worker_messages_are_dropped(dispatcher: Dispatcher) -> None:
    pending = Pending("r", 0)
    dispatcher.pending["r"] = pending
    for payload in MALFORMED:
        dispatcher.receive(payload)
    assert not dispatcher.workers, "no malformed ready or stats registered a worker"
    assert pending.queue.empty(), "nothing malformed reached the request"

    # Valid messages still get through, typed.
    codec = protocol.worker_codec()
    dispatcher.receive(_payload(READY))
    worker = dispatcher.workers[0]
    assert worker.up and worker.info == INFO and dispatcher.capacity() == INFO.n_seq_max
    dispatcher.receive(codec.encode(protocol.Stats(0, 11, protocol.WorkerStats(steps_total=4))))
    assert worker.stats.steps_total == 4
    dispatcher.receive(codec.encode(protocol.Stats(0, 12, protocol.WorkerStats(steps_total=99))))
    assert worker.stats.steps_total == 4, "a late beat of another process is ignored"
    item = protocol.FrameItem("r", 0, [7], None, "stop", 0)
    dispatcher.receive(codec.encode(protocol.Frames([item])))
    dispatcher.receive(codec.encode(protocol.Error("r", 503, "unavailable", "draining")))
    assert pending.queue.get_nowait() == item
    failure = pending.queue.get_nowait()
    assert isinstance(failure, WorkerFailure) and failure.status == 503


def test_a_bug_in_handling_is_contained(dispatcher: Dispatcher, caplog: pytest.LogCaptureFixture) -> None:
    """Even a handler that raises (a full queue here) does not stop the reader that called `receive`."""
    queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=1)
    queue.put_nowait("taken")
    dispatcher.pending["r"] = Pending("r", 0, queue)
    codec = protocol.worker_codec()
    dispatcher.receive(codec.encode(protocol.Frames([protocol.FrameItem("r", 0, [7], None, None)])))
    assert "could not be handled" in caplog.text
