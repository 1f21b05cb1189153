"""CURVE keys: `llamafleet keys` files and modes, loading them, tcp:// without keys refused, and the
allow-list at the socket level (an unknown worker key and a fake router both get nowhere)."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from router.client.zap import start_authenticator
from shared import curve
from shared.cli import main
from shared.config import ConfigError, load_config, parse_config


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@contextlib.contextmanager
def umask(value: int) -> Iterator[None]:
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


def test_keys_command_writes_private_pairs_and_keeps_existing_ones(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    with umask(0):  # the modes must not depend on the umask
        assert main(["keys", str(keys), "--workers", "2"]) == 0
    assert mode(keys) == 0o700 and mode(keys / "workers") == 0o700
    for name in ("router", "workers/worker-0", "workers/worker-1"):
        assert mode(keys / f"{name}.key_secret") == 0o600
        assert mode(keys / f"{name}.key") == 0o644
        assert "secret-key" not in (keys / f"{name}.key").read_text()
    router = curve.load_router_keys(keys)
    assert sorted(router.allowed.values()) == ["worker-0", "worker-1"]
    worker = curve.load_worker_keys(keys, 1)
    assert worker.router_public == router.public
    assert router.allowed[worker.public] == "worker-1"
    # Again with more workers: old keys untouched, one new pair.
    before = (keys / "router.key_secret").read_text()
    assert main(["keys", str(keys), "--workers", "3"]) == 0
    assert (keys / "router.key_secret").read_text() == before
    assert sorted(curve.load_router_keys(keys).allowed.values()) == ["worker-0", "worker-1", "worker-2"]


def test_missing_or_unsafe_keys_are_config_errors(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    curve.write_keys(keys, 1)
    with pytest.raises(ConfigError, match=r"worker-3\.key_secret is missing"):
        curve.load_worker_keys(keys, 3)
    os.chmod(keys / "router.key_secret", 0o644)
    with pytest.raises(ConfigError, match="accessible by other users"):
        curve.load_router_keys(keys)
    os.chmod(keys / "router.key_secret", 0o600)
    for path in (keys / "workers").glob("*.key"):
        path.unlink()
    with pytest.raises(ConfigError, match="no worker public keys"):
        curve.load_router_keys(keys)
    with pytest.raises(ConfigError, match=r"router\.key_secret is missing"):
        curve.load_router_keys(tmp_path / "elsewhere")


def test_tcp_without_keys_is_refused_unless_insecure_tcp_is_set(tmp_path: Path) -> None:
    tcp = {"requests_endpoint": "tcp://127.0.0.1:5555", "results_endpoint": "tcp://127.0.0.1:5556"}
    with pytest.raises(ConfigError) as error:
        parse_config({"model": {"path": "m.gguf"}, "workers": tcp})
    message = str(error.value)
    assert "workers.requests_endpoint is tcp://127.0.0.1:5555" in message
    assert "workers.keys_dir" in message and "workers.insecure_tcp" in message
    insecure = parse_config({"model": {"path": "m.gguf"}, "workers": {**tcp, "insecure_tcp": True}})
    assert insecure.insecure_network_endpoints() == ["tcp://127.0.0.1:5555", "tcp://127.0.0.1:5556"]
    secured = parse_config({"model": {"path": "m.gguf"}, "workers": {**tcp, "keys_dir": "k"}})
    assert secured.insecure_network_endpoints() == []
    assert parse_config({"model": {"path": "m.gguf"}}).insecure_network_endpoints() == []
    # The command line: exit 2 naming the fields, for every role, before anything starts.
    path = tmp_path / "tcp.json"
    path.write_text(json.dumps({"model": {"path": "m.gguf"}, "workers": tcp}))
    with pytest.raises(ConfigError):
        load_config(path)
    for argv in (["router", "-C", str(path)], ["worker", "-C", str(path)], ["serve", "-C", str(path)]):
        assert main(argv) == 2


def _curve_server(context: zmq.Context, keys: curve.RouterKeys, kind: int = zmq.PULL) -> zmq.Socket:
    server = context.socket(kind)
    server.setsockopt(zmq.LINGER, 0)
    curve.secure_server(server, keys)
    server.bind("tcp://127.0.0.1:*")
    return server


def _send_from(context: zmq.Context, endpoint: str, keys: curve.WorkerKeys) -> zmq.Socket:
    client = context.socket(zmq.PUSH)
    client.setsockopt(zmq.LINGER, 0)
    curve.secure_client(client, keys)
    client.connect(endpoint)
    return client


def test_allow_list_admits_known_worker_keys_only(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    curve.write_keys(tmp_path / "real", 1)
    curve.write_keys(tmp_path / "rogue", 1)
    router_keys = curve.load_router_keys(tmp_path / "real")
    real = curve.load_worker_keys(tmp_path / "real", 0)
    rogue_own = curve.load_worker_keys(tmp_path / "rogue", 0)
    # The rogue knows the router's public key (it is public) but has a key pair of its own.
    rogue = curve.WorkerKeys(rogue_own.public, rogue_own.secret, router_keys.public)
    context = zmq.Context()
    authenticator = start_authenticator(context, router_keys)
    server = _curve_server(context, router_keys)
    endpoint = server.getsockopt(zmq.LAST_ENDPOINT).decode()
    try:
        with caplog.at_level("WARNING", logger="router.client.zap"):
            rogue_socket = _send_from(context, endpoint, rogue)
            rogue_socket.send(b"from the rogue")
            assert not server.poll(1000), "a worker key outside the allow-list got through"
        assert any("refused a worker connection" in r.getMessage() for r in caplog.records)
        # A plain (NULL mechanism) client, as in the script, gets nowhere either.
        plain = context.socket(zmq.PUSH)
        plain.setsockopt(zmq.LINGER, 0)
        plain.connect(endpoint)
        plain.send(b"from a plain client")
        assert not server.poll(1000), "a client without CURVE got through"
        assert rogue.public.decode() in caplog.text
        real_socket = _send_from(context, endpoint, real)
        real_socket.send(b"from worker 0")
        assert server.poll(10_000)
        assert server.recv() == b"from worker 0"
    finally:
        authenticator.stop()
        context.destroy(linger=0)  # every socket, even after a failed assertion


def test_worker_talks_only_to_the_router_key_it_knows(tmp_path: Path) -> None:
    curve.write_keys(tmp_path / "real", 1)
    curve.write_keys(tmp_path / "fake", 1)
    fake_router = curve.load_router_keys(tmp_path / "fake")
    worker = curve.load_worker_keys(tmp_path / "real", 0)
    # The impostor even allows the worker's key: only the router key the worker knows decides.
    impostor = curve.RouterKeys(fake_router.public, fake_router.secret, {worker.public: "worker-0"})
    context = zmq.Context()
    authenticator = start_authenticator(context, impostor)
    server = _curve_server(context, impostor)
    endpoint = server.getsockopt(zmq.LAST_ENDPOINT).decode()
    try:
        client = _send_from(context, endpoint, worker)
        client.send(b"a prompt's tokens")
        assert not server.poll(1000), "the worker handed a message to a router with an unknown key"
    finally:
        authenticator.stop()
        context.destroy(linger=0)


def test_handshake_watch_reports_refusals_and_failed_handshakes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    curve.write_keys(tmp_path / "real", 1)
    curve.write_keys(tmp_path / "other", 1)
    router_keys = curve.load_router_keys(tmp_path / "real")
    stranger = curve.load_worker_keys(tmp_path / "other", 0)
    context = zmq.Context()
    authenticator = start_authenticator(context, router_keys)
    server = _curve_server(context, router_keys, zmq.ROUTER)  # the worker's DEALER talks to a ROUTER
    endpoint = server.getsockopt(zmq.LAST_ENDPOINT).decode()
    cases = [
        # An unknown worker key (the right router key): refused, an error.
        (curve.WorkerKeys(stranger.public, stranger.secret, router_keys.public), curve.RouterRefusedKey),
        # A wrong router key: the handshake fails and is retried; a warning.
        (stranger, None),
    ]
    try:
        for keys, error in cases:
            client = context.socket(zmq.DEALER)
            client.setsockopt(zmq.LINGER, 0)
            curve.secure_client(client, keys)
            watch = curve.HandshakeWatch(client, endpoint, "KEYS", "worker-0")
            client.connect(endpoint)
            deadline = time.monotonic() + 20
            with caplog.at_level("WARNING", logger="shared.curve"):
                while time.monotonic() < deadline:
                    try:
                        watch.check()
                    except curve.RouterRefusedKey as refused:
                        assert error is curve.RouterRefusedKey
                        assert "KEYS/workers/worker-0.key" in str(refused)
                        break
                    if error is None and "Is KEYS/router.key the router's public key?" in caplog.text:
                        break
                    time.sleep(0.05)
                else:
                    pytest.fail(f"no handshake report for {error}")
            watch.close()
            client.close(0)
    finally:
        authenticator.stop()
        context.destroy(linger=0)
