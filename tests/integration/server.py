"""Starts the real service (`llamafleet serve`: supervisor, router, worker processes) for a test.

Each server gets its own port and its own short ipc folder, so tests can run servers side by side; on exit
it is stopped with SIGTERM and the test checks that it exited 0 and left no worker process behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def child_pids(supervisor_pid: int, role: str) -> list[int]:
    """Direct children of the supervisor running `llamafleet ROLE` (`worker` or `router`)."""
    out = subprocess.run(
        ["ps", "-ww", "-o", "pid=,args=", "--ppid", str(supervisor_pid)],
        capture_output=True,
        text=True,
        check=False,
    )
    pids = []
    for line in out.stdout.splitlines():
        pid, _, command = line.strip().partition(" ")
        if f"shared.cli {role} " in command:
            pids.append(int(pid))
    return pids


def worker_pids(supervisor_pid: int) -> list[int]:
    """The supervisor's worker processes."""
    return child_pids(supervisor_pid, "worker")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    with contextlib.suppress(FileNotFoundError):
        return "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
    return False


@dataclass
class Server:
    base_url: str
    process: subprocess.Popen[bytes]
    config: dict[str, Any]
    log_path: Path
    api_key: str = "test-key"
    _seen_workers: set[int] = field(default_factory=set)

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"

    def client(self, **kwargs: Any) -> Any:
        import openai

        return openai.OpenAI(base_url=self.v1, api_key=self.api_key, max_retries=0, **kwargs)

    def http(self, timeout: float = 60.0) -> httpx.Client:
        return httpx.Client(
            base_url=self.base_url,
            timeout=timeout,
            headers={"Authorization": f"Bearer {self.api_key}"} if self.api_key else {},
        )

    def metrics(self) -> dict[str, float]:
        """Samples from /metrics as {'name{labels}': value}."""
        text = httpx.get(f"{self.base_url}/metrics", timeout=10).text
        samples: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    def wait_metrics(
        self,
        check: Callable[[dict[str, float]], bool],
        failure: Callable[[dict[str, float]], object],
        timeout: float = 5.0,
    ) -> dict[str, float]:
        """Polls /metrics until `check` holds on one scrape and returns that scrape (worker stats arrive
        with heartbeats, which a loaded machine can delay past any fixed sleep); on timeout the assertion
        says `failure(last scrape)`."""
        deadline = time.monotonic() + timeout
        while not check(samples := self.metrics()):
            assert time.monotonic() < deadline, failure(samples)
            time.sleep(0.1)
        return samples

    def wait_metric(self, name: str, at_least: float, timeout: float = 5.0) -> float:
        """Polls /metrics until `name` reaches `at_least`."""
        samples = self.wait_metrics(
            lambda m: m.get(name, float("-inf")) >= at_least,
            lambda m: f"{name} = {m.get(name, float('-inf'))}, expected >= {at_least}",
            timeout,
        )
        return samples[name]

    def workers(self) -> list[int]:
        pids = worker_pids(self.process.pid)
        self._seen_workers.update(pids)
        return pids

    def router_pid(self) -> int | None:
        """The supervisor's router process (None between a router's death and its restart)."""
        pids = child_pids(self.process.pid, "router")
        self._seen_workers.update(pids)
        return pids[0] if pids else None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_healthy(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            with contextlib.suppress(httpx.HTTPError):
                headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
                if httpx.get(f"{self.base_url}/healthz", headers=headers, timeout=2).status_code == 200:
                    self.workers()
                    return
            time.sleep(0.1)
        raise TimeoutError(f"server not healthy in {timeout}s:\n{self.log()[-4000:]}")

    def stop(self, timeout: float = 60.0) -> int:
        self.workers()
        self.router_pid()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise
        deadline = time.monotonic() + 10
        while any(pid_alive(p) for p in self._seen_workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        return code


def model_config(model_path: Path, **overrides: Any) -> dict[str, Any]:
    """A small, fast model section for tests (1 thread: 2-core CI machines)."""
    model: dict[str, Any] = {
        "path": str(model_path),
        "alias": "test-model",
        "n_ctx": 2048,
        "n_seq_max": 4,
        "n_batch": 256,
        "n_ubatch": 256,
        "threads": 1,
        "threads_batch": 1,
    }
    model.update(overrides)
    return model


def start_apart(
    config: dict[str, Any], folder: Path
) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]:
    """`llamafleet worker` (index 0) and `llamafleet router` as two processes on one config written into
    `folder`, as systemd runs them; the worker may start first (ZeroMQ connects once the router binds).
    The caller stops both."""
    path = folder / "config.json"
    path.write_text(json.dumps(config))
    env = {**os.environ, "OMP_WAIT_POLICY": "passive"}
    command = [sys.executable, "-m", "shared.cli"]
    worker = subprocess.Popen([*command, "worker", "-C", str(path), "--index", "0"], cwd=REPO, env=env)
    router = subprocess.Popen([*command, "router", "-C", str(path)], cwd=REPO, env=env)
    return worker, router


@contextlib.contextmanager
def run_server(
    model: dict[str, Any] | None,
    *,
    models: list[dict[str, Any]] | None = None,
    server: dict[str, Any] | None = None,
    workers: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    api_key: str | None = "test-key",
    passive_threads: bool = True,
    umask: int = -1,
    client_key: str | None = None,
) -> Iterator[Server]:
    """`api_key` goes into the config; `client_key` (default: `api_key`) is what the test's clients send.

    `models` (with `model` None) serves several models: each entry a model section with its own `workers`
    section (default sockets, in the port's own folder)."""
    run_dir = Path(tempfile.mkdtemp(prefix="lf-"))
    port = free_port()
    config: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": port, "drain_timeout_seconds": 5, **(server or {})},
        "model": model,
        "workers": {
            "requests_endpoint": f"ipc://{run_dir}/req.sock",
            "results_endpoint": f"ipc://{run_dir}/res.sock",
            **(workers or {}),
        },
        **(extra or {}),
    }
    if models is not None:
        assert model is None and workers is None, "`models` replaces `model` and `workers`"
        del config["model"], config["workers"]
        config["models"] = models
    if api_key:
        config["server"]["api_key"] = api_key
    config_path = run_dir / "config.json"
    config_path.write_text(json.dumps(config))
    log_path = run_dir / "server.log"
    # Tests share few cores: llama.cpp's threads sleep at once. Benchmarks pass passive_threads=False and
    # get the worker's own setting (shared/threads.py: spin across the gap between two decode steps).
    process_env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if passive_threads:
        process_env["OMP_WAIT_POLICY"] = "passive"
    process_env.update(env or {})
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "shared.cli", "serve", "-C", str(config_path)],
            cwd=REPO,
            env=process_env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            umask=umask,
        )
    key = client_key if client_key is not None else api_key
    handle = Server(f"http://127.0.0.1:{port}", process, config, log_path, key or "")
    try:
        handle.wait_healthy()
        yield handle
    finally:
        code = handle.stop()
        leftovers = [p for p in handle._seen_workers if pid_alive(p)]
        shutil.rmtree(run_dir, ignore_errors=True)
        assert code == 0, f"server exited with {code}"
        assert not leftovers, f"worker processes left running: {leftovers}"


@pytest.fixture(scope="module")
def tiny_server(tiny_llama_gguf: Path) -> Iterator[Server]:
    """One server on the tiny generated model, shared by a test module."""
    with run_server(model_config(tiny_llama_gguf)) as server:
        yield server
