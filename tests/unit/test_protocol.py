"""The wire protocol: every message round-trips, encoding leaves its input alone, bad payloads are refused."""

from __future__ import annotations

import copy
from typing import Any

import msgpack
import msgspec
import pytest

from router.api.metrics import _WORKER_STATS
from shared import protocol
from shared.protocol import (
    Cancel,
    EmbeddingsReply,
    EmbedInfo,
    EmbedRequest,
    Error,
    FrameItem,
    Frames,
    Hello,
    Ready,
    SamplingParams,
    Stats,
    SubmitRequest,
    TokenLogprob,
    WorkerInfo,
    WorkerStats,
)

INFO = WorkerInfo(
    n_ctx=512,
    n_ctx_seq=256,
    n_seq_max=2,
    n_batch=128,
    n_vocab=300,
    n_ctx_train=1024,
    embedding=False,
    pooling_type=0,
    swa=False,
    recurrent=False,
    can_shift=True,
    description="tiny",
    embed=EmbedInfo(max_tokens=64, dim=32, normalize=False),
)

ROUTER_MESSAGES: list[protocol.RouterMessage] = [
    SubmitRequest(
        rid="r-1",
        prompt=[1, 2, 3],
        max_tokens=7,
        n=2,
        sampling=SamplingParams(temperature=0.5, seed=3, logit_bias=[(5, -1.5)]),
        ignore_eos=True,
        logprobs=2,
        grammar='root ::= "a"',
        grammar_triggers=["<tool>"],
    ),
    SubmitRequest("r-2", [4], 1),
    SubmitRequest(
        "r-3",
        [4, 5],
        1,
        media=[protocol.MediaInput("image", b"\x89PNG", "ab" * 32, 1, "messages[0].content[0]")],
    ),
    Cancel("r-1"),
    EmbedRequest("e-1", [[1, 2], [3]], normalize=False),
    Hello(["r-1", "e-1"]),
]

WORKER_MESSAGES: list[protocol.WorkerMessage] = [
    Ready(worker=1, pid=4242, info=INFO),
    Stats(worker=1, pid=4242, counters=WorkerStats(steps_total=9, kv_cells_total=512)),
    Frames(
        [
            FrameItem("a", 0, [5], [TokenLogprob(-0.1, [(5, -0.1), (6, -2.0)])], None),
            FrameItem("b", 1, [], None, "stop", 3),
        ]
    ),
    Error("r-1", 503, "unavailable", "worker is draining"),
    EmbeddingsReply("e-1", [b"\x00\x00\x80?", b""], [2, 1]),
]


@pytest.mark.parametrize("message", ROUTER_MESSAGES, ids=lambda m: type(m).__name__)
def test_router_messages_round_trip_unchanged(message: protocol.RouterMessage) -> None:
    before = copy.deepcopy(message)
    decoded = protocol.worker_codec().decode(protocol.router_codec().encode(message))
    assert decoded == message and type(decoded) is type(message)
    assert message == before  # encoding writes nothing into its input


@pytest.mark.parametrize("message", WORKER_MESSAGES, ids=lambda m: type(m).__name__)
def test_worker_messages_round_trip_unchanged(message: protocol.WorkerMessage) -> None:
    before = copy.deepcopy(message)
    decoded = protocol.router_codec().decode(protocol.worker_codec().encode(message))
    assert decoded == message and type(decoded) is type(message)
    assert message == before


def test_envelope_and_positional_frame_items() -> None:
    payload = protocol.worker_codec().encode(WORKER_MESSAGES[2])
    version, body = msgpack.unpackb(payload, raw=False)
    assert version == protocol.PROTOCOL_VERSION and body["t"] == "frames"
    # Items (and their logprobs) travel as arrays, not maps: the hot path stays small.
    assert body["items"][0] == ["a", 0, [5], [[-0.1, [[5, -0.1], [6, -2.0]]]], None, None, None, None]
    assert set(body) == {"t", "items"}  # no unread `step`


