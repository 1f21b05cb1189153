"""Router and worker on two "hosts": network namespaces joined by a veth pair (198.18.0.0/15, the benchmark
range), CURVE on. A completion goes through over HTTP; a worker whose key is not in the allow-list is refused
(never counted, never routed to) and the router logs it. Needs root and `ip netns` (CI has both)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shared.curve import write_keys
from tests.integration.server import REPO, model_config

ROUTER_ADDRESS = "198.18.0.1"
WORKER_ADDRESS = "198.18.0.2"
HTTP_PORT = 8000  # inside the router's namespace: nothing else listens there
API_KEY = "netns-key"

# Runs inside the router's namespace: waits for the service, then sends one completion.
CLIENT = """
import json, sys, time, httpx
base, key, want = sys.argv[1], sys.argv[2], sys.argv[3]
headers = {"Authorization": f"Bearer {key}"}
deadline = time.monotonic() + 90
while True:
    try:
        health = httpx.get(base + "/healthz", timeout=2)
        if want == "health" or health.status_code == 200:
            break
    except httpx.HTTPError:
        pass
    if time.monotonic() > deadline:
        sys.exit("the router never became healthy")
    time.sleep(0.2)
out = {"health": health.json()}
if want == "complete":
    reply = httpx.post(base + "/v1/completions", headers=headers, timeout=60,
                       json={"model": "test-model", "prompt": "hello", "max_tokens": 4,
                             "temperature": 0, "ignore_eos": True})
    out["status"], out["body"] = reply.status_code, reply.json()
print(json.dumps(out))
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def namespaces() -> Iterator[tuple[str, str]]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None or subprocess.run(["ip", "netns", "list"], capture_output=True).returncode:
        pytest.skip("`ip netns` is not available")
    tag = f"{os.getpid() % 100000}"
    router_ns, worker_ns = f"lf-router-{tag}", f"lf-worker-{tag}"
    router_if, worker_if = f"lfr{tag}", f"lfw{tag}"
    try:
        _ip("netns", "add", router_ns)
        _ip("netns", "add", worker_ns)
        _ip("link", "add", router_if, "type", "veth", "peer", "name", worker_if)
        _ip("link", "set", router_if, "netns", router_ns)
        _ip("link", "set", worker_if, "netns", worker_ns)
        _ip("-n", router_ns, "addr", "add", f"{ROUTER_ADDRESS}/30", "dev", router_if)
        _ip("-n", worker_ns, "addr", "add", f"{WORKER_ADDRESS}/30", "dev", worker_if)
        for ns, link in (
            (router_ns, router_if),
            (worker_ns, worker_if),
            (router_ns, "lo"),
            (worker_ns, "lo"),
        ):
            _ip("-n", ns, "link", "set", link, "up")
        yield router_ns, worker_ns
    finally:
        for ns in (router_ns, worker_ns):  # deleting a namespace deletes its end of the veth pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


class NsProcess:
    """A process started inside a namespace, its output in a file."""

    def __init__(self, ns: str, log: Path, args: list[str], env: dict[str, str] | None = None) -> None:
        self.log = log
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, *args],
                cwd=REPO,
                env={**os.environ, "OMP_WAIT_POLICY": "passive", **(env or {})},
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _client(ns: str, want: str) -> dict[str, Any]:
    result = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            ns,
            sys.executable,
            "-c",
            CLIENT,
            f"http://127.0.0.1:{HTTP_PORT}",
            API_KEY,
            want,
        ],
        capture_output=True,
        text=True,
        timeout=150,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(json.loads(result.stdout))


def _wait_for(predicate: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_router_and_worker_in_two_namespaces_with_curve(
    namespaces: tuple[str, str], tiny_llama_gguf: Path, tmp_path: Path
) -> None:
    router_ns, worker_ns = namespaces
    keys, rogue_keys = tmp_path / "keys", tmp_path / "rogue"
    write_keys(keys, 2)
    write_keys(rogue_keys, 2)  # a key pair of its own; it does know the router's public key
    shutil.copy(keys / "router.key", rogue_keys / "router.key")
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "server": {"host": "127.0.0.1", "port": HTTP_PORT, "api_key": API_KEY},
                "model": model_config(tiny_llama_gguf),
                "workers": {
                    "count": 2,
                    "requests_endpoint": f"tcp://{ROUTER_ADDRESS}:5555",
                    "results_endpoint": f"tcp://{ROUTER_ADDRESS}:5556",
                    "keys_dir": str(keys),
                },
            }
        )
    )
    cli = ["-m", "shared.cli"]
    router = NsProcess(router_ns, tmp_path / "router.log", [*cli, "router", "-C", str(config)])
    worker = NsProcess(
        worker_ns, tmp_path / "worker.log", [*cli, "worker", "-C", str(config), "--index", "0"]
    )
    rogue: NsProcess | None = None
    try:
        served = _client(router_ns, "complete")
        assert served["status"] == 200, served
        assert served["body"]["usage"]["completion_tokens"] == 4
        assert served["health"]["workers_up"] == 1
        assert "worker 0 ready" in router.text()
        # Worker 1 with a key pair the router does not know.
        rogue = NsProcess(
            worker_ns,
            tmp_path / "rogue.log",
            [*cli, "worker", "-C", str(config), "--index", "1"],
            env={"LLAMAFLEET_WORKERS__KEYS_DIR": str(rogue_keys)},
        )
        _wait_for(lambda: "refused a worker connection" in router.text(), "the router to log the refusal")
        rogue_public = (rogue_keys / "workers" / "worker-1.key").read_text().split('"')[-2]
        assert rogue_public in router.text()
        again = _client(router_ns, "complete")
        assert again["status"] == 200, again
        health = again["health"]
        assert (health["status"], health["workers_up"], health["workers"]) == ("ok", 1, 1)
        assert list(health["models"]["test-model"]["placement"]) == ["0"]  # not the refused worker 1
        assert "worker 1 ready" not in router.text()
        assert rogue.process.wait(60) == 2  # ZeroMQ does not retry a refused key: the worker exits
        assert "refused this worker's CURVE key" in rogue.text()
    finally:
        for process in (rogue, worker, router):
            if process is not None:
                process.stop()
    assert router.process.returncode == 0, router.text()[-3000:]
