"""The JSON lines between `llamafleet serve` and its router (shared/link.py): typed; bad lines refused."""

from __future__ import annotations

import pytest

from shared import link


def test_supervisor_link_messages() -> None:
    """The JSON lines between `llamafleet serve` and its router (shared/link.py) are typed too."""
    to_router, to_supervisor = link.router_end(), link.supervisor_end()
    for message in (link.WorkerReady(2), link.WorkerUnresponsive(2, 77)):
        line = to_router.encode(message)
        assert line.endswith(b"\n") and to_supervisor.decode(line) == message
    exited = link.WorkerExited(1, -9)
    assert to_router.decode(to_supervisor.encode(exited)) == exited
    for bad in (
        b"{",
        b'{"t": "worker_exited"}',
        b'{"t": "worker_exited", "worker": "1"}',
        b'{"t": "x", "worker": 1}',
    ):
        with pytest.raises(link.LinkError):
            to_router.decode(bad)
    with pytest.raises(link.LinkError):  # the supervisor's own message is not for the supervisor
        to_supervisor.decode(to_supervisor.encode(exited))
