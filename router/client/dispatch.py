"""The router's ZeroMQ client: one ROUTER socket to send requests, one PULL socket for results.

A reader task demultiplexes `frames` by request id into per-request asyncio queues; a watchdog marks a
worker down when its heartbeats stop and fails its in-flight requests at once with a 503, so a client never
hangs on a dead worker, and asks the supervisor (if any) to kill and replace it. Workers announce themselves
with `ready`; a worker that sends heartbeats but is not known as ready (this router just restarted, or gave
up on it) gets a `hello` listing the requests still awaited from it, drops the rest and answers `ready`. The
supervisor (when the router runs under one) reports process exits through `mark_down`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import zmq
import zmq.asyncio
from zmq.auth.thread import ThreadAuthenticator

from router.client.routing import PrefixRouter
from router.client.zap import start_authenticator
from shared import curve, protocol
from shared.config import Config
from shared.ipc import IpcSockets
from shared.protocol import (
    AdapterReply,
    Cancel,
    EmbeddingsReply,
    EmbedRequest,
    Error,
    FrameItem,
    Frames,
    Hello,
    LoadAdapter,
    Ready,
    RouterMessage,
    Stats,
    SubmitRequest,
    UnloadAdapter,
    WorkerInfo,
    WorkerMessage,
    WorkerStats,
)

log = logging.getLogger(__name__)


class WorkerFailure(Exception):
    """A request's worker failed it (or died); carries the HTTP status and OpenAI error type."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message


@dataclass
class WorkerState:
    index: int
    pid: int = 0
    info: WorkerInfo | None = None  # from its `ready`
    up: bool = False
    last_seen: float = 0.0
    stats: WorkerStats = field(default_factory=WorkerStats)  # from its last heartbeat
    in_flight: set[str] = field(default_factory=set)
    # Several router processes share this worker: its heartbeats' counts (every router's requests, a
    # heartbeat old) count as well as this router's own requests.
    shared: bool = False
    # In-flight requests per named LoRA adapter: the router prefers a worker already running one.
    adapter_load: dict[str, int] = field(default_factory=dict)

    @property
    def load(self) -> int:
        if self.shared:
            return max(len(self.in_flight), self.stats.running_requests + self.stats.queued_requests)
        return len(self.in_flight)

    @property
    def slots(self) -> int:
        return self.info.n_seq_max if self.info is not None else 1


class Pending:
    """One submitted request the router awaits: its frame items (or a failure) queue up here for its HTTP
    handler. ("Stream" is kept for what a client gets with `stream: true`.)"""

    def __init__(
        self,
        rid: str,
        worker: int,
        queue: asyncio.Queue[FrameItem | WorkerFailure] | None = None,
        sequences: int = 1,
        lora: str = "",
    ) -> None:
        self.rid = rid
        self.worker = worker
        self.lora = lora
        self.sequences = sequences  # what admission charges it (see router/admission.py)
        # Several requests of one client call (one per prompt) may share a queue.
        self.queue: asyncio.Queue[FrameItem | WorkerFailure] = queue or asyncio.Queue()
        self.closed = False