def _payload(body: Any, version: int = protocol.PROTOCOL_VERSION) -> bytes:
    return bytes(msgpack.packb([version, body]))


SUBMIT = {"t": "submit", "rid": "x", "prompt": [1, 2], "max_tokens": 2}

BAD_FOR_WORKER = {
    "not msgpack": b"\xc1 not msgpack",
    "a bare array": msgpack.packb([1, 2, 3]),
    "version 1 map": msgpack.packb({**SUBMIT, "v": 1}),
    "other version": _payload(SUBMIT, version=99),
    "no type": _payload({"rid": "x"}),
    "unknown type": _payload({"t": "no-such-type"}),
    "a worker's message": _payload({"t": "error", "rid": "x", "status": 500, "kind": "k", "message": "m"}),
    "missing fields": _payload({"t": "submit"}),
    "float max_tokens": _payload({**SUBMIT, "max_tokens": 2.5}),
    "string tokens": _payload({**SUBMIT, "prompt": ["a"]}),
    "prompt a string": _payload({**SUBMIT, "prompt": "abc"}),
    "float n": _payload({**SUBMIT, "n": 1.5}),
    "sampling a list": _payload({**SUBMIT, "sampling": [1]}),
    "temperature a string": _payload({**SUBMIT, "sampling": {"temperature": "hot"}}),
    "logit_bias pairs": _payload({**SUBMIT, "sampling": {"logit_bias": [[1]]}}),
    "unknown field": _payload({**SUBMIT, "priority": 1}),
    "cancel without rid": _payload({"t": "cancel"}),
    "embed without inputs": _payload({"t": "embed", "rid": "e"}),
    "hello live an int": _payload({"t": "hello", "live": 5}),
}

BAD_FOR_ROUTER = {
    "negative worker": _payload({"t": "ready", "worker": -1, "pid": 1, "info": msgspec.to_builtins(INFO)}),
    "info missing": _payload({"t": "ready", "worker": 0, "pid": 1}),
    "status not http": _payload({"t": "error", "rid": "x", "status": 7, "kind": "k", "message": "m"}),
    "stats counters a map of strings": _payload(
        {"t": "stats", "worker": 0, "pid": 1, "counters": {"x": "y"}}
    ),
    "frame item short": _payload({"t": "frames", "items": [["a", 0, [1]]]}),
    "frame tokens floats": _payload({"t": "frames", "items": [["a", 0, [1.5], None, None, None]]}),
    "a router's message": _payload(SUBMIT),
}


@pytest.mark.parametrize("payload", BAD_FOR_WORKER.values(), ids=BAD_FOR_WORKER.keys())
def test_worker_codec_refuses(payload: bytes) -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol.worker_codec().decode(payload)


@pytest.mark.parametrize("payload", BAD_FOR_ROUTER.values(), ids=BAD_FOR_ROUTER.keys())
def test_router_codec_refuses(payload: bytes) -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol.router_codec().decode(payload)


def test_other_versions_are_named() -> None:
    codec = protocol.worker_codec()
    with pytest.raises(protocol.ProtocolError, match=f"protocol version 1 != {protocol.PROTOCOL_VERSION}"):
        codec.decode(BAD_FOR_WORKER["version 1 map"])
    with pytest.raises(protocol.ProtocolError, match=f"protocol version 99 != {protocol.PROTOCOL_VERSION}"):
        codec.decode(BAD_FOR_WORKER["other version"])


def test_int_beyond_64_bits_does_not_encode() -> None:
    """The dispatcher turns this into a 400 (router/dispatch.py `_send`)."""
    with pytest.raises(OverflowError):
        protocol.router_codec().encode(SubmitRequest("r", [1], 2, sampling=SamplingParams(seed=2**70)))


def test_metrics_export_only_worker_stats_fields() -> None:
    assert set(_WORKER_STATS) <= set(WorkerStats.__struct_fields__)
