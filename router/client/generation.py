"""Drives one client request's generation: submit to a worker, turn frame items into text events.

Completions with several prompts submit one worker request per prompt; all of them feed one queue, so a
handler sees a single ordered sequence of `ChoiceDelta` events. Leaving the iterator early (client gone,
stop string matched, error) cancels whatever is still running on the worker, which frees its sequences.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from router.api.metrics import Metrics
from router.client.detokenizer import IncrementalDetokenizer, StopMatcher
from router.client.dispatch import Dispatcher, Pending, WorkerFailure
from shared.protocol import FINISH_BUDGET, FINISH_STOP, FrameItem, SubmitRequest, TokenLogprob
from shared.vocab import Vocab


@dataclass
class ChoiceDelta:
    """New output of one choice: text, the tokens behind it, per-token logprobs, and a finish reason."""

    index: int
    text: str
    token_ids: list[int]
    token_texts: list[str]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None = None
    budget_closed: bool = False  # the worker steered this choice onto a complete document (budget)


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def to_openai(self) -> dict[str, object]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


@dataclass
class _Choice:
    index: int
    detokenizer: IncrementalDetokenizer
    stopper: StopMatcher
    finished: bool = False


@dataclass
class Generation:
    """A set of worker requests answering one HTTP request (one per prompt)."""

    dispatcher: Dispatcher
    vocab: Vocab
    metrics: Metrics
    submits: list[SubmitRequest]
    stops: list[str]
    endpoint: str
    render_special: bool = False  # control tokens as text, for output parsers that need markers
    usage: Usage = field(default_factory=Usage)
    _pending: list[Pending] = field(default_factory=list)
    _queue: asyncio.Queue[FrameItem | WorkerFailure] = field(default_factory=asyncio.Queue)

    async def start(self) -> None:
        """Submits every prompt; raises WorkerFailure if no worker can take them."""
        try:
            for submit in self.submits:
                pending = await self.dispatcher.submit(submit, self._queue)
                self._pending.append(pending)
                self.usage.prompt_tokens += len(submit.prompt)
        except BaseException:
            await self.cancel()
            raise

    async def cancel(self) -> None:
        for pending in self._pending:
            await self.dispatcher.cancel(pending)

    async def events(self) -> AsyncIterator[ChoiceDelta]:
        started = time.monotonic()
        last_token_at: float | None = None
        offsets = {s.rid: i * s.n for i, s in enumerate(self.submits)}
        choices: dict[tuple[str, int], _Choice] = {}
        for submit in self.submits:
            for c in range(submit.n):
                choices[(submit.rid, c)] = _Choice(
                    offsets[submit.rid] + c,
                    IncrementalDetokenizer(self.vocab, self.render_special),
                    StopMatcher(self.stops),
                )
        open_requests = {s.rid: s.n for s in self.submits}
        by_rid = {s.rid: s for s in self._pending}
        try:
            while open_requests:
                item = await self._queue.get()
                if isinstance(item, WorkerFailure):
                    raise item
                if item.rid not in open_requests:
                    continue  # late item of a request we already closed
                choice = choices[(item.rid, item.choice)]
                if choice.finished:
                    continue
                now = time.monotonic()
                if item.token_ids:
                    if last_token_at is None:
                        self.metrics.ttft.labels(self.endpoint).observe(now - started)
                    else:
                        self.metrics.itl.labels(self.endpoint).observe(now - last_token_at)
                    last_token_at = now
                delta = self._delta(choice, item)
                if item.cached_tokens is not None:
                    self.usage.cached_tokens += item.cached_tokens
                if delta.finish_reason is not None:
                    choice.finished = True
                    open_requests[item.rid] -= 1
                    if open_requests[item.rid] == 0:
                        del open_requests[item.rid]
                        pending = by_rid[item.rid]
                        if item.finish is None:  # stopped here (stop string): free the worker's sequences
                            await self.dispatcher.cancel(pending)
                        else:
                            self.dispatcher.finish(pending)
                if delta.text or delta.token_ids or delta.finish_reason:
                    yield delta
        finally:
            await self.cancel()

    def _delta(self, choice: _Choice, item: FrameItem) -> ChoiceDelta:
        texts: list[str] = []
        for token in item.token_ids:
            texts.append(choice.detokenizer.feed(token))
        closed = item.finish == FINISH_BUDGET
        finish = FINISH_STOP if closed else item.finish
        if closed:
            self.metrics.budget_closed.labels(self.endpoint).inc()
        self.usage.completion_tokens += len(item.token_ids) + (1 if finish == FINISH_STOP else 0)
        raw = "".join(texts)
        if item.finish is not None:
            raw += choice.detokenizer.flush()
        text = choice.stopper.feed(raw)
        if choice.stopper.matched is not None:
            finish = FINISH_STOP
        elif finish is not None:
            text += choice.stopper.flush()
        return ChoiceDelta(choice.index, text, list(item.token_ids), texts, item.logprobs, finish, closed)
