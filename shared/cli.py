"""The `llamafleet` command: `serve` (supervisor + router + workers), `router`, `worker`, `keys`, `check`."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from shared.config import Config, ConfigError, load_config
from shared.logs import setup_logging

log = logging.getLogger("llamafleet")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llamafleet", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("serve", "start the configured workers and the router in one supervised service"),
        ("router", "run only the HTTP router (workers connect to it)"),
        ("worker", "run one llama.cpp worker"),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("-C", "--config", required=True, type=Path, help="JSON config file")
        if name == "worker":
            command.add_argument("--index", type=int, default=0, help="worker index (e.g. GPU index)")
            command.add_argument(
                "--model", help="the model (alias) whose pool this worker joins, for a `models` config"
            )
        else:
            command.add_argument("--host", help="override server.host")
            command.add_argument("--port", type=int, help="override server.port")
        if name == "router":  # set by `serve`: the router's end of the supervisor's socket pair
            command.add_argument("--control-fd", type=int, help=argparse.SUPPRESS)
            command.add_argument(
                "--router-index",
                type=int,
                default=0,
                help="which of server.router_processes this is (0..N-1)",
            )
    check = commands.add_parser(
        "check", help="validate a config without loading a model; print the resolved settings as JSON"
    )
    check.add_argument("-C", "--config", required=True, type=Path, help="JSON config file")
    check.add_argument(
        "--role",
        choices=("serve", "router", "worker"),
        default="serve",
        help="check what this role needs on this host (keys, sockets); default serve: all of it",
    )
    check.add_argument("--index", type=int, default=0, help="the worker index (--role worker)")
    check.add_argument("--model", help="the model whose pool the worker joins (--role worker, `models`)")
    keys = commands.add_parser(
        "keys", help="write ZeroMQ CURVE key pairs for the router and workers (for workers.keys_dir)"
    )
    keys.add_argument("dir", type=Path, help="key folder (created 0700); existing keys are kept")
    keys.add_argument("--workers", type=int, default=1, help="write keys for workers 0..N-1 (default 1)")
    return parser


def _write_keys(directory: Path, workers: int) -> int:
    from shared.curve import write_keys

    if workers < 1:
        print("llamafleet: --workers must be at least 1", file=sys.stderr)
        return 2
    try:
        written = write_keys(directory, workers)
    except OSError as error:
        print(f"llamafleet: cannot write keys: {error}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path} and its public .key")
    if not written:
        print(f"{directory}: every key exists already; nothing written")
    print(
        f"router host: {directory}/router.key_secret and {directory}/workers/*.key; "
        f"worker N's host: {directory}/router.key and {directory}/workers/worker-N.key_secret"
    )
    return 0


def _serve(args: argparse.Namespace) -> int:
    """The supervisor: router and workers as child processes (router/process/supervisor.py)."""
    import asyncio

    from router.process.supervisor import Supervisor

    config = load_config(args.config)
    router_args: list[str] = []
    if args.host:
        config.server.host = args.host
        router_args += ["--host", args.host]
    if args.port is not None:
        config.server.port = args.port
        router_args += ["--port", str(args.port)]
    # What the router and workers would refuse at start, refused here first (exit 2, nothing started).
    from shared import curve
    from shared.ipc import IpcSockets, check_worker_endpoints

    for pool in config.pools():
        endpoints = [endpoint for pair in pool.router_endpoints() for endpoint in pair]
        IpcSockets(endpoints, pool.ipc_dir()).check()
        check_worker_endpoints(endpoints)
        _check_loras(pool, args.config)
        if pool.workers.keys_dir:
            curve.load_router_keys(pool.workers.keys_dir)
            for index in range(pool.workers.count):
                curve.load_worker_keys(pool.workers.keys_dir, index)
    from shared.gpu import check_offload

    for pool, index in config.worker_slots():
        check_offload(
            pool.model, pool.workers.override_for(index), f"worker {index} of {pool.model.served_name!r}"
        )
    # Fetch, assemble or convert each model once here, with progress in the log, rather than in the router
    # and every worker at once.
    from shared.models import ModelSourceError, resolve_model_path

    for pool in config.pools():
        try:
            resolve_model_path(pool.model)
        except ModelSourceError as error:
            print(f"llamafleet: model {pool.model.served_name!r}: {error}", file=sys.stderr)
            return 2
    return asyncio.run(Supervisor(config, args.config.resolve(), router_args).run())


def _check_loras(config: Config, path: Path) -> None:
    """The config's local LoRA files fit a local model, before anything starts (exit 2 naming the file)."""
    if not config.model.loras:
        return
    from shared.lora import AdapterFileError, check_config_loras

    model_path = Path(config.model.path).expanduser() if config.model.path else None
    try:
        check_config_loras(config.model, model_path if model_path and model_path.is_file() else None)
    except AdapterFileError as error:
        raise ConfigError(f"{path}: {error}") from error


