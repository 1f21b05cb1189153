"""The simulated worker's engine: slots, a waiting queue and a step clock, with no model.

It answers each request with its `max_tokens` tokens (or `simulate.max_tokens` when the router asked for
the whole context because the client set none) at `ttft_ms` then `itl_ms` per token, as a continuous-batching
engine would: every running sequence advances on one shared step clock, so one `frames` message per step
carries them all. Token ids are real ids of the model's vocabulary that render to printable ASCII, so the
router detokenizes them as it would a model's output. Time is passed in, so tests can drive it.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

from shared.config import SimulateOptions
from shared.protocol import (
    FINISH_LENGTH,
    FINISH_STOP,
    Error,
    FrameItem,
    SubmitRequest,
    TokenLogprob,
    WorkerStats,
)


@dataclass
class _Sequence:
    choice: int
    emitted: int = 0
    finished: bool = False


@dataclass
class _Request:
    submit: SubmitRequest
    tokens: int  # what each choice answers
    finish: str  # how it ends once `tokens` are out
    first_at: float = 0.0  # when its first token is due (set when it gets slots)
    fails: bool = False
    sequences: list[_Sequence] = field(default_factory=list)


@dataclass
class SimStep:
    items: list[FrameItem] = field(default_factory=list)
    errors: list[Error] = field(default_factory=list)


class SimulatedScheduler:
    """Admission into `slots` sequences (a request with `n` choices takes `n`), FIFO beyond; cancel frees
    at once. `step(now)` emits one token for every sequence due by `now`."""

    def __init__(self, options: SimulateOptions, text_tokens: list[int], n_ctx_seq: int) -> None:
        if not text_tokens:
            raise ValueError("the vocabulary has no printable tokens to simulate output with")
        self.options = options
        self.slots = options.slots
        self.n_ctx_seq = n_ctx_seq
        self._tokens = text_tokens
        self._ttft = options.ttft_ms / 1000.0
        self._itl = options.itl_ms / 1000.0
        self._random = random.Random(options.seed)
        self.waiting: deque[_Request] = deque()
        self.running: dict[str, _Request] = {}
        self.used = 0
        self.next_step = 0.0
        self.stats = WorkerStats(seq_ids_free=options.slots)

    # -- requests ---------------------------------------------------------------------------------

    def submit(self, submit: SubmitRequest) -> Error | None:
        """Queues a request; an Error for one that can never run (more choices than slots, duplicate)."""
        if submit.n > self.slots:
            return Error(submit.rid, 400, "invalid_request_error", f"n={submit.n} exceeds {self.slots} slots")
        if submit.rid in self.running or any(r.submit.rid == submit.rid for r in self.waiting):
            return Error(submit.rid, 400, "invalid_request_error", f"duplicate request id {submit.rid}")
        asked_whole_context = submit.max_tokens >= self.n_ctx_seq - len(submit.prompt)
        if asked_whole_context and submit.max_tokens > self.options.max_tokens:
            tokens, finish = self.options.max_tokens, FINISH_STOP
        else:
            tokens, finish = submit.max_tokens, FINISH_LENGTH
        self.waiting.append(_Request(submit, tokens, finish))
        self._count()
        return None

    def cancel(self, rid: str) -> bool:
        for request in self.waiting:
            if request.submit.rid == rid:
                self.waiting.remove(request)
                self._count()
                return True
        running = self.running.pop(rid, None)
        if running is None:
            return False
        self._release(running)
        return True

    def request_ids(self) -> list[str]:
        return [*self.running, *(r.submit.rid for r in self.waiting)]

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting

    # -- the clock ----------------------------------------------------------------------------------

    def next_due(self) -> float | None:
        """When `step` next has something to do (None: nothing running)."""
        if not self.running:
            return None
        first = min(r.first_at for r in self.running.values())
        return max(self.next_step, first - self._itl / 2)

    def admit(self, now: float) -> None:
        while self.waiting and self.used + self.waiting[0].submit.n <= self.slots:
            request = self.waiting.popleft()
            request.first_at = now + self._ttft
            request.fails = self._random.random() < self.options.failure_rate
            request.sequences = [_Sequence(c) for c in range(request.submit.n)]
            self.used += request.submit.n
            self.stats.prompt_tokens_total += len(request.submit.prompt)
            self.running[request.submit.rid] = request
            if len(self.running) == 1:
                self.next_step = request.first_at  # an idle engine starts a new step clock
        self._count()

    def step(self, now: float) -> SimStep:
        """Advances every sequence that is due (within half a step: joining the nearest step)."""
        out = SimStep()
        if now < self.next_step:
            return out
        horizon = now + self._itl / 2
        for rid, request in list(self.running.items()):
            if request.first_at > horizon:
                continue
            if request.fails:
                del self.running[rid]
                self._release(request)
                self.stats.requests_failed_total += 1
                out.errors.append(Error(rid, 500, "server_error", "simulated worker failure"))
                continue
            for sequence in request.sequences:
                out.items.append(self._advance(request, sequence))
            if all(s.finished for s in request.sequences):
                del self.running[rid]
                self._release(request)
        if out.items:
            last = {item.rid: i for i, item in enumerate(out.items) if item.finish is not None}
            for rid, index in last.items():
                if rid not in self.running:  # the request's last item carries its cache report
                    item = out.items[index]
                    out.items[index] = FrameItem(
                        item.rid, item.choice, item.token_ids, item.logprobs, item.finish, 0
                    )
            self.stats.steps_total += 1
        # The next step: one itl on, unless the engine fell behind (then start again from now).
        self.next_step = max(self.next_step + self._itl, now)
        return out

    def _advance(self, request: _Request, sequence: _Sequence) -> FrameItem:
        k = sequence.emitted
        token = self._tokens[
            (k * 31 + sequence.choice * 7919 + len(request.submit.prompt)) % len(self._tokens)
        ]
        sequence.emitted += 1
        self.stats.generated_tokens_total += 1
        finish = None
        if sequence.emitted >= request.tokens:
            sequence.finished = True
            finish = request.finish
        logprobs = None
        if request.submit.logprobs is not None:
            top = [(token, -0.5)] + [
                (self._tokens[(k + j) % len(self._tokens)], -1.0 - j)
                for j in range(1, request.submit.logprobs)
            ]
            logprobs = [TokenLogprob(-0.5, top[: request.submit.logprobs])]
        return FrameItem(request.submit.rid, sequence.choice, [token], logprobs, finish)

    def _release(self, request: _Request) -> None:
        if request.sequences:
            self.used -= request.submit.n
        self._count()

    def _count(self) -> None:
        stats = self.stats
        stats.running_requests = len(self.running)
        stats.running_sequences = self.used
        stats.queued_requests = len(self.waiting)
        stats.seq_ids_free = self.slots - self.used
