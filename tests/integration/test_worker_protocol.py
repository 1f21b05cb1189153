"""A real worker process against a scripted router: malformed messages are dropped, never fatal.

The test binds the router's two sockets itself, so it can send what no correct router would: bytes that are
not msgpack, maps without a type, submits with missing or mistyped fields, unknown types. The worker must log
and drop each one and still serve the valid request that follows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import msgpack
import zmq

from shared import protocol
from shared.protocol import SubmitRequest
from tests.integration.server import REPO, model_config


def test_worker_survives_malformed_messages(tmp_path: Path, tiny_llama_gguf: Path) -> None:
    requests_endpoint, results_endpoint = f"ipc://{tmp_path}/req.sock", f"ipc://{tmp_path}/res.sock"
    config = {
        "model": model_config(tiny_llama_gguf),
        "workers": {"requests_endpoint": requests_endpoint, "results_endpoint": results_endpoint},
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(requests_endpoint)
    results = context.socket(zmq.PULL)
    results.setsockopt(zmq.LINGER, 0)
    results.bind(results_endpoint)
    worker = subprocess.Popen(
        [sys.executable, "-m", "shared.cli", "worker", "-C", str(path), "--index", "0"],
        cwd=REPO,
        env={**os.environ, "OMP_WAIT_POLICY": "passive"},
    )
    try:
        assert router.poll(60_000), "the worker never said ready"
        identity, payload = router.recv_multipart()
        assert protocol.decode(payload)["t"] == protocol.READY

        def versioned(message: dict) -> bytes:
            return bytes(msgpack.packb({**message, "v": protocol.PROTOCOL_VERSION}))

        garbage = [
            b"\xc1 not msgpack",
            msgpack.packb([1, 2, 3]),
            versioned({"no": "type"}),
            versioned({"t": "submit"}),
            versioned({"t": "submit", "rid": "x", "prompt": "abc", "max_tokens": "many"}),
            versioned({"t": "submit", "rid": "y", "prompt": [1, 2], "max_tokens": 2, "sampling": [1]}),
            versioned({"t": "submit", "rid": "z", "prompt": [1], "max_tokens": 2, "unknown_field": 1}),
            versioned({"t": "cancel"}),
            versioned({"t": "embed", "rid": "e"}),
            versioned({"t": "hello", "live": 5}),
            versioned({"t": "no-such-type"}),
        ]
        for message in garbage:
            router.send_multipart([identity, message])
        valid = SubmitRequest(rid="ok", prompt=[104, 105], max_tokens=3)
        router.send_multipart([identity, protocol.encode(valid.to_wire())])
        finished = False
        while not finished:
            assert results.poll(30_000), "no answer to the valid request"
            message = protocol.decode(results.recv())
            if message["t"] == protocol.FRAMES:
                finished = any(item[0] == "ok" and item[4] for item in message["items"])
        assert worker.poll() is None, "the worker exited"
    finally:
        worker.terminate()
        worker.wait(20)
        router.close()
        results.close()
        context.term()
