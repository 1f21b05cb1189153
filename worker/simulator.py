"""`workers.simulate`: a worker process that speaks the real protocol with no model behind it.

Like llm-d's inference simulator, it lets routing, admission, back-pressure and the router's own CPU cost be
tested and measured at scale on a machine with no GPU: the router still templates and tokenizes with the
config's model (only its vocabulary is read here, for the ids the simulator answers with), while the
worker's sockets, handshake (`ready`, `hello`), heartbeats, cancel and draining are those of worker/main.py.
Its engine is worker/sim_scheduler.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import IO

import zmq

from shared import protocol
from shared.config import Config, SimulateOptions
from shared.models import resolve_model_path
from shared.vocab import Vocab
from worker.main import WorkerProcess
from worker.sim_scheduler import SimulatedScheduler

log = logging.getLogger(__name__)

_NO_EMBEDDINGS = "a simulated worker serves no embeddings"
_DEFAULT_N_CTX = 4096


def text_tokens(vocab: Vocab, limit: int = 4096) -> list[int]:
    """Up to `limit` ids whose pieces are printable ASCII: output that detokenizes one token to one piece."""
    tokens: list[int] = []
    for token in range(vocab.n_vocab):
        if token in vocab.eog_ids:
            continue
        piece = vocab.piece(token)
        if piece and piece.isascii() and piece.decode().isprintable():
            tokens.append(token)
            if len(tokens) == limit:
                break
    return tokens


class SimulatedWorker(WorkerProcess):
    """worker/main.py's process with a SimulatedScheduler instead of a llama.cpp engine."""

    def __init__(self, config: Config, index: int) -> None:
        assert config.workers.simulate is not None
        self.options: SimulateOptions = config.workers.simulate
        super().__init__(config, index)
        self._trace: IO[str] | None = None
        self._flushed = 0

    def _load(self) -> None:
        path = resolve_model_path(self.config.model)
        vocab = Vocab.load(path)
        try:
            tokens = text_tokens(vocab)
            n_vocab = vocab.n_vocab
        finally:
            vocab.close()
        model = self.config.model
        n_ctx = model.n_ctx or _DEFAULT_N_CTX
        self.info = protocol.WorkerInfo(
            n_ctx=n_ctx,
            n_ctx_seq=n_ctx,
            n_seq_max=self.options.slots,
            n_batch=model.n_batch or 512,
            n_vocab=n_vocab,
            n_ctx_train=n_ctx,
            embedding=False,
            pooling_type=0,
            swa=False,
            recurrent=False,
            can_shift=True,
            description=f"simulated ({path.name})",
        )
        self.sim = SimulatedScheduler(self.options, tokens, n_ctx)
        self.scheduler = self.sim  # type: ignore[assignment]  # the heartbeat reads `scheduler.stats`
        if self.options.trace_path:
            self._trace = open(f"{self.options.trace_path}.{self.index}", "a", buffering=1 << 20)  # noqa: SIM115

    def _description(self) -> object:
        return self.info

    def run(self) -> None:
        self._load()
        self.heartbeat.start()
        try:
            self._announce_first()
            self._simulate()
        finally:
            self.heartbeat.stop()
            if self._trace is not None:
                self._trace.close()
            for sock in (*self.dealers, *self.pushes):
                sock.close()
            self.zmq.term()

    def _ready_message(self) -> bytes:
        return self.codec.encode(protocol.Ready(worker=self.index, pid=os.getpid(), info=self.info))

    def _simulate(self) -> None:
        poller = zmq.Poller()
        for dealer in self.dealers:
            poller.register(dealer, zmq.POLLIN)
        sim = self.sim
        while True:
            if self.stopping and sim.idle:
                return
            due = sim.next_due()
            wait = 50.0 if due is None else (due - time.monotonic()) * 1000.0
            if wait >= 1.0:
                poller.poll(int(min(wait, 50.0)))
            self._drain()
            now = time.monotonic()
            sim.admit(now)
            if due is None or now < due:
                continue
            result = sim.step(now)
            if result.items:
                if self._trace is not None:
                    sent = time.monotonic_ns()
                    for item in result.items:
                        self._trace.write(f"{sent} {item.rid} {len(item.token_ids)}\n")
                    if sent - self._flushed > 500_000_000:  # a killed simulator loses half a second at most
                        self._trace.flush()
                        self._flushed = sent
                self.send(protocol.Frames(result.items))
            for error in result.errors:
                self.send(error)

    def _held_requests(self) -> list[str]:
        return self.sim.request_ids()

    def _hello(self, live: set[str]) -> None:
        dropped = [rid for rid in self.sim.request_ids() if rid not in live and self._owned_here(rid)]
        for rid in dropped:
            self.sim.cancel(rid)
        if dropped:
            log.warning(
                "worker %d dropped %d requests the router no longer waits for", self.index, len(dropped)
            )
        with contextlib.suppress(zmq.Again):
            self.dealers[self._source].send(self._ready_message(), zmq.NOBLOCK)

    def _handle(self, message: protocol.RouterMessage) -> None:
        if isinstance(message, protocol.SubmitRequest):
            if self.stopping:
                self.send(protocol.Error(message.rid, 503, "unavailable", "worker is draining"))
                return
            refusal = self.sim.submit(message)
            if refusal is not None:
                self.send(refusal)
        elif isinstance(message, protocol.EmbedRequest):
            self.send(protocol.Error(message.rid, 400, "invalid_request_error", _NO_EMBEDDINGS))
        elif isinstance(message, protocol.Cancel):
            self.sim.cancel(message.rid)
        elif isinstance(message, protocol.LoadAdapter | protocol.UnloadAdapter):
            # No model, so no adapter: say it is done, as a real worker would once loaded / freed.
            op = "load" if isinstance(message, protocol.LoadAdapter) else "unload"
            self.send(protocol.AdapterReply(self.index, message.name, op, True))
        else:
            self._hello(set(message.live))


def run_simulator(config: Config, index: int) -> int:
    """`llamafleet worker` when the config has `workers.simulate`."""
    import signal

    worker = SimulatedWorker(config, index)
    signal.signal(signal.SIGTERM, worker.request_stop)
    signal.signal(signal.SIGINT, worker.request_stop)
    worker.run()
    log.info("simulated worker %d stopped", index)
    return 0
