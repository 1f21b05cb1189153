"""Admission control: the queue limit counts sequences (prompts x `n`), not HTTP calls.

The budget is what the ready workers can run at once (the sum of their `n_seq_max`) plus
`server.max_queued_requests`. A call is charged the sequences it will hold: a completion `len(prompts) * n`,
a chat completion `n`, a Responses call 1, an embeddings call as many inputs as a worker embeds at once.
A call that alone exceeds the whole budget can never succeed and is a 400 naming the field; one that fits
but not now is a 429. Between the check and the worker submit (request preparation may wait on a thread)
the call holds a reservation, so concurrent calls cannot all pass the same check.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from router.api.errors import APIError
from router.api.metrics import Metrics
from router.client.dispatch import Dispatcher


class Admission:
    def __init__(self, dispatcher: Dispatcher, max_queued: int, metrics: Metrics) -> None:
        self.dispatcher = dispatcher
        self.max_queued = max_queued
        self.metrics = metrics
        self.reserved = 0  # sequences of calls admitted but not yet submitted to a worker

    def _largest_budget(self) -> int | None:
        """The budget with every known worker up; None before any worker said what it holds."""
        known = [w for w in self.dispatcher.workers.values() if w.info is not None]
        if not known:
            return None
        return sum(w.slots for w in known) + self.max_queued

    @contextlib.contextmanager
    def reserve(self, sequences: int, param: str) -> Iterator[None]:
        """Admits a call of `sequences` sequences until the block ends (by then it was submitted)."""
        largest = self._largest_budget()
        if largest is not None and sequences > largest:
            self.metrics.rejected.labels("too_many_sequences").inc()
            raise APIError(
                400,
                f"this request needs {sequences} sequences (prompts x n) but the server runs and queues at "
                f"most {largest}; send fewer prompts or a smaller n",
                param=param,
                code="too_many_sequences",
            )
        budget = self.dispatcher.capacity() + self.max_queued
        if self.dispatcher.in_flight_sequences() + self.reserved + sequences > budget:
            self.metrics.rejected.labels("queue_full").inc()
            raise APIError(
                429,
                "too many requests are queued; retry later",
                "rate_limit_error",
                code="queue_full",
            )
        self.reserved += sequences
        try:
            yield
        finally:
            self.reserved -= sequences
