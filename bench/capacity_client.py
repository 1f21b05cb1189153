"""The router capacity benchmark's load generator, run as its own process (`python -m bench.capacity_client`)
so its CPU is not the router's: N keep-alive connections on raw asyncio sockets, each streaming one
completion after another, recording when every token event arrives.

It samples the router process's CPU time (/proc/PID/stat) at the start and end of the measured window and
prints one JSON object: the window, the router's CPU ticks in it, and each request's id prefix (sent as
`x-request-id`, so the router's request ids start with it) with its token receive times.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time


def cpu_ticks(pids: list[int]) -> tuple[int, int]:
    """(utime, stime) of processes together, in clock ticks."""
    user = system = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as file:
            fields = file.read().rpartition(")")[2].split()
        user += int(fields[11])  # fields 14 and 15 of stat(5), counted after the comm
        system += int(fields[12])
    return user, system


class Connection:
    def __init__(self, host: str, port: int, headers: str) -> None:
        self.host = host
        self.port = port
        self.headers = headers
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, body: bytes, prefix: str, times: list[int]) -> int:
        """POSTs one streaming completion; appends a receive time per non-empty token event; returns the
        HTTP status."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(
            (
                f"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                f"x-request-id: {prefix}\r\n{self.headers}Content-Length: {len(body)}\r\n\r\n"
            ).encode()
            + body
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if b"chunked" not in head.lower():
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await self.reader.readexactly(length)
            return status
        pending = b""
        while True:
            size = int((await self.reader.readuntil(b"\r\n"))[:-2], 16)
            data = await self.reader.readexactly(size + 2)
            if size == 0:
                return status
            now = time.monotonic_ns()
            pending += data[:-2]
            while b"\n\n" in pending:
                event, pending = pending.split(b"\n\n", 1)
                if event.startswith(b"data: {") and b'"text":""' not in event:
                    times.append(now)


async def run(args: argparse.Namespace) -> dict[str, object]:
    headers = f"Authorization: Bearer {args.api_key}\r\n" if args.api_key else ""
    body = json.dumps(
        {"model": args.model, "prompt": args.prompt, "max_tokens": args.max_tokens, "stream": True}
    ).encode()
    routers = [int(pid) for pid in args.router_pid.split(",")]
    started = time.monotonic_ns()
    window_start = started + int(args.warmup * 1e9)
    window_end = window_start + int(args.seconds * 1e9)
    events: dict[str, list[int]] = {}
    failures = 0
    statuses: dict[int, int] = {}
    ticks: list[tuple[int, int]] = []

    async def client(index: int) -> None:
        nonlocal failures
        connection = Connection(args.host, args.port, headers)
        sequence = 0
        try:
            while time.monotonic_ns() < window_end:
                prefix = f"{args.tag}c{index}q{sequence}"
                sequence += 1
                times = events.setdefault(prefix, [])
                status = await connection.request(body, prefix, times)
                if status != 200:
                    failures += 1
                    statuses[status] = statuses.get(status, 0) + 1
        finally:
            if connection.writer is not None:
                connection.writer.close()

    async def sample() -> None:
        await asyncio.sleep(max(0.0, (window_start - time.monotonic_ns()) / 1e9))
        ticks.append(cpu_ticks(routers))
        await asyncio.sleep(max(0.0, (window_end - time.monotonic_ns()) / 1e9))
        ticks.append(cpu_ticks(routers))

    clients = [asyncio.ensure_future(client(i)) for i in range(args.clients)]
    await sample()
    # The window is over: drop every stream still open (the router cancels them), as a client gone away.
    for task in clients:
        task.cancel()
    await asyncio.gather(*clients, return_exceptions=True)
    return {
        "window": [window_start, window_end],
        "router_ticks": sum(ticks[1]) - sum(ticks[0]),
        "router_system_ticks": ticks[1][1] - ticks[0][1],
        "tick_hz": os.sysconf("SC_CLK_TCK"),
        "failures": failures,
        "failed_statuses": statuses,
        "events": events,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--api-key", default="")
    parser.add_argument("--model", default="test-model")
    parser.add_argument("--prompt", default="Hello")
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--warmup", type=float, default=1.5)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--router-pid", required=True, help="router process ids, comma-separated")
    parser.add_argument("--tag", default="b")
    args = parser.parse_args(argv)
    json.dump(asyncio.run(run(args)), sys.stdout)


if __name__ == "__main__":
    main()
