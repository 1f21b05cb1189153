"""The router-worker link through real processes: the private ipc folder (umask 000, planted folders, nothing
left after a stop), CURVE over loopback tcp:// (a worker with an unknown key is refused and logged), and
tcp:// without keys (refused, or a warning with workers.insecure_tcp)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.curve import write_keys
from tests.integration.server import REPO, Server, free_port, model_config, run_server

DEFAULT_ENDPOINTS = {"requests_endpoint": None, "results_endpoint": None}
# Greedy and past the end of generation, for the exact completion_tokens checks: at the default temperature
# the tiny model can draw its end token among the first few (it did as a 2nd token in a CI run).
EXACT: dict[str, Any] = {"temperature": 0, "extra_body": {"ignore_eos": True}}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


class Cli:
    """A `llamafleet` process whose output goes to a file (a pipe could fill up and stall it)."""

    def __init__(self, log: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.log_path = log
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "shared.cli", *args],
                cwd=REPO,
                env={**os.environ, "OMP_WAIT_POLICY": "passive", **(env or {})},
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float = 120.0) -> int:
        return self.process.wait(timeout)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)


def wait_for(predicate: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_ipc_folder_is_private_under_umask_000_and_removed_after_stop(
    tiny_llama_gguf: Path, tmp_path: Path
) -> None:
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    with run_server(
        model_config(tiny_llama_gguf),
        workers=DEFAULT_ENDPOINTS,
        env={"XDG_RUNTIME_DIR": str(runtime)},
        umask=0,
    ) as server:
        folder = runtime / f"llamafleet-{server.config['server']['port']}"
        assert mode(folder) == 0o700
        sockets = sorted(folder.iterdir())
        assert [p.name for p in sockets] == ["requests.sock", "results.sock"]
        assert all(stat.S_ISSOCK(p.lstat().st_mode) and mode(p) == 0o600 for p in sockets)
        reply = server.client().completions.create(model="test-model", prompt="hi", max_tokens=2, **EXACT)
        assert reply.usage is not None and reply.usage.completion_tokens == 2
    assert list(runtime.iterdir()) == [], "the ipc folder was left behind"


def _config(tmp_path: Path, model: Path, port: int, **workers: Any) -> Path:
    path = tmp_path / f"config-{port}.json"
    path.write_text(json.dumps({"server": {"port": port}, "model": model_config(model), "workers": workers}))
    return path


@pytest.mark.parametrize("planted", ["mode-777", "other-user"])
def test_planted_ipc_folder_is_refused(tiny_llama_gguf: Path, tmp_path: Path, planted: str) -> None:
    if planted == "other-user" and os.geteuid() != 0:
        pytest.skip("chown to another user needs root")
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    port = free_port()
    folder = runtime / f"llamafleet-{port}"
    folder.mkdir()
    if planted == "mode-777":
        os.chmod(folder, 0o777)
    else:
        os.chmod(folder, 0o700)
        os.chown(folder, 65534, 65534)
    config = _config(tmp_path, tiny_llama_gguf, port)
    for role in (["serve"], ["router"], ["worker", "--index", "0"]):
        process = Cli(
            tmp_path / f"{role[0]}.log", *role, "-C", str(config), env={"XDG_RUNTIME_DIR": str(runtime)}
        )
        code, output = process.wait(), process.output()
        assert code == 2, (role, output[-3000:])
        assert f"the ipc socket folder {folder}" in output, output[-3000:]
    assert sorted(folder.iterdir()) == []  # nothing bound inside it


@pytest.fixture(scope="module")
def curve_server(tiny_llama_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    keys = tmp_path_factory.mktemp("curve") / "keys"
    write_keys(keys, 2)  # worker-1's key is allowed but no worker 1 runs under `serve`
    workers = {
        "count": 1,
        "requests_endpoint": f"tcp://127.0.0.1:{free_port()}",
        "results_endpoint": f"tcp://127.0.0.1:{free_port()}",
        "keys_dir": str(keys),
    }
    with run_server(model_config(tiny_llama_gguf), workers=workers) as server:
        yield server, keys


def _worker_count(server: Server) -> int:
    return int(server.http().get("/healthz").json()["workers"])


def _extra_worker(server: Server, tmp_path: Path, keys_dir: Path) -> Cli:
    config = tmp_path / f"extra-{keys_dir.name}.json"
    config.write_text(json.dumps({**server.config, "workers": {**server.config["workers"], "count": 2}}))
    env = {"LLAMAFLEET_WORKERS__KEYS_DIR": str(keys_dir)}
    return Cli(tmp_path / f"worker-{keys_dir.name}.log", "worker", "-C", str(config), "--index", "1", env=env)


def test_curve_over_loopback_tcp_serves_and_refuses_unknown_worker_keys(
    curve_server: Any, tmp_path: Path
) -> None:
    server, keys = curve_server
    reply = server.client().completions.create(model="test-model", prompt="hello", max_tokens=3, **EXACT)
    assert reply.usage is not None and reply.usage.completion_tokens == 3
    assert _worker_count(server) == 1
    # A rogue worker: it knows the router's public key, its own key pair is not in the allow-list.
    rogue_keys = tmp_path / "rogue"
    write_keys(rogue_keys, 2)
    shutil.copy(keys / "router.key", rogue_keys / "router.key")
    rogue = _extra_worker(server, tmp_path, rogue_keys)
    try:
        wait_for(lambda: "refused a worker connection" in server.log(), "the router to log the refusal")
        assert (rogue_keys / "workers" / "worker-1.key").read_text().split('"')[-2] in server.log()
        # ZeroMQ does not retry a refused key: the worker says why and exits (its supervisor may retry).
        assert rogue.wait(60) == 2
        assert "refused this worker's CURVE key" in rogue.output()
        assert _worker_count(server) == 1
        reply = server.client().completions.create(model="test-model", prompt="hello", max_tokens=3, **EXACT)
        assert reply.usage is not None and reply.usage.completion_tokens == 3
    finally:
        rogue.stop()
    # The same process with worker 1's real key is let in: the check above can tell the two apart.
    allowed = _extra_worker(server, tmp_path, keys)
    try:
        wait_for(lambda: _worker_count(server) == 2, "the allowed worker 1 to register", timeout=60)
    finally:
        allowed.stop()


def test_insecure_tcp_runs_with_a_warning(tiny_llama_gguf: Path, tmp_path: Path) -> None:
    port = free_port()
    tcp = {
        "requests_endpoint": f"tcp://127.0.0.1:{free_port()}",
        "results_endpoint": f"tcp://127.0.0.1:{free_port()}",
    }
    refused = Cli(
        tmp_path / "refused.log", "router", "-C", str(_config(tmp_path, tiny_llama_gguf, port, **tcp))
    )
    code, output = refused.wait(), refused.output()
    assert code == 2 and "workers.keys_dir" in output and "workers.insecure_tcp" in output
    insecure = _config(tmp_path, tiny_llama_gguf, port, **tcp, insecure_tcp=True)
    router = Cli(tmp_path / "router.log", "router", "-C", str(insecure))
    try:

        def answering() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 503
            except httpx.HTTPError:
                return False

        wait_for(answering, "the router to answer (no worker: 503)")
    finally:
        code = router.stop()
    output = router.output()
    assert code == 0, output
    assert f"workers.insecure_tcp: {tcp['requests_endpoint']} is neither authenticated" in output
