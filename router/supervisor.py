"""`llamafleet serve`: start the configured workers, keep them alive, and run the router in this process.

The router learns of a worker's death from the process itself (immediately) rather than waiting for its
heartbeats to stop, fails that worker's in-flight requests with a 503, and starts a replacement. Workers are
started with PR_SET_PDEATHSIG so that even a SIGKILLed supervisor leaves no orphan holding a GPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
from pathlib import Path

from router.state import ServerState
from shared.config import Config

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child before exec: deliver SIGTERM to it when the supervisor dies."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Supervisor:
    def __init__(self, config: Config, config_path: Path) -> None:
        self.config = config
        self.config_path = config_path
        self.processes: dict[int, asyncio.subprocess.Process] = {}
        self.restarts: dict[int, int] = {}
        self._stopping = False
        self._monitors: list[asyncio.Task[None]] = []

    def _worker_env(self, index: int) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.config.workers.env)
        env.update(self.config.workers.override_for(index).env)
        # The router may have been given another port on its command line: pass the endpoints it bound.
        env["LLAMAFLEET_WORKERS__REQUESTS_ENDPOINT"] = self.config.requests_endpoint()
        env["LLAMAFLEET_WORKERS__RESULTS_ENDPOINT"] = self.config.results_endpoint()
        return env

    async def _spawn(self, index: int) -> asyncio.subprocess.Process:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "shared.cli",
            "worker",
            "-C",
            str(self.config_path),
            "--index",
            str(index),
            env=self._worker_env(index),
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            # Own session: Ctrl-C in a terminal (or `timeout`) signals the whole foreground process group;
            # workers must not exit on their own then, the supervisor drains and stops them.
            start_new_session=True,
        )
        self.processes[index] = process
        log.info("started worker %d (pid %d)", index, process.pid)
        return process

    async def start(self, state: ServerState) -> None:
        for index in range(self.config.workers.count):
            await self._spawn(index)
            self._monitors.append(asyncio.create_task(self._monitor(index, state)))
        ready = await state.dispatcher.wait_ready(
            self.config.workers.count, self.config.workers.ready_timeout_seconds
        )
        if not ready:
            await self.stop(state)
            raise RuntimeError("workers did not become ready in time; see the log above")

    async def _monitor(self, index: int, state: ServerState) -> None:
        while not self._stopping:
            process = self.processes[index]
            code = await process.wait()
            if self._stopping:
                return
            state.dispatcher.mark_down(index, f"exited with code {code}")
            self.restarts[index] = self.restarts.get(index, 0) + 1
            backoff = self.config.workers.restart_backoff_seconds * min(self.restarts[index], 10)
            log.warning("worker %d exited (%s); restarting in %.1fs", index, code, backoff)
            await asyncio.sleep(backoff)
            if not self._stopping:
                await self._spawn(index)

    async def stop(self, state: ServerState) -> None:
        """Asks workers to drain and exit; kills those that do not within the drain timeout."""
        self._stopping = True
        for task in self._monitors:
            task.cancel()
        await state.dispatcher.send_shutdown()
        for process in self.processes.values():
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
        timeout = self.config.server.drain_timeout_seconds + 5
        for index, process in self.processes.items():
            try:
                await asyncio.wait_for(process.wait(), timeout)
            except asyncio.TimeoutError:
                log.warning("worker %d did not stop in %.0fs; killing it", index, timeout)
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
