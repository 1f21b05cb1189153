"""Router capacity on simulated workers: `python -m bench.router_capacity` (part of `make bench`).

With eight GPUs each streaming thousands of tokens per second, the router's CPU per streamed token can cap
the service. This starts the real service (supervisor, router) with `workers.simulate` workers (16 slots,
10 ms per token, SmolLM2's vocabulary) and drives it from a separate client process
(bench/capacity_client.py: raw asyncio sockets, so the client's CPU is not the router's) with 64 to 1024
concurrent streaming /v1/completions clients of 64 tokens each. Per run it reports:

- streamed tokens/s, and its ratio to what the simulated workers can produce (min(clients, slots) x 100/s),
  the baseline of the same run;
- the router process's CPU (utime + stime from /proc/PID/stat) per streamed token, in microseconds;
- the latency the router adds per token, p50 and p99: each token's client receive time minus the time the
  simulated worker sent it (the simulators' `trace_path` files; CLOCK_MONOTONIC is shared by processes).

The machine's cores are shared by the router, the simulators and the client, so tokens/s and latency are
noisy where the cores run out; CPU per token is the router's alone.

BEFORE (commit 689754d: plain uvicorn, stdlib json per chunk, one queue item per token; 2 cores shared with
the simulators, the client and other work; 4 s windows):

    | workers | clients | tokens/s | /ideal | CPU us/token | router cores | added p50 ms | added p99 ms |
    |   1 |    64 |  1579 | 0.99 | 64.9 | 0.10 |    1.19 |   31.82 |
    |   1 |   256 |  1568 | 0.98 | 67.0 | 0.10 |    1.29 |    8.71 |
    |   1 |  1024 |  1609 | 1.01 | 65.3 | 0.10 |    1.37 |   53.00 |
    |   4 |    64 |  6228 | 0.97 | 55.4 | 0.34 |    3.39 |   17.59 |
    |   4 |   256 |  6184 | 0.97 | 58.6 | 0.36 |    2.12 |   40.43 |
    |   4 |  1024 |  6146 | 0.96 | 53.3 | 0.33 |    9.15 |  701.36 |
    |  16 |    64 |  5470 | 0.85 | 52.1 | 0.28 |   24.62 |  129.36 |
    |  16 |   256 | 14130 | 0.55 | 34.0 | 0.48 |  150.91 | 1111.64 |
    |  16 |  1024 | 18142 | 0.71 | 26.7 | 0.48 | 1324.33 | 2759.22 |

(At 16 workers the two cores run out: the router gets about half a core.)

BEFORE / AFTER interleaved in one session (load average 13-15 on the 2 cores from other work, so the router
got a quarter of a core; BEFORE is commit 689754d run with uvicorn's asyncio loop and h11, AFTER this
branch: msgspec chunks with the envelope encoded once per stream, histogram children looked up once,
frames read in bursts, gc.freeze after start-up, uvloop + httptools):

    | workers | clients | BEFORE tok/s | us/token | p50 / p99 ms   | AFTER tok/s | us/token | p50 / p99 ms  |
    |   1 |    64 |  1410 | 67.4 |   5.1 /  706 |  1577 | 38.0 |   1.0 /   11 |
    |   1 |   256 |  1564 | 52.8 |   8.5 /  533 |  1540 | 47.1 |   1.7 /   13 |
    |   1 |  1024 |    85 |   -- | (1024 failed; a rerun: none) |  1743 | 64.5 | 5.3 / 903 |
    |   4 |    64 |  5705 | 45.1 |  16.2 /   95 |  5765 | 38.6 |  11.9 /   91 |
    |   4 |   256 |  5486 | 46.0 |  22.1 /  116 |  6270 | 31.1 |   7.2 /   94 |
    |   4 |  1024 |  6138 | 44.8 |   473 / 1159 |  6634 | 41.5 |  18.9 /  876 |
    |  16 |    64 |  4288 | 42.6 |   137 /  600 |  5782 | 43.7 |  11.4 /   61 |
    |  16 |   256 |  9160 | 30.0 |   589 / 1539 | 13178 | 25.4 |   144 /  472 |
    |  16 |  1024 |  5182 | 44.9 |  1786 / 2848 | 13458 | 18.0 |  2219 / 2741 |
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.fixtures.tiny_models import smollm2_gguf_path
from tests.integration.server import REPO, Server, child_pids, model_config, run_server

ITL_MS = 10.0
SLOTS = 16
MAX_TOKENS = 64


@dataclass
class Run:
    workers: int
    clients: int
    tokens_per_s: float
    ideal_per_s: float
    cpu_us_per_token: float
    router_cpu: float  # cores
    added_p50_ms: float
    added_p99_ms: float
    failures: int

    def row(self) -> str:
        return (
            f"| {self.workers:3d} | {self.clients:5d} | {self.tokens_per_s:9.0f} | "
            f"{self.tokens_per_s / self.ideal_per_s:5.2f} | {self.cpu_us_per_token:7.1f} | "
            f"{self.router_cpu:5.2f} | {self.added_p50_ms:7.2f} | {self.added_p99_ms:7.2f} | "
            f"{self.failures} |"
        )


HEADER = (
    "| workers | clients | tokens/s | /ideal | router CPU us/token | router cores | added p50 ms | "
    "added p99 ms | failed |\n|---|---|---|---|---|---|---|---|---|"
)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _read_traces(trace: Path) -> dict[str, list[int]]:
    """Send times per request-id prefix (the client's x-request-id), in the order the worker sent them."""
    sent: dict[str, list[int]] = {}
    for path in trace.parent.glob(trace.name + ".*"):
        for line in path.read_text().splitlines():
            at, rid, count = line.split()
            times = sent.setdefault(rid.split("-", 1)[0], [])
            times.extend([int(at)] * int(count))
    return sent


@dataclass
class _Client:
    workers: int
    clients: int
    result: dict[str, object]


def _drive(server: Server, workers: int, clients: int, seconds: float, tag: str) -> _Client:
    routers = child_pids(server.process.pid, "router")
    assert routers
    port = server.base_url.rsplit(":", 1)[1]
    command = [
        sys.executable,
        "-m",
        "bench.capacity_client",
        "--port",
        port,
        "--api-key",
        server.api_key,
        "--clients",
        str(clients),
        "--max-tokens",
        str(MAX_TOKENS),
        "--seconds",
        str(seconds),
        "--router-pid",
        ",".join(map(str, routers)),
        "--tag",
        tag,
    ]
    out = subprocess.run(command, cwd=REPO, capture_output=True, check=True, text=True)
    return _Client(workers, clients, json.loads(out.stdout))


def _summarise(client: _Client, sent: dict[str, list[int]]) -> Run:
    result = client.result
    window: list[int] = result["window"]  # type: ignore[assignment]
    start, end = window
    events: dict[str, list[int]] = result["events"]  # type: ignore[assignment]
    tokens = 0
    added: list[float] = []
    for prefix, received in events.items():
        origin = sent.get(prefix, [])
        for k, at in enumerate(received):
            if start <= at < end:
                tokens += 1
                if k < len(origin):
                    added.append((at - origin[k]) / 1e6)
    seconds = (end - start) / 1e9
    cpu = float(result["router_ticks"]) / float(result["tick_hz"])  # type: ignore[arg-type]
    ideal = min(client.clients, client.workers * SLOTS) * 1000.0 / ITL_MS
    return Run(
        client.workers,
        client.clients,
        tokens / seconds,
        ideal,
        cpu * 1e6 / max(tokens, 1),
        cpu / seconds,
        _percentile(added, 0.5),
        _percentile(added, 0.99),
        int(result["failures"]),  # type: ignore[call-overload]
    )


def measure(
    workers: int, clients: list[int], seconds: float, server_options: dict[str, object] | None = None
) -> Iterator[Run]:
    folder = Path(tempfile.mkdtemp(prefix="lf-cap-"))
    trace = folder / "trace"
    model = model_config(smollm2_gguf_path(), n_ctx=4096)
    simulate = {"ttft_ms": ITL_MS, "itl_ms": ITL_MS, "slots": SLOTS, "trace_path": str(trace)}
    options = {"max_queued_requests": 4096, **(server_options or {})}
    runs: list[_Client] = []
    with run_server(model, server=options, workers={"count": workers, "simulate": simulate}) as server:
        for count in clients:
            runs.append(_drive(server, workers, count, seconds, f"w{workers}n{count}"))
    sent = _read_traces(trace)  # complete once the simulators stopped and flushed
    for client in runs:
        yield _summarise(client, sent)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", default="1,4,16", help="simulated worker counts (comma-separated)")
    parser.add_argument("--clients", default="64,256,1024", help="concurrent streaming clients")
    parser.add_argument("--seconds", type=float, default=4.0, help="measured window per run")
    parser.add_argument("--router-processes", type=int, default=0, help="server.router_processes (0: unset)")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    options: dict[str, object] = {}
    if args.router_processes:
        options["router_processes"] = args.router_processes
    print(HEADER, flush=True)
    for workers in (int(w) for w in args.workers.split(",")):
        clients = [int(c) for c in args.clients.split(",")]
        for run in measure(workers, clients, args.seconds, options):
            print(run.row(), flush=True)


if __name__ == "__main__":
    main()