class Dispatcher:
    """Owns the sockets and the table of in-flight requests."""

    def __init__(self, config: Config, router: int = 0) -> None:
        self.config = config
        # Router process `router` of `server.router_processes` binds its own worker sockets; with several,
        # workers also report their load to every router, which counts it (see WorkerState.shared).
        self.router_index = router
        self.shared_workers = config.server.router_processes > 1
        self.workers: dict[int, WorkerState] = {}
        self.pending: dict[str, Pending] = {}
        self._ids = itertools.count()
        self._ctx = zmq.asyncio.Context()
        self._requests: zmq.asyncio.Socket | None = None
        self._results: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._codec = protocol.router_codec()
        self.ready_event = asyncio.Event()
        self.router = PrefixRouter(enabled=config.workers.routing == "prefix")
        # Set by a supervisor link: a worker became ready; a worker stopped answering (index, pid).
        self.on_ready: Callable[[int], None] | None = None
        self.on_unresponsive: Callable[[int, int], None] | None = None
        self._hello_sent: dict[int, float] = {}
        # LoRA adapters loaded at run time (name -> path), sent to every worker that becomes ready; and
        # the load / unload replies awaited, by (worker, adapter name, op).
        self.runtime_adapters: Callable[[], dict[str, str]] = dict
        self._adapter_waiters: dict[tuple[int, str, str], asyncio.Future[AdapterReply]] = {}
        # Loaded here, so a missing or unsafe key file is a config error before anything starts.
        self._keys = curve.load_router_keys(config.workers.keys_dir) if config.workers.keys_dir else None
        self._authenticator: ThreadAuthenticator | None = None
        self._ipc = IpcSockets(
            [config.requests_endpoint(router), config.results_endpoint(router)], config.ipc_dir()
        )
        self._ipc.check()

    def _secure_sockets(self) -> None:
        """Private ipc folder; CURVE servers with an allow-list when keys are configured (before bind)."""
        self._ipc.prepare()
        for endpoint in self.config.insecure_network_endpoints():
            log.warning("workers.insecure_tcp: %s is neither authenticated nor encrypted", endpoint)
        if self._keys is not None:
            self._authenticator = start_authenticator(self._ctx, self._keys)
            for sock in (self._requests, self._results):
                assert sock is not None
                curve.secure_server(sock, self._keys)

    async def start(self) -> None:
        self._requests = self._ctx.socket(zmq.ROUTER)
        self._results = self._ctx.socket(zmq.PULL)
        self._secure_sockets()
        self._requests.setsockopt(zmq.LINGER, 0)
        self._requests.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # A restarted worker reconnects with its old routing id: hand the id over to the new peer.
        self._requests.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self._requests.bind(self.config.requests_endpoint(self.router_index))
        self._results.setsockopt(zmq.LINGER, 0)
        self._results.bind(self.config.results_endpoint(self.router_index))
        self._ipc.secure()
        self._tasks = [
            asyncio.create_task(self._read_results(), name="dispatch-reader"),
            asyncio.create_task(self._read_hellos(), name="dispatch-hellos"),
            asyncio.create_task(self._watchdog(), name="dispatch-watchdog"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for sock in (self._requests, self._results):
            if sock is not None:
                sock.close(0)
        if self._authenticator is not None:
            self._authenticator.stop()
        self._ctx.term()
        self._ipc.remove()

    # -- workers --------------------------------------------------------------------------------

    def up_workers(self) -> list[WorkerState]:
        # list() copies in one step: request preparation reads this from pool threads (offload.py).
        return [w for w in list(self.workers.values()) if w.up]

    def model_info(self) -> WorkerInfo | None:
        """The `info` of any ready worker (they all serve the same model); None while none is ready."""
        for worker in self.up_workers():
            return worker.info
        return None

    async def wait_ready(self, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while len(self.up_workers()) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.ready_event.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.ready_event.wait(), min(remaining, 0.5))
        return True

    def mark_down(self, index: int, reason: str) -> None:
        """Fails every request in flight on a dead worker with a 503."""
        worker = self.workers.get(index)
        if worker is None or not worker.up:
            return
        worker.up = False
        self.router.forget_worker(index)
        log.warning("worker %d is down: %s", index, reason)
        failure = WorkerFailure(503, "worker_unavailable", f"the worker serving this request {reason}")
        for rid in list(worker.in_flight):
            pending = self.pending.get(rid)
            if pending is not None:
                pending.queue.put_nowait(failure)
        worker.in_flight.clear()

    def fail_all(self, status: int, kind: str, message: str) -> None:
        """Ends every request in flight with a failure (the server is going away)."""
        failure = WorkerFailure(status, kind, message)
        for pending in list(self.pending.values()):
            pending.queue.put_nowait(failure)

    def pick_worker(self, prompt: list[int] | None = None, lora: str = "") -> WorkerState:
        """A worker already running the request's LoRA adapter, else the one most likely to hold the
        prompt's prefix, else the least-loaded ready one."""
        candidates = self.up_workers()
        if not candidates:
            raise WorkerFailure(503, "worker_unavailable", "no worker is ready to serve requests")
        if prompt is None:
            return min(candidates, key=lambda w: (w.load, w.index))
        chosen = self.router.choose(prompt, candidates, lora)
        assert isinstance(chosen, WorkerState)
        if not lora:  # the tree stands for base-model KV; adapter KV is steered by adapter affinity
            self.router.record(prompt, chosen.index)
        return chosen

    def capacity(self) -> int:
        """Sequences the ready workers can run at once."""
        return sum(w.slots for w in self.up_workers())

    def in_flight(self) -> int:
        return sum(len(w.in_flight) for w in self.workers.values())

    def in_flight_sequences(self) -> int:
        """Sequences of the requests in flight (a request with `n` choices holds `n`)."""
        total = 0
        for worker in self.workers.values():
            mine = 0
            for rid in worker.in_flight:
                pending = self.pending.get(rid)
                mine += pending.sequences if pending is not None else 1
            if worker.shared and worker.up:  # every router's sequences, as of the last heartbeat
                mine = max(mine, worker.stats.running_sequences + worker.stats.queued_requests)
            total += mine
        return total

    # -- requests -------------------------------------------------------------------------------

    def new_request_id(self, prefix: str = "req") -> str:
        return f"{prefix}-{next(self._ids)}-{time.monotonic_ns() % 1_000_000_007:x}"

    async def submit(
        self,
        request: SubmitRequest,
        queue: asyncio.Queue[FrameItem | WorkerFailure] | None = None,
    ) -> Pending:
        worker = self.pick_worker(request.prompt, request.lora)
        return await self._dispatch(worker, request.rid, request, queue, request.n, request.lora)

    async def _dispatch(
        self,
        worker: WorkerState,
        rid: str,
        message: RouterMessage,
        queue: asyncio.Queue[Any] | None,
        sequences: int = 1,
        lora: str = "",
    ) -> Pending:
        """Registers a request on `worker` (so its replies and failures reach `queue`), sends it."""
        pending = Pending(rid, worker.index, queue, sequences, lora)
        self.pending[rid] = pending
        worker.in_flight.add(rid)
        if lora:
            worker.adapter_load[lora] = worker.adapter_load.get(lora, 0) + 1
        await self._send(worker.index, message)
        return pending

    async def cancel(self, pending: Pending) -> None:
        """Forgets a request and tells its worker to free its sequences (no-op if already finished)."""
        if pending.closed:
            return
        self._forget(pending.rid)
        worker = self.workers.get(pending.worker)
        if worker is not None and worker.up:
            with contextlib.suppress(zmq.ZMQError):
                await self._send(pending.worker, Cancel(pending.rid))

    async def embed(self, request: EmbedRequest, sequences: int = 1) -> EmbeddingsReply:
        """Sends an embed request to the least-loaded worker and waits for its single reply.

        The reply arrives on the request's queue where frames would, so a worker's `error` message
        and a worker's death (`mark_down`) fail it exactly as they fail a generation.
        """
        queue: asyncio.Queue[Any] = asyncio.Queue()  # carries the EmbeddingsReply or a WorkerFailure
        pending = Pending(request.rid, -1, queue)
        answered = False
        try:
            worker = self.pick_worker()
            pending = await self._dispatch(worker, request.rid, request, queue, sequences)
            reply = await queue.get()
            answered = True
        finally:
            if answered:
                self.finish(pending)
            else:  # the client went away (or the send failed): let the worker drop it
                await self.cancel(pending)
        if isinstance(reply, WorkerFailure):
            raise reply
        assert isinstance(reply, EmbeddingsReply)
        return reply

    def finish(self, pending: Pending) -> None:
        """A request whose worker reported its end: just forget it."""
        self._forget(pending.rid)

    def _forget(self, rid: str) -> None:
        pending = self.pending.pop(rid, None)
        if pending is None:
            return
        pending.closed = True
        worker = self.workers.get(pending.worker)
        if worker is not None:
            worker.in_flight.discard(rid)
            if pending.lora and worker.adapter_load.get(pending.lora, 0) > 0:
                worker.adapter_load[pending.lora] -= 1
                if not worker.adapter_load[pending.lora]:
                    del worker.adapter_load[pending.lora]

    async def _send(self, index: int, message: RouterMessage) -> None:
        assert self._requests is not None
        try:
            payload = self._codec.encode(message)
        except (OverflowError, TypeError, ValueError) as error:  # e.g. an integer beyond 64 bits
            raise WorkerFailure(
                400, "invalid_request_error", f"a request value is out of range: {error}"
            ) from error
        try:
            await self._requests.send_multipart([protocol.worker_identity(index), payload])
        except zmq.ZMQError as error:  # EHOSTUNREACH: the worker is not connected
            self.mark_down(index, f"is unreachable ({error})")
            raise WorkerFailure(503, "worker_unavailable", "the worker is unreachable") from error

    # -- background tasks -----------------------------------------------------------------------

    async def _read_results(self) -> None:
        """One await per burst, not per message: what else arrived meanwhile is read without waiting."""
        results = self._results
        assert results is not None
        while True:
            self.receive(await results.recv())
            for _ in range(256):  # then let the handlers run
                try:  # with NOBLOCK the future is already resolved
                    payload = cast("asyncio.Future[bytes]", results.recv(zmq.NOBLOCK)).result()
                except zmq.Again:
                    break
                self.receive(payload)

    async def _read_hellos(self) -> None:
        """Workers announce `ready` on their DEALER: once it arrives here, the ROUTER can route to them."""
        assert self._requests is not None
        while True:
            _identity, payload = await self._requests.recv_multipart()
            self.receive(payload)

    def receive(self, payload: bytes) -> None:
        """Handles one payload from a worker; a bad one (another version, unknown tag, mistyped fields) is
        logged and dropped, and nothing it carries can stop the reader."""
        try:
            message = self._codec.decode(payload)
        except protocol.ProtocolError as error:
            log.error("dropping a bad message from a worker: %s", error)
            return
        try:
            self._handle(message)
        except Exception:  # a bug: one message must not stop the reader
            log.exception("dropping a message that could not be handled: %.200r", message)

    def _handle(self, message: WorkerMessage) -> None:
        if isinstance(message, Frames):
            for item in message.items:
                pending = self.pending.get(item.rid)
                if pending is not None:
                    pending.queue.put_nowait(item)
            return
        if isinstance(message, EmbeddingsReply):
            embed_pending = self.pending.get(message.rid)
            if embed_pending is not None:
                reply_queue: asyncio.Queue[Any] = embed_pending.queue  # see `embed`
                reply_queue.put_nowait(message)
            return
        if isinstance(message, Error):
            pending = self.pending.get(message.rid)
            if pending is not None:
                pending.queue.put_nowait(WorkerFailure(message.status, message.kind, message.message))
            return
        if isinstance(message, AdapterReply):
            waiter = self._adapter_waiters.pop((message.worker, message.name, message.op), None)
            if waiter is not None and not waiter.done():
                waiter.set_result(message)
            return
        worker = self.workers.setdefault(
            message.worker, WorkerState(message.worker, shared=self.shared_workers)
        )
        worker.last_seen = time.monotonic()
        if isinstance(message, Ready):
            if not (worker.up and worker.pid == message.pid):
                log.info("worker %d ready (pid %d)", worker.index, message.pid)
            worker.pid = message.pid
            worker.info = message.info
            self._send_runtime_adapters(worker.index)  # queued ahead of any request routed to it
            worker.up = True
            self.ready_event.set()
            if self.on_ready is not None:
                self.on_ready(worker.index)
        elif isinstance(message, Stats):
            if worker.up and worker.pid and message.pid != worker.pid:
                return  # a late heartbeat from a previous process of this index
            worker.stats = message.counters

    def _send_runtime_adapters(self, index: int) -> None:
        """A (re)started worker loads the adapters loaded at run time (its replies need no waiter)."""
        if self._requests is None:
            return
        for name, path in self.runtime_adapters().items():
            payload = self._codec.encode(LoadAdapter(name, path))
            with contextlib.suppress(zmq.ZMQError):
                self._requests.send_multipart([protocol.worker_identity(index), payload])

    async def adapter_broadcast(
        self, message: LoadAdapter | UnloadAdapter, timeout: float
    ) -> dict[int, AdapterReply | None]:
        """Sends a load / unload to every ready worker; each one's reply, None where none came in time."""
        op = "load" if isinstance(message, LoadAdapter) else "unload"
        loop = asyncio.get_running_loop()
        waiters: dict[int, asyncio.Future[AdapterReply]] = {}
        for worker in self.up_workers():
            future: asyncio.Future[AdapterReply] = loop.create_future()
            self._adapter_waiters[(worker.index, message.name, op)] = future
            waiters[worker.index] = future
            try:
                await self._send(worker.index, message)
            except WorkerFailure:
                future.cancel()
        replies: dict[int, AdapterReply | None] = {}
        for index, future in waiters.items():
            replies[index] = None
            try:
                if not future.cancelled():  # cancelled: the send failed (the worker is down)
                    replies[index] = await asyncio.wait_for(future, timeout)
            except TimeoutError:
                pass
            finally:
                self._adapter_waiters.pop((index, message.name, op), None)
        return replies

    async def _watchdog(self) -> None:
        timeout = self.config.workers.heartbeat_timeout_seconds
        interval = min(self.config.workers.heartbeat_interval_seconds, 0.25)
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for worker in list(self.workers.values()):
                if worker.up and now - worker.last_seen > timeout:
                    self.mark_down(worker.index, f"stopped sending heartbeats for {timeout:.1f}s")
                    if self.on_unresponsive is not None:
                        self.on_unresponsive(worker.index, worker.pid)
                elif not worker.up and now - worker.last_seen < timeout:
                    await self._hello(worker, now)

    async def _hello(self, worker: WorkerState, now: float) -> None:
        """A worker that beats but is not ready here: ask it to drop what we no longer await and re-join."""
        if now - self._hello_sent.get(worker.index, 0.0) < 0.5:
            return
        self._hello_sent[worker.index] = now
        assert self._requests is not None
        payload = self._codec.encode(Hello(sorted(worker.in_flight)))
        with contextlib.suppress(zmq.ZMQError):  # not connected (yet): the next beat tries again
            await self._requests.send_multipart([protocol.worker_identity(worker.index), payload])
