"""`llamafleet serve`: start the router and the configured workers as processes and keep them all alive.

The supervisor serves no HTTP itself, so nothing a request does can take it down: it restarts a router that
dies (workers keep their state and caches; the new router re-handshakes with them) and a worker that dies.
It talks to the router over a socket pair it hands down at start: it reports worker exits (the router fails
their requests at once with a 503, instead of waiting for heartbeats to stop) and the router reports workers
that are ready or have stopped answering heartbeats (a hung worker is killed here and replaced). Children
get PR_SET_PDEATHSIG, so even a SIGKILLed supervisor leaves no orphan holding a GPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared import link
from shared.config import Config

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
# Router exit codes that mean "cannot start" (a config error, the port is taken): restarting won't help.
ROUTER_CONFIG_ERROR = 2
ROUTER_START_FAILED = 3
_FATAL_ROUTER_CODES = frozenset({ROUTER_CONFIG_ERROR, ROUTER_START_FAILED})
_WORKER_STOP_SECONDS = 10.0


def _die_with_parent() -> None:
    """Runs in the child before exec: deliver SIGTERM to it when the supervisor dies."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class RestartPolicy:
    """Back-off before restarting a process: grows with consecutive crashes, and a process that ran for
    `stable_after` seconds counts as healthy again (crashes minutes apart are not a crash loop)."""

    base: float
    stable_after: float = 30.0
    max_factor: int = 10
    failures: int = 0

    def delay(self, uptime: float) -> float:
        self.failures = 1 if uptime >= self.stable_after else self.failures + 1
        return self.base * min(self.failures, self.max_factor)


@dataclass
class Child:
    """One supervised process and its restart state."""

    name: str
    policy: RestartPolicy
    process: asyncio.subprocess.Process | None = None
    started_at: float = 0.0


