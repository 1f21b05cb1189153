"""The wire protocol: round trips, version checks, frame items as positional arrays."""

from __future__ import annotations

import msgpack
import pytest

from shared import protocol
from shared.protocol import FrameItem, SamplingParams, SubmitRequest, TokenLogprob


def test_submit_round_trip() -> None:
    submit = SubmitRequest(
        rid="r-1",
        prompt=[1, 2, 3],
        max_tokens=7,
        n=2,
        sampling=SamplingParams(temperature=0.5, seed=3, logit_bias=[(5, -1.5)]),
        stop_token_ids=[9],
        logprobs=2,
        grammar='root ::= "a"',
    )
    decoded = protocol.decode(protocol.encode(submit.to_wire()))
    assert decoded["t"] == protocol.SUBMIT
    again = SubmitRequest.from_wire(decoded)
    assert again == submit


def test_frames_round_trip() -> None:
    items = [
        FrameItem("a", 0, [5], [TokenLogprob(-0.1, [(5, -0.1), (6, -2.0)])], None, None),
        FrameItem("b", 1, [], None, "stop", {"prompt_tokens": 3, "completion_tokens": 4, "cached_tokens": 0}),
    ]
    decoded = protocol.decode(protocol.encode(protocol.frames_message(7, items)))
    assert protocol.parse_frame_items(decoded) == items
    # Items travel as arrays, not maps: the hot path stays small.
    raw = msgpack.unpackb(protocol.encode(protocol.frames_message(1, items[:1])), raw=False)
    assert isinstance(raw["items"][0], list)


def test_rejects_other_versions_and_garbage() -> None:
    with pytest.raises(protocol.ProtocolError, match="version"):
        protocol.decode(msgpack.packb({"t": "submit", "v": 99}))
    with pytest.raises(protocol.ProtocolError):
        protocol.decode(b"\xc1not msgpack")
    with pytest.raises(protocol.ProtocolError):
        protocol.decode(msgpack.packb([1, 2]))
