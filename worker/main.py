"""The worker process: one engine, one socket loop, a heartbeat thread.

The main thread owns the DEALER (requests in) and a PUSH (results out) and alternates between draining the
socket without blocking and running one engine step. A second thread with its own PUSH socket sends `stats`
heartbeats, so the router hears from a worker even while a long llama_decode holds the main thread (ctypes
releases the GIL during foreign calls).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import msgspec
import zmq

from shared import curve, gpu, protocol
from shared.config import Config
from shared.ipc import check_worker_endpoints
from shared.lora import resolve_lora_path
from shared.models import resolve_model_path
from worker.adapters import AdapterLoadError, AdapterStore
from worker.disk_tier import DiskTier
from worker.embeddings import EmbeddingService
from worker.engine import LlamaEngine
from worker.media_setup import load_media, submit_with_media
from worker.runner import build_scheduler
from worker.scheduler import RequestRejected
from worker.speculative.setup import build_speculation

log = logging.getLogger(__name__)

_EMBED_ONLY = "this is an embedding model: it serves /v1/embeddings only"


class Heartbeat(threading.Thread):
    """Sends a stats heartbeat every interval until stopped.

    The engine loop only keeps its counters current; this thread encodes them (holding the GIL, so one
    consistent snapshot) four times a second rather than after every step. It has its own codec."""

    def __init__(
        self,
        context: zmq.Context[Any],
        endpoints: list[str],
        index: int,
        interval: float,
        counters: Callable[[], protocol.WorkerStats],
        keys: curve.WorkerKeys | None = None,
    ) -> None:
        super().__init__(name="heartbeat", daemon=True)
        self._sockets = []  # one per router process: each hears every beat
        for endpoint in endpoints:
            sock = context.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 10)
            curve.secure_client(sock, keys)
            sock.connect(endpoint)
            self._sockets.append(sock)
        self._index = index
        self._interval = interval
        self._stop_event = threading.Event()
        self._counters = counters
        self._codec = protocol.worker_codec()

    def run(self) -> None:
        while not self._stop_event.wait(self._interval):
            beat = protocol.Stats(worker=self._index, pid=os.getpid(), counters=self._counters())
            payload = self._codec.encode(beat)
            for sock in self._sockets:
                with contextlib.suppress(zmq.Again):  # the router is gone or slow: skip this beat
                    sock.send(payload, zmq.NOBLOCK)
        for sock in self._sockets:
            sock.close()

    def stop(self) -> None:
        self._stop_event.set()


class WorkerProcess:
    def __init__(self, config: Config, index: int) -> None:
        self.config = config
        self.index = index
        self.stopping = False
        self.codec = protocol.worker_codec()
        # A GPU config on a build that cannot offload: a config error before anything starts.
        gpu.check_offload(config.model, config.workers.override_for(index), f"worker {index}")
        # CURVE keys (a config error if missing) and a private ipc folder, before any socket exists.
        keys = curve.load_worker_keys(config.workers.keys_dir, index) if config.workers.keys_dir else None
        routers = config.router_endpoints()
        check_worker_endpoints([endpoint for pair in routers for endpoint in pair])
        for endpoint in config.insecure_network_endpoints():
            log.warning("workers.insecure_tcp: %s is neither authenticated nor encrypted", endpoint)
        self.zmq = zmq.Context()
        # One DEALER (requests in, `ready` out) and one PUSH (results out) per router process
        # (`server.router_processes`); a request's results go back to the router it came from.
        self.dealers: list[zmq.Socket[bytes]] = []
        self.pushes: list[zmq.Socket[bytes]] = []
        self.owner: dict[str, int] = {}  # request id -> router index, with several routers
        self._source = 0  # the router whose message is being handled
        for _ in routers:
            dealer = self.zmq.socket(zmq.DEALER)
            dealer.setsockopt(zmq.ROUTING_ID, protocol.worker_identity(index))
            dealer.setsockopt(zmq.LINGER, 0)
            # Queue nothing to a connection that is not up yet (with CURVE: whose handshake has not
            # passed), so `ready` waits for a router that accepted us, and a refused key is seen before
            # `ready` is sent.
            dealer.setsockopt(zmq.IMMEDIATE, 1)
            curve.secure_client(dealer, keys)
            self.dealers.append(dealer)
            push = self.zmq.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 2000)
            curve.secure_client(push, keys)
            self.pushes.append(push)
        self.requests = self.dealers[0]
        self.results = self.pushes[0]
        self.handshake = None
        if keys is not None and config.workers.keys_dir:
            self.handshake = curve.HandshakeWatch(
                self.requests,
                config.requests_endpoint(),
                config.workers.keys_dir,
                curve.worker_key_name(index),
            )
        for (requests_endpoint, results_endpoint), dealer, push in zip(
            routers, self.dealers, self.pushes, strict=True
        ):
            dealer.connect(requests_endpoint)
            push.connect(results_endpoint)
        self.heartbeat = Heartbeat(
            self.zmq,
            [results for _, results in routers],
            index,
            config.workers.heartbeat_interval_seconds,
            lambda: self.scheduler.stats,
            keys,
        )

    def send(self, message: protocol.WorkerMessage) -> None:
        if len(self.pushes) == 1:
            self.results.send(self.codec.encode(message))
        elif isinstance(message, protocol.Frames):  # split by the router each request came from
            groups: dict[int, list[protocol.FrameItem]] = {}
            for item in message.items:
                groups.setdefault(self.owner.get(item.rid, 0), []).append(item)
            for router, items in groups.items():
                self.pushes[router].send(self.codec.encode(protocol.Frames(items)))
        else:
            rid = getattr(message, "rid", "")
            self.pushes[self.owner.get(rid, 0)].send(self.codec.encode(message))

    def _note_owner(self, message: protocol.RouterMessage) -> None:
        """With several routers: remember where a request came from (pruned of finished ones now and then)."""
        if len(self.dealers) == 1 or not isinstance(message, (protocol.SubmitRequest, protocol.EmbedRequest)):
            return
        if len(self.owner) >= 4096:
            held = set(self._held_requests())
            self.owner = {rid: r for rid, r in self.owner.items() if rid in held}
        self.owner[message.rid] = self._source

    def _held_requests(self) -> list[str]:
        return self.scheduler.request_ids() + self.embeddings.request_ids()

    def run(self) -> None:
        override = self.config.workers.override_for(self.index)
        model_path = resolve_model_path(self.config.model)
        self.engine = LlamaEngine(self.config.model, model_path, override)
        info = self.engine.info
        log.info(
            "worker %d runs on %s: devices %s; offloaded %d/%d layers to GPU",
            self.index,
            info.backend,
            ", ".join(info.devices) or "none",
            info.offloaded_layers,
            info.n_layer + 1,
        )
        self.adapters = self._load_adapters()
        disk = None
        if self.config.disk_cache is not None and not self.engine.embedding:
            try:
                identity = [f"{a.path}:{a.path.stat().st_size}:{a.scale}" for a in self.adapters.always]
                disk = DiskTier(self.engine, self.config.disk_cache, model_path, identity)
            except OSError as error:  # e.g. a folder that cannot be created: serve without the disk tier
                log.warning("disk cache disabled: %s", error)
        self.media = load_media(self.config.model, self.engine, override)
        speculation = build_speculation(self.config.model, self.engine)
        self.scheduler = build_scheduler(
            self.engine, disk=disk, media=self.media, speculation=speculation, adapters=self.adapters
        )
        self.scheduler.stats.adapters_loaded = self.adapters.count
        self.pending_unloads: list[str] = []
        self.embeddings = EmbeddingService.for_engine(self.engine, self.config.model, override)
        self.heartbeat.start()
        try:
            self._announce_first()
            self._loop()
        finally:
            self.heartbeat.stop()
            self.embeddings.close()
            self.scheduler.close()
            if self.media is not None:
                self.media.close()
            self.adapters.close()
            self.engine.close()
            for sock in (*self.dealers, *self.pushes):
                sock.close()
            self.zmq.term()

    def _load_adapters(self) -> AdapterStore:
        """The config's LoRA adapters: unnamed ones applied to everything, named ones on request. One that
        does not fit the model stops the worker with an error naming the file and the entry."""
        arch = str(self.engine.vocab.metadata("general.architecture") or "")
        store = AdapterStore(self.engine.model, self.engine.ctx, arch)
        for index, lora in enumerate(self.config.model.loras):
            path = resolve_lora_path(lora)
            try:
                if lora.name is None:
                    store.add_always(path, lora.scale)
                else:
                    store.load(lora.name, path, lora.scale)
            except AdapterLoadError as error:
                store.close()
                raise AdapterLoadError(f"model.loras[{index}]: {error}") from error
            log.info(
                "LoRA adapter %s loaded from %s (scale %s)", lora.name or "(always on)", path, lora.scale
            )
        return store

    def _ready_message(self) -> bytes:
        """`ready` goes over the DEALER: when the router receives it there, it can route requests back."""
        info = protocol.WorkerInfo(**msgspec.structs.asdict(self.engine.info), embed=self.embeddings.info())
        return self.codec.encode(protocol.Ready(worker=self.index, pid=os.getpid(), info=info))

    def _description(self) -> object:
        return self.engine.info

    def _announce_first(self) -> None:
        """Sends `ready` once the DEALER has a router to send to, staying stoppable meanwhile.

        A plain send would block (beyond SIGTERM's reach) while no router accepts the connection, e.g.
        while the router refuses this worker's CURVE key."""
        ready = self._ready_message()
        try:
            while not self.stopping:
                if self.handshake is not None:
                    self.handshake.check()  # raises when the router refused our key
                if self.requests.poll(100, zmq.POLLOUT):
                    self.requests.send(ready, zmq.NOBLOCK)
                    for other in self.dealers[1:]:  # routers not up yet ask with `hello` later
                        with contextlib.suppress(zmq.Again):
                            other.send(ready, zmq.NOBLOCK)
                    log.info("worker %d ready: %s", self.index, self._description())
                    return
        finally:
            if self.handshake is not None:  # its monitor socket would keep zmq.term() waiting
                self.handshake.close()
                self.handshake = None

    def _hello(self, live: set[str]) -> None:
        """A router (re)started, or gave up on this worker for a while: drop what nobody waits for."""
        dropped = [rid for rid in self._held_requests() if rid not in live and self._owned_here(rid)]
        for rid in dropped:
            if not self.scheduler.cancel(rid):
                self.embeddings.cancel(rid)
        if dropped:
            log.warning(
                "worker %d dropped %d requests the router no longer waits for", self.index, len(dropped)
            )
        with contextlib.suppress(zmq.Again):  # the router that asked is gone again: its successor asks
            self.dealers[self._source].send(self._ready_message(), zmq.NOBLOCK)

    def _owned_here(self, rid: str) -> bool:
        """Whether request `rid` came from the router whose message is being handled."""
        return self.owner.get(rid, 0) == self._source

    def _loop(self) -> None:
        poller = zmq.Poller()
        for dealer in self.dealers:
            poller.register(dealer, zmq.POLLIN)
        while True:
            if self.scheduler.idle and not self.embeddings.pending:
                if self.stopping:
                    return
                poller.poll(50)
            self._drain()
            for reply in self.embeddings.run():  # between steps: never inside a generation's decode
                self.send(reply)
            result = self.scheduler.step()
            if result.items:
                self.send(protocol.Frames(result.items))
            for error in result.errors:
                self.send(error)
            if self.pending_unloads:
                self._finish_unloads()

    def _drain(self) -> None:
        for router, dealer in enumerate(self.dealers):
            self._source = router
            self._drain_one(dealer)
        self._source = 0

    def _drain_one(self, dealer: zmq.Socket[bytes]) -> None:
        while True:
            try:
                payload = dealer.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                message = self.codec.decode(payload)
            except protocol.ProtocolError as error:  # another version, unknown tag, mistyped fields
                log.error("dropping a bad message: %s", error)
                continue
            try:
                self._note_owner(message)
                self._handle(message)
            except Exception:  # a bug must not end the worker (every field is typed by now)
                log.exception("dropping a message that could not be handled: %.200r", message)

    def _handle(self, message: protocol.RouterMessage) -> None:
        if isinstance(message, protocol.SubmitRequest):
            rid = message.rid
            if self.stopping:
                self.send(protocol.Error(rid, 503, "unavailable", "worker is draining"))
                return
            if self.engine.embedding:
                self.send(protocol.Error(rid, 400, "invalid_request_error", _EMBED_ONLY))
                return
            if message.lora and (not self.adapters.has(message.lora) or message.lora in self.pending_unloads):
                text = f"the LoRA adapter {message.lora!r} is not loaded on this worker"
                self.send(protocol.Error(rid, 404, "not_found_error", text))
                return
            try:
                submit_with_media(self.scheduler, self.media, message, self.engine.info.n_ctx_seq)
            except RequestRejected as error:
                self.send(protocol.Error(rid, error.status, error.kind, str(error)))
        elif isinstance(message, protocol.EmbedRequest):
            refusal = self.embeddings.submit(message, self.stopping)
            if refusal is not None:
                self.send(refusal)
        elif isinstance(message, protocol.LoadAdapter):
            self._load_adapter(message)
        elif isinstance(message, protocol.UnloadAdapter):
            if message.name not in self.pending_unloads:
                self.pending_unloads.append(message.name)
            self._finish_unloads()
        elif isinstance(message, protocol.Cancel):
            if not self.scheduler.cancel(message.rid):
                self.embeddings.cancel(message.rid)
        else:
            self._hello(set(message.live))

    def _load_adapter(self, message: protocol.LoadAdapter) -> None:
        ok, text = True, ""
        try:
            self.adapters.load(message.name, Path(message.path))
            if message.name in self.pending_unloads:
                self.pending_unloads.remove(message.name)
            log.info("LoRA adapter %s loaded from %s", message.name, message.path)
        except AdapterLoadError as error:
            ok, text = False, str(error)
        self.scheduler.stats.adapters_loaded = self.adapters.count
        self.send(protocol.AdapterReply(self.index, message.name, "load", ok, text))

    def _finish_unloads(self) -> None:
        """Frees adapters asked to unload once no request waiting or running uses them."""
        for name in [n for n in self.pending_unloads if not self.scheduler.uses_adapter(n)]:
            self.pending_unloads.remove(name)
            found = self.adapters.unload(name)
            self.scheduler.stats.adapters_loaded = self.adapters.count
            text = "" if found else f"no adapter named {name!r} is loaded"
            self.send(protocol.AdapterReply(self.index, name, "unload", found, text))

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        del signum, frame
        self.stopping = True


def run_worker(config: Config, index: int) -> int:
    """Entry point of `llamafleet worker`: serves until SIGTERM (drains) or a shutdown message."""
    worker = WorkerProcess(config, index)
    signal.signal(signal.SIGTERM, worker.request_stop)
    signal.signal(signal.SIGINT, worker.request_stop)
    started = time.monotonic()
    worker.run()
    log.info("worker %d stopped after %.1fs", index, time.monotonic() - started)
    return 0