def _run_router(args: argparse.Namespace) -> int:
    import asyncio
    from types import FrameType

    import uvicorn

    from router.api.app import create_app
    from router.models_registry import ModelRegistry
    from router.process.supervisor import ROUTER_START_FAILED

    config = load_config(args.config)
    if args.host:
        config.server.host = args.host
    if args.port is not None:
        config.server.port = args.port
    drain_seconds = config.server.drain_timeout_seconds
    loop: asyncio.AbstractEventLoop | None = None
    link = None

    async def on_startup(registry: ModelRegistry) -> None:
        nonlocal loop, link
        loop = asyncio.get_running_loop()
        if args.control_fd is not None:
            from router.process.supervisor_link import SupervisorLink

            link = SupervisorLink(args.control_fd, [state.dispatcher for state in registry.states])
            await link.start()

    async def on_shutdown(registry: ModelRegistry) -> None:
        if link is not None:
            await link.close()

    router_index = args.router_index
    if not 0 <= router_index < config.server.router_processes:
        raise ConfigError(f"--router-index {router_index} is outside server.router_processes")
    app = create_app(config, on_startup=on_startup, on_shutdown=on_shutdown, router=router_index)

    def cut_off_stragglers() -> None:
        """The drain timeout ran out: end what is still running with an error (an SSE error event for
        streams) instead of letting the server cut the connections mid-body."""
        for state in app.state.registry.states:
            state.dispatcher.fail_all(
                503, "service_unavailable", "the server is shutting down and its drain timeout ran out"
            )

    class DrainingServer(uvicorn.Server):
        """uvicorn re-raises SIGTERM after its graceful shutdown; a drained service should exit 0."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            signals = (signal.SIGINT, signal.SIGTERM)
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started:  # one line that says where to send requests (workers may still be loading)
                host = config.server.host
                pools = config.pools()
                log.info(
                    "router listening on http://%s:%d/v1 for %s; workers connect to %s",
                    f"[{host}]" if ":" in host else host,
                    config.server.port,
                    ", ".join(pool.model.served_name for pool in pools),
                    ", ".join(f"{pool.requests_endpoint()} + {pool.results_endpoint()}" for pool in pools),
                )

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if not self.should_exit and loop is not None:
                loop.call_soon_threadsafe(loop.call_later, drain_seconds, cut_off_stragglers)
            super().handle_exit(sig, frame)

    server = DrainingServer(
        uvicorn.Config(
            app,
            host=config.server.host,
            port=config.server.port,
            log_level="warning",
            ws_max_size=config.server.max_request_bytes,
            # A backstop only: streams still running at the drain timeout were already ended above.
            timeout_graceful_shutdown=drain_seconds + 2.0,  # type: ignore[arg-type]
        )
    )
    sockets = None
    if config.server.router_processes > 1:  # the router processes share the port; the kernel spreads
        try:  # connections over them
            sockets = [_shared_listener(config.server.host, config.server.port)]
        except OSError as error:
            log.error("cannot listen on %s:%d: %s", config.server.host, config.server.port, error)
            return ROUTER_START_FAILED
    server.run(sockets=sockets)
    return 0 if server.started else ROUTER_START_FAILED


def _shared_listener(host: str, port: int) -> socket.socket:
    """A listening socket with SO_REUSEPORT, so that every router process can bind the same port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.command)
    try:
        if args.command == "keys":
            return _write_keys(args.dir, args.workers)
        if args.command == "worker":
            config = load_config(args.config).pool(args.model)
            if config.workers.simulate is not None:
                from worker.simulator import run_simulator

                return run_simulator(config, args.index)
            from shared.threads import tune_openmp

            tune_openmp()  # before llama_cpp loads libgomp
            from worker.main import run_worker

            return run_worker(config, args.index)
        if args.command == "serve":
            return _serve(args)
        if args.command == "check":
            from shared.check import run_check

            config = load_config(args.config)
            if args.role == "worker" and args.model is not None:
                config = config.pool(args.model)
            return run_check(config, args.role, args.index)
        return _run_router(args)
    except ConfigError as error:
        print(f"llamafleet: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
