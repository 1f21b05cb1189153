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
    # Predicted outputs (None: the request had no `prediction`): drafted tokens accepted / rejected.
    prediction: tuple[int, int] | None = None

    def to_openai(self) -> dict[str, object]:
        usage: dict[str, object] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }
        if self.prediction is not None:
            usage["completion_tokens_details"] = {
                "accepted_prediction_tokens": self.prediction[0],
                "rejected_prediction_tokens": self.prediction[1],
            }
        return usage


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
                if submit.prediction is not None and self.usage.prediction is None:
                    self.usage.prediction = (0, 0)
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
        ttft = self.metrics.ttft.labels(self.endpoint)  # looked up once, observed per token
        itl = self.metrics.itl.labels(self.endpoint)
        open_requests = {s.rid: s.n for s in self.submits}
        predictions: dict[str, tuple[int, int]] = {}
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
                        ttft.observe(now - started)
                    else:
                        itl.observe(now - last_token_at)
                    last_token_at = now
                delta = self._delta(choice, item)
                if item.cached_tokens is not None:
                    self.usage.cached_tokens += item.cached_tokens
                if item.media_tokens is not None:
                    self.usage.prompt_tokens += item.media_tokens
                if item.prediction_tokens is not None:  # running totals of this worker request
                    predictions[item.rid] = item.prediction_tokens
                    self.usage.prediction = (
                        sum(p[0] for p in predictions.values()),
                        sum(p[1] for p in predictions.values()),
                    )
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
        closed = item.finish == FINISH_BUDGET  # the worker ended the document within the budget
        pieces = list(texts) or [""]
        if item.finish is not None:
            pieces[-1] += choice.detokenizer.flush()
        # Token by token through the stop strings: an item can carry several tokens (verified drafts),
        # and what follows a stop string is dropped and not counted, exactly as if it had never been made.
        kept = len(item.token_ids)
        out: list[str] = []
        for index, piece in enumerate(pieces):
            out.append(choice.stopper.feed(piece))
            if choice.stopper.matched is not None:
                kept = min(kept, index + 1)
                break
        text = "".join(out)
        finish = FINISH_STOP if closed else item.finish
        matched = choice.stopper.matched is not None
        if matched:
            finish = FINISH_STOP
            closed = closed and kept == len(item.token_ids)  # a stop string ended it first otherwise
        elif finish is not None:
            text += choice.stopper.flush()
        if closed:
            self.metrics.budget_closed.labels(self.endpoint).inc()
        ended = (item.finish == FINISH_STOP or item.finish == FINISH_BUDGET) and not matched
        self.usage.completion_tokens += kept + (1 if ended else 0)
        logprobs = item.logprobs[:kept] if item.logprobs is not None else None
        return ChoiceDelta(
            choice.index, text, list(item.token_ids[:kept]), texts[:kept], logprobs, finish, closed
        )
