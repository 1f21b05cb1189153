"""The router <-> worker wire protocol: msgpack maps with a type tag and a protocol version.

Topology (as vLLM V1's): the router binds a ROUTER socket for requests and a PULL socket for results; each
worker connects a DEALER (routing id `worker-N`) for requests and PUSH sockets for results and heartbeats.
Results travel as one `frames` message per engine step holding every sequence that advanced; frame items are
positional arrays (not maps) because they are the hot path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgpack

PROTOCOL_VERSION = 1

# Message type tags.
SUBMIT = "submit"
CANCEL = "cancel"
EMBED = "embed"
SHUTDOWN = "shutdown"
# Router -> worker: "who are you?" from a router that does not know the worker as ready (just started, or
# it marked the worker down). Carries the request ids the router still waits for on that worker; the
# worker cancels every other request it holds (their clients are gone) and answers `ready`.
HELLO = "hello"
READY = "ready"
FRAMES = "frames"
ERROR = "error"
STATS = "stats"
EMBEDDINGS = "embeddings"

# Finish reasons a worker reports.
FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_CANCELLED = "cancelled"


class ProtocolError(ValueError):
    """A message that does not decode or carries another protocol version."""


def encode(message: dict[str, Any]) -> bytes:
    message["v"] = PROTOCOL_VERSION
    return bytes(msgpack.packb(message, use_bin_type=True))


def decode(payload: bytes) -> dict[str, Any]:
    try:
        message = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as error:
        raise ProtocolError(f"undecodable message: {error}") from error
    if not isinstance(message, dict) or "t" not in message:
        raise ProtocolError("message is not a tagged map")
    if message.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {message.get('v')} != {PROTOCOL_VERSION}")
    return message


def worker_identity(index: int) -> bytes:
    return f"worker-{index}".encode()


@dataclass
class SamplingParams:
    """What a worker's sampler chain needs; defaults are llama.cpp's neutral values."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_last_n: int = 64
    seed: int | None = None
    logit_bias: list[tuple[int, float]] = field(default_factory=list)

    def to_wire(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> SamplingParams:
        params = cls(**data)
        params.logit_bias = [(int(t), float(b)) for t, b in params.logit_bias]
        return params


@dataclass
class SubmitRequest:
    """A generation request: one prompt, `n` parallel choices sharing its KV."""

    rid: str
    prompt: list[int]
    max_tokens: int
    n: int = 1
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    # Top alternatives per token to return; None = no logprobs at all.
    logprobs: int | None = None
    grammar: str | None = None
    # Regexes on the generated text; the grammar engages at the first match (lazy tool/reasoning grammars,
    # see worker/sampling.py).
    grammar_triggers: list[str] = field(default_factory=list)
    priority: int = 0

    def to_wire(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["t"] = SUBMIT
        data["sampling"] = self.sampling.to_wire()
        return data

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> SubmitRequest:
        fields = {k: v for k, v in data.items() if k not in ("t", "v")}
        fields["sampling"] = SamplingParams.from_wire(fields.get("sampling") or {})
        return cls(**fields)


class TokenLogprob(NamedTuple):
    """Log-probability of the chosen token and the top alternatives as (token id, logprob) pairs."""

    logprob: float
    top: list[tuple[int, float]]


class FrameItem(NamedTuple):
    """One sequence's progress in one engine step."""

    rid: str
    choice: int
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish: str | None
    # Set on the finishing item: prompt_tokens, completion_tokens, cached_tokens.
    usage: dict[str, int] | None


def frames_message(step: int, items: list[FrameItem]) -> dict[str, Any]:
    return {"t": FRAMES, "step": step, "items": items}


def parse_frame_items(message: dict[str, Any]) -> list[FrameItem]:
    items: list[FrameItem] = []
    for rid, choice, tokens, logprobs, finish, usage in message["items"]:
        parsed_lp = None
        if logprobs is not None:
            parsed_lp = [TokenLogprob(lp, [(int(t), float(p)) for t, p in top]) for lp, top in logprobs]
        items.append(FrameItem(rid, choice, tokens, parsed_lp, finish, usage))
    return items


def hello_message(live: list[str]) -> dict[str, Any]:
    return {"t": HELLO, "live": live}


def error_message(rid: str, status: int, kind: str, message: str) -> dict[str, Any]:
    """A request failed in the worker; `status` is the HTTP status the router should answer with."""
    return {"t": ERROR, "rid": rid, "status": status, "type": kind, "message": message}


@dataclass
class EmbedRequest:
    """Embeddings for several inputs, one llama.cpp sequence each; inputs already fit the worker's limit."""

    rid: str
    inputs: list[list[int]]
    normalize: bool = True

    def to_wire(self) -> dict[str, Any]:
        return {"t": EMBED, "rid": self.rid, "inputs": self.inputs, "normalize": self.normalize}

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> EmbedRequest:
        return cls(data["rid"], [list(tokens) for tokens in data["inputs"]], bool(data["normalize"]))


@dataclass
class EmbeddingsReply:
    """A worker's answer to an EmbedRequest: little-endian float32 bytes per input, in input order."""

    rid: str
    vectors: list[bytes]
    token_counts: list[int]

    def to_wire(self) -> dict[str, Any]:
        return {
            "t": EMBEDDINGS,
            "rid": self.rid,
            "vectors": self.vectors,
            "token_counts": self.token_counts,
        }

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> EmbeddingsReply:
        return cls(data["rid"], list(data["vectors"]), [int(n) for n in data["token_counts"]])