class Supervisor:
    def __init__(self, config: Config, config_path: Path, router_args: list[str]) -> None:
        self.config = config
        self.config_path = config_path
        self.router_args = router_args
        count = config.server.router_processes
        backoff = config.workers.restart_backoff_seconds
        self.routers = {
            r: Child("router" if count == 1 else f"router {r}", RestartPolicy(backoff)) for r in range(count)
        }
        # Workers numbered pool after pool (Config.worker_slots), as the router's link numbers them.
        self.slots = config.worker_slots()
        self.several_models = len(config.pools()) > 1
        self.workers = {
            i: Child(self._worker_name(i), RestartPolicy(pool.workers.restart_backoff_seconds))
            for i, (pool, _) in enumerate(self.slots)
        }
        self.ready: set[int] = set()
        self._ready_changed = asyncio.Event()
        self._stop = asyncio.Event()
        self._stopping = False
        self._fatal: str | None = None
        self._exit_code = 1
        self._links: dict[int, asyncio.StreamWriter] = {}  # router index -> its end of our socket pair
        self._link_codec = link.supervisor_end()
        self._tasks: list[asyncio.Task[None]] = []

    # -- processes -------------------------------------------------------------------------------

    def _worker_name(self, index: int) -> str:
        pool, local = self.slots[index]
        return f"worker {pool.model.served_name}/{local}" if self.several_models else f"worker {local}"

    def _env(self, index: int | None) -> dict[str, str]:
        env = dict(os.environ)
        if index is not None:
            pool, local = self.slots[index]
            env.update(pool.workers.env)
            env.update(pool.workers.override_for(local).env)
        if self.several_models:
            # Each pool's default sockets live in the per-port folder: pass the port the router uses.
            env["LLAMAFLEET_SERVER__PORT"] = str(self.config.server.port)
        else:
            # The router may have been given another port on the command line: pass the endpoints it binds.
            env["LLAMAFLEET_WORKERS__REQUESTS_ENDPOINT"] = self.config.requests_endpoint()
            env["LLAMAFLEET_WORKERS__RESULTS_ENDPOINT"] = self.config.results_endpoint()
        return env

    async def _exec(self, args: list[str], env: dict[str, str], **kwargs: Any) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "shared.cli",
            *args,
            "-C",
            str(self.config_path),
            env=env,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            # Own session: Ctrl-C in a terminal (or `timeout`) signals the whole foreground process group;
            # children must not exit on their own then, the supervisor drains and stops them.
            start_new_session=True,
            **kwargs,
        )

    async def _spawn_worker(self, index: int) -> None:
        child = self.workers[index]
        pool, local = self.slots[index]
        args = ["worker", "--index", str(local)]
        if self.several_models:
            args += ["--model", pool.model.served_name]
        child.process = await self._exec(args, self._env(index))
        child.started_at = time.monotonic()
        log.info("started %s (pid %d)", child.name, child.process.pid)

    async def _spawn_router(self, index: int) -> None:
        ours, theirs = socket.socketpair()
        try:
            child = self.routers[index]
            child.process = await self._exec(
                [
                    "router",
                    *self.router_args,
                    "--control-fd",
                    str(theirs.fileno()),
                    "--router-index",
                    str(index),
                ],
                self._env(None),
                pass_fds=(theirs.fileno(),),
            )
            child.started_at = time.monotonic()
        finally:
            theirs.close()
        reader, self._links[index] = await asyncio.open_unix_connection(sock=ours)
        self._tasks.append(asyncio.create_task(self._read_link(reader), name="supervisor-link"))
        log.info("started %s (pid %d)", child.name, child.process.pid)

    async def _watch(self, child: Child, respawn: Callable[[], Awaitable[None]]) -> None:
        """Waits for the child to exit and restarts it after its back-off, until the supervisor stops."""
        while not self._stopping:
            assert child.process is not None
            code = await child.process.wait()
            if self._stopping:
                return
            await self._exited(child, code)
            if self._stopping or self._fatal is not None:
                return
            delay = child.policy.delay(time.monotonic() - child.started_at)
            log.warning("%s exited (code %s); restarting in %.1fs", child.name, code, delay)
            await asyncio.sleep(delay)
            if not self._stopping:
                await respawn()

    async def _exited(self, child: Child, code: int) -> None:
        router = next((r for r, c in self.routers.items() if c is child), None)
        if router is not None:
            self._links.pop(router, None)
            if code in _FATAL_ROUTER_CODES and not self.ready:
                self._fatal = f"the router could not start (exit code {code}); see the log above"
                self._exit_code = ROUTER_CONFIG_ERROR if code == ROUTER_CONFIG_ERROR else 1
                self._stop.set()
            return
        index = next(i for i, c in self.workers.items() if c is child)
        self.ready.discard(index)
        await self._tell(link.WorkerExited(index, code))

    # -- the link to the router -----------------------------------------------------------------

    async def _tell(self, message: link.ToRouter) -> None:
        """Tells every router process."""
        payload = self._link_codec.encode(message)
        for writer in list(self._links.values()):
            with contextlib.suppress(ConnectionError, OSError):
                writer.write(payload)
                await writer.drain()

    async def _read_link(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            try:
                message = self._link_codec.decode(line)
            except link.LinkError as error:
                log.warning("bad message from the router (%s): %r", error, line[:200])
                continue
            if isinstance(message, link.WorkerReady):
                self.ready.add(message.worker)
                self._ready_changed.set()
            else:
                self._kill_hung(message.worker, message.pid)

    def _kill_hung(self, index: int, pid: int) -> None:
        """A worker that stopped answering heartbeats: kill it (SIGKILL reaches a stopped process too);
        its watcher restarts it."""
        child = self.workers.get(index)
        if child is None or child.process is None:
            return
        process = child.process
        if process.returncode is not None or (pid and process.pid != pid):
            return  # already gone, or a newer process of that index
        log.warning("%s (pid %d) stopped answering heartbeats; killing it", child.name, process.pid)
        with contextlib.suppress(ProcessLookupError):
            process.kill()

    # -- life cycle -----------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        for r, router in self.routers.items():
            await self._spawn_router(r)
            self._tasks.append(
                asyncio.create_task(self._watch(router, functools.partial(self._spawn_router, r)))
            )
        for index in self.workers:
            await self._spawn_worker(index)
            self._tasks.append(
                asyncio.create_task(
                    self._watch(self.workers[index], functools.partial(self._spawn_worker, index))
                )
            )
        ready = await self._wait_ready()
        if not ready and self._fatal is None and not self._stop.is_set():
            self._fatal = "workers did not become ready in time; see the log above"
        if self._fatal is None:
            await self._stop.wait()
        await self._shutdown()
        if self._fatal is not None:
            log.error("%s", self._fatal)
            return self._exit_code
        return 0

    async def _wait_ready(self) -> bool:
        timeout = max(pool.workers.ready_timeout_seconds for pool in self.config.pools())
        deadline = time.monotonic() + timeout
        while len(self.ready) < len(self.workers):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._stop.is_set():
                return False
            self._ready_changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._ready_changed.wait(), min(remaining, 0.5))
        server = self.config.server
        host = f"[{server.host}]" if ":" in server.host else server.host
        names = ", ".join(pool.model.served_name for pool in self.config.pools())
        log.info(
            "ready: http://%s:%d/v1 serving %s (%d workers)", host, server.port, names, len(self.workers)
        )
        return True

    async def _shutdown(self) -> None:
        """The router drains first (in-flight requests finish within the drain timeout), then workers stop."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        drain = self.config.server.drain_timeout_seconds
        for router in self.routers.values():
            await self._terminate(router, drain + 10.0, wait=False)
        for router in self.routers.values():
            await self._terminate(router, drain + 10.0)
        for child in self.workers.values():
            await self._terminate(child, _WORKER_STOP_SECONDS, wait=False)
        for child in self.workers.values():
            await self._terminate(child, _WORKER_STOP_SECONDS)

    async def _terminate(self, child: Child, timeout: float, wait: bool = True) -> None:
        process = child.process
        if process is None:
            return
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        if not wait:
            return
        try:
            await asyncio.wait_for(process.wait(), timeout)
        except asyncio.TimeoutError:
            log.warning("%s did not stop in %.0fs; killing it", child.name, timeout)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
