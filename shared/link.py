"""The messages of the socket pair between `llamafleet serve` (router/supervisor.py) and its router.

One JSON object per line, tagged by `t`: the supervisor reports a worker's exit; the router reports a
worker that became ready and one that stopped answering heartbeats (the supervisor kills it). Typed like
the worker protocol (shared/protocol.py): a line that does not decode is a `LinkError`, logged and dropped.
"""

from __future__ import annotations

from typing import Annotated, Any, Generic, TypeAlias, TypeVar

import msgspec

WorkerIndex = Annotated[int, msgspec.Meta(ge=0)]


class LinkError(ValueError):
    """A line that is not one of the link's messages."""


class _LinkMessage(msgspec.Struct, tag_field="t", forbid_unknown_fields=True):
    worker: WorkerIndex


class WorkerExited(_LinkMessage, tag="worker_exited"):
    """Supervisor -> router: the worker process ended with `code` (its requests fail at once)."""

    code: int | None = None


class WorkerReady(_LinkMessage, tag="worker_ready"):
    """Router -> supervisor: the worker announced itself."""


class WorkerUnresponsive(_LinkMessage, tag="worker_unresponsive"):
    """Router -> supervisor: process `pid` of the worker stopped sending heartbeats."""

    pid: int = 0


ToRouter: TypeAlias = WorkerExited
ToSupervisor: TypeAlias = WorkerReady | WorkerUnresponsive

M = TypeVar("M")


class LinkCodec(Generic[M]):
    """One end's encoder (any link message, as a line) and decoder (what this end receives)."""

    def __init__(self, inbound: Any) -> None:
        self._encoder = msgspec.json.Encoder()
        self._decoder: msgspec.json.Decoder[M] = msgspec.json.Decoder(inbound)

    def encode(self, message: ToRouter | ToSupervisor) -> bytes:
        return self._encoder.encode(message) + b"\n"

    def decode(self, line: bytes) -> M:
        try:
            return self._decoder.decode(line)
        except msgspec.DecodeError as error:
            raise LinkError(str(error)) from error


def router_end() -> LinkCodec[ToRouter]:
    return LinkCodec(ToRouter)


def supervisor_end() -> LinkCodec[ToSupervisor]:
    return LinkCodec(ToSupervisor)
