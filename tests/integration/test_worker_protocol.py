"""A real worker process against a scripted router: malformed messages are dropped, never fatal.

The test binds the router's two sockets itself, so it can send what no correct router would: bytes that are
not msgpack, maps without a type, another protocol version, submits with missing fields or with fields of
the wrong type that still decode as msgpack (a float max_tokens, string or float token ids, a string
temperature), unknown types. The worker must log and drop each one, start nothing for them, and still serve
the valid request that follows.
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
from shared.protocol import Frames, SubmitRequest
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
        codec = protocol.router_codec()
        assert isinstance(codec.decode(payload), protocol.Ready)

        def versioned(message: dict) -> bytes:
            return bytes(msgpack.packb([protocol.PROTOCOL_VERSION, message]))

        submit = {"t": "submit", "max_tokens": 2}

        garbage = [
            b"\xc1 not msgpack",
            msgpack.packb([1, 2, 3]),
            versioned({"no": "type"}),
            versioned({"t": "submit"}),
            versioned({"t": "submit", "rid": "x", "prompt": "abc", "max_tokens": "many"}),
            versioned({"t": "submit", "rid": "y", "prompt": [1, 2], "max_tokens": 2, "sampling": [1]}),
            versioned(
                {"t": "submit", "rid": "z", "prompt": [1], "max_tokens": 2, "priority": 1}
            ),  # gone in v2
            msgpack.packb({**submit, "rid": "old", "prompt": [1], "v": 1}),  # a version-1 router
            bytes(msgpack.packb([protocol.PROTOCOL_VERSION + 1, {**submit, "rid": "new", "prompt": [1]}])),
            versioned({**submit, "rid": "f", "prompt": [104], "max_tokens": 2.5}),
            versioned({**submit, "rid": "s", "prompt": ["a"]}),
            versioned({**submit, "rid": "p", "prompt": [104.5, 105.5]}),
            versioned({**submit, "rid": "n", "prompt": [104], "n": 1.5}),
            versioned({**submit, "rid": "h", "prompt": [104], "sampling": {"temperature": "hot"}}),
            versioned({**submit, "rid": "b", "prompt": [104], "sampling": {"logit_bias": [["x", 1]]}}),
            versioned({**submit, "rid": "l", "prompt": [104], "logprobs": "all"}),
            versioned({"t": "cancel"}),
            versioned({"t": "embed", "rid": "e"}),
            versioned({"t": "hello", "live": 5}),
            versioned({"t": "no-such-type"}),
        ]
        for message in garbage:
            router.send_multipart([identity, message])
        valid = SubmitRequest(rid="ok", prompt=[104, 105], max_tokens=3)
        router.send_multipart([identity, codec.encode(valid)])
        finished = False
        answered: set[str] = set()
        while not finished:
            assert results.poll(30_000), "no answer to the valid request"
            message = codec.decode(results.recv())
            if isinstance(message, Frames):
                answered |= {item.rid for item in message.items}
                finished = any(item.rid == "ok" and item.finish for item in message.items)
            elif isinstance(message, protocol.Error):
                answered.add(message.rid)
        assert worker.poll() is None, "the worker exited"
        # Only the well-formed ones ran: the rest were dropped before the engine saw them.
        assert answered == {"ok"}, answered
    finally:
        worker.terminate()
        worker.wait(20)
        router.close()
        results.close()
        context.term()
