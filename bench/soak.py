"""`make soak`: minutes of mixed traffic at the server's capacity, then the bars a service must meet.

It starts `llamafleet serve` on a temporary copy of the packaged default config (ephemeral port, an API
key, embeddings from the generation model), runs `concurrency` clients (the config's `n_seq_max`) that
each pick request kinds at random (bench/soak_traffic.py: chat, completions, structured output, tool
calls, embeddings, Responses over HTTP and WebSocket, cancellations, bad requests) until the time is up,
and samples the router's and workers' RSS and open file descriptors from /proc meanwhile.

Bars (exit status 1 if any fails): no failed request beyond intended 4xx / 429; RSS slope after warm-up
under `--max-slope` MB/min per process; no process restart; after the load every `/metrics` gauge back to
idle (no leaked sequence, KV cell or reservation); file descriptors not grown; no traceback in the log;
a clean exit 0 on SIGTERM.

    SOAK_SECONDS=90 python -m bench.soak     # or: make soak SOAK_SECONDS=90
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.gauges import parse_metrics, wait_idle
from bench.soak_traffic import KINDS, Context, run_kind

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Record:
    kind: str
    status: str
    seconds: float
    problem: str | None


@dataclass
class ProcessSeries:
    """RSS (MB) over time and open file descriptors of one process."""

    name: str
    pid: int
    times: list[float] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def children(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task")
    found: list[int] = []
    for task in tasks.iterdir():
        with contextlib.suppress(OSError):
            found.extend(int(p) for p in (task / "children").read_text().split())
    return sorted(found)


def service_processes(root: int) -> dict[str, int]:
    """`serve` and its descendants by role: "router" (the serve process itself unless the router runs as
    a child of its own, then "supervisor" too) and "worker<index>"."""
    found: dict[str, int] = {}
    pending = [root]
    while pending:
        pid = pending.pop()
        pending.extend(children(pid))
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
            if "worker" in argv:
                index = argv[argv.index("--index") + 1] if "--index" in argv else str(len(found))
                found[f"worker{index}"] = pid
            elif "router" in argv:
                found["router"] = pid
            elif pid != root:
                found[f"child{pid}"] = pid
    found["router" if "router" not in found else "supervisor"] = root
    return dict(sorted(found.items()))


def slope_mb_per_min(times: list[float], values: list[float]) -> float:
    """Least-squares slope of values over times (seconds), in units per minute."""
    if len(times) < 3:
        return 0.0
    mean_t, mean_v = statistics.fmean(times), statistics.fmean(values)
    var = sum((t - mean_t) ** 2 for t in times)
    cov = sum((t - mean_t) * (v - mean_v) for t, v in zip(times, values, strict=True))
    return cov / var * 60 if var else 0.0


@contextlib.contextmanager
def serve(config_path: Path, api_key: str, port: int) -> Iterator[tuple[subprocess.Popen[bytes], Path, str]]:
    """Runs `llamafleet serve` on a temporary copy of the config; yields (process, log, base URL)."""
    config = json.loads(config_path.read_text())
    run_dir = Path(tempfile.mkdtemp(prefix="lf-soak-"))
    config.setdefault("server", {}).update(host="127.0.0.1", port=port, api_key=api_key)
    config.setdefault("model", {}).setdefault("embedding_pooling", "mean")
    config.setdefault("workers", {}).update(
        requests_endpoint=f"ipc://{run_dir}/req.sock", results_endpoint=f"ipc://{run_dir}/res.sock"
    )
    path = run_dir / "config.json"
    path.write_text(json.dumps(config))
    log_path = run_dir / "server.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "shared.cli", "serve", "-C", str(path)],
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600  # the first run assembles the packaged model
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"the server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base_url}/healthz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError("the server did not become healthy in 600 s")
            time.sleep(0.2)
        yield process, log_path, base_url
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(90)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


class Soak:
    def __init__(
        self, args: argparse.Namespace, base_url: str, api_key: str, model: str, n_seq_max: int
    ) -> None:
        self.args = args
        self.base_url = base_url
        self.api_key = api_key
        self.model = model
        self.n_seq_max = n_seq_max
        self.records: list[Record] = []
        self.series: list[ProcessSeries] = []
        self.notes: list[str] = []

    def _client(self) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=self.args.concurrency * 2 + 4)
        headers = {"Authorization": f"Bearer {self.api_key}"}
        return httpx.AsyncClient(base_url=self.base_url, timeout=120, limits=limits, headers=headers)

    def _context(self, http: httpx.AsyncClient, seed: int) -> Context:
        ws_url = self.base_url.replace("http://", "ws://") + "/v1/responses"
        return Context(http, ws_url, self.api_key, self.model, random.Random(seed), self.args.penalties)

    async def warm_up(self) -> None:
        """One request of every kind, one at a time, so lazily opened files and caches exist before the
        baseline file descriptor count is taken. (The KV cache needs no warming: llama.cpp clears its
        buffers when it creates the context, so their pages are resident from the start.)"""
        async with self._client() as http:
            ctx = self._context(http, self.args.seed)
            for name in self.args.kinds:
                started = time.monotonic()
                status, problem = await run_kind(name, ctx)
                self.records.append(Record(name, status, time.monotonic() - started, problem))

    async def _client_loop(self, http: httpx.AsyncClient, index: int, until: float) -> None:
        ctx = self._context(http, self.args.seed * 1000 + index)
        names = self.args.kinds
        weights = [KINDS[name][1] for name in names]
        for _ in range(1_000_000):  # bounded; the clock ends it
            if time.monotonic() >= until:
                return
            name = ctx.rng.choices(names, weights)[0]
            started = time.monotonic()
            status, problem = await run_kind(name, ctx)
            self.records.append(Record(name, status, time.monotonic() - started, problem))

    async def _sample(self, started: float, until: float, pids: dict[str, int]) -> None:
        self.series = [ProcessSeries(name, pid) for name, pid in pids.items()]
        interval = min(5.0, max(1.0, self.args.seconds / 60))
        while True:
            now = time.monotonic()
            for series in self.series:
                try:
                    rss, fds = rss_mb(series.pid), fd_count(series.pid)
                except OSError:
                    self.notes.append(f"{series.name} (pid {series.pid}) vanished at {now - started:.0f} s")
                    continue
                series.times.append(now - started)
                series.rss_mb.append(rss)
                series.fds.append(fds)
            if now >= until:
                return
            await asyncio.sleep(min(interval, max(0.0, until - now)))

    async def load(self, pids: dict[str, int]) -> float:
        started = time.monotonic()
        until = started + self.args.seconds
        async with self._client() as http:
            await asyncio.gather(
                self._sample(started, until, pids),
                *(self._client_loop(http, i, until) for i in range(self.args.concurrency)),
            )
        return time.monotonic() - started


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def report(
    soak: Soak, took: float, fds_start: dict[str, int], fds_end: dict[str, int]
) -> list[tuple[str, bool, str]]:
    """Prints the tables; returns the bars as (name, passed, figures)."""
    by_kind: dict[str, list[Record]] = defaultdict(list)
    for record in soak.records:
        by_kind[record.kind].append(record)
    print(
        f"\nsoak: {len(soak.records)} requests ({len(soak.args.kinds)} in the warm-up) in {took:.0f} s, "
        f"{soak.args.concurrency} clients"
    )
    print(f"{'kind':<14} {'requests':>8} {'failed':>6} {'p50 s':>6} {'p99 s':>6}  statuses")
    for kind in soak.args.kinds:
        records = by_kind.get(kind, [])
        statuses = Counter(r.status for r in records)
        failed = sum(1 for r in records if r.problem)
        seconds = [r.seconds for r in records if r.status == "200"]
        print(
            f"{kind:<14} {len(records):>8} {failed:>6} "
            f"{_pct(seconds, 0.5):>6.2f} {_pct(seconds, 0.99):>6.2f}  "
            + " ".join(f"{s}:{n}" for s, n in sorted(statuses.items()))
        )
    warm_up = min(120.0, max(10.0, took * 0.2))
    print(f"\n{'process':<10} {'pid':>7} {'RSS start':>9} {'RSS end':>8} {'MB/min':>7} {'fds':>9}")
    slopes: dict[str, float] = {}
    for series in soak.series:
        kept = [(t, v) for t, v in zip(series.times, series.rss_mb, strict=True) if t >= warm_up]
        slopes[series.name] = slope_mb_per_min([t for t, _ in kept], [v for _, v in kept])
        print(
            f"{series.name:<10} {series.pid:>7} {series.rss_mb[0] if series.rss_mb else 0:>9.1f} "
            f"{series.rss_mb[-1] if series.rss_mb else 0:>8.1f} {slopes[series.name]:>+7.2f} "
            f"{fds_start.get(series.name, 0):>4} -> {fds_end.get(series.name, 0):<4}"
        )
        step = max(1, len(series.rss_mb) // 12)
        points = list(zip(series.times, series.rss_mb, strict=True))[::step]
        trace = " ".join(f"{t:.0f}s:{v:.0f}" for t, v in points)
        print(f"{'':<10} RSS MB over time: {trace}")
    print(f"(RSS slope: least squares over samples after the first {warm_up:.0f} s)")
    problems = [r for r in soak.records if r.problem]
    for record in problems[:10]:
        print(f"  FAILED {record.kind} [{record.status}]: {record.problem}")
    for note in soak.notes[:10]:
        print(f"  note: {note}")
    grown = {n: fds_end.get(n, 0) - fds_start[n] for n in fds_start if fds_end.get(n, 0) > fds_start[n]}
    worst = max(slopes.items(), key=lambda item: item[1], default=("-", 0.0))
    measured = took - warm_up >= 60  # a slope over less is noise
    return [
        ("no failed requests (beyond intended 4xx / 429)", not problems, f"{len(problems)} failed"),
        (
            f"RSS slope < {soak.args.max_slope} MB/min",
            worst[1] < soak.args.max_slope or not measured,
            f"{worst[0]} {worst[1]:+.2f}" if measured else "not judged: under 60 s after the warm-up",
        ),
        ("file descriptors not grown", not grown, str(grown or "")),
    ]


async def run(args: argparse.Namespace) -> int:
    config_path = Path(args.config)
    config = json.loads(config_path.read_text())
    n_seq_max = int(config["model"].get("n_seq_max", 1))
    args.concurrency = args.concurrency or n_seq_max
    api_key = secrets.token_urlsafe(16)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    with serve(config_path, api_key, port) as (process, log_path, base_url):
        model = config["model"].get("alias") or "model"
        soak = Soak(args, base_url, api_key, model, n_seq_max)
        print(f"soak: {args.seconds:.0f} s, {args.concurrency} clients, {config_path} on {base_url}")
        print(f"server log: {log_path}")
        await soak.warm_up()
        pids = service_processes(process.pid)
        fds_start = {name: fd_count(pid) for name, pid in pids.items()}
        took = await soak.load(pids)
        idle_problems = await asyncio.to_thread(wait_idle, base_url, n_seq_max, 30.0)
        await asyncio.sleep(1.0)  # closed client connections are closed on the server side too
        fds_end = {name: fd_count(pid) for name, pid in pids.items() if Path(f"/proc/{pid}").exists()}
        try:
            samples: dict[str, float] | None = parse_metrics(
                httpx.get(f"{base_url}/metrics", timeout=10).text
            )
        except httpx.HTTPError as error:
            samples = None
            soak.notes.append(f"the last /metrics scrape failed: {error!r}")
        bars = report(soak, took, fds_start, fds_end)
        pids_now = service_processes(process.pid)
        bars += [
            (
                "gauges back to idle (no leaked sequences / KV cells)",
                not idle_problems,
                "; ".join(idle_problems),
            ),
            ("no process restart", pids_now == pids, "" if pids_now == pids else f"{pids} -> {pids_now}"),
            (
                "no decode failures in /metrics",
                samples is not None and not any(v for k, v in samples.items() if "decode_failures" in k),
                "" if samples is not None else "no final scrape",
            ),
        ]
    code = process.returncode
    log = log_path.read_text(errors="replace")
    tracebacks = log.count("Traceback")
    bars += [
        ("clean exit 0 on SIGTERM", code == 0, f"exit {code}"),
        ("no traceback in the server log", tracebacks == 0, f"{tracebacks} (see {log_path})"),
    ]
    print()
    for name, passed, figures in bars:
        print(f"{'PASS' if passed else 'FAIL'}  {name}" + (f"  [{figures}]" if figures else ""))
    if all(passed for _, passed, _ in bars):
        shutil.rmtree(log_path.parent, ignore_errors=True)
        return 0
    print(f"server log kept: {log_path}")
    return 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("SOAK_SECONDS", "600")))
    parser.add_argument("--concurrency", type=int, default=int(os.environ.get("SOAK_CONCURRENCY", "0")))
    parser.add_argument("--config", default=os.environ.get("SOAK_CONFIG", str(REPO / "configs/default.json")))
    parser.add_argument("--max-slope", type=float, default=float(os.environ.get("SOAK_MAX_SLOPE", "2.0")))
    parser.add_argument("--seed", type=int, default=int(os.environ.get("SOAK_SEED", "1")))
    parser.add_argument(
        "--penalties",
        action="store_true",
        default=os.environ.get("SOAK_PENALTIES", "") == "1",
        help="also send frequency / presence penalties",
    )
    parser.add_argument(
        "--kinds",
        default=os.environ.get("SOAK_KINDS", ",".join(KINDS)),
        help=f"comma-separated request kinds (default all: {','.join(KINDS)})",
    )
    args = parser.parse_args()
    args.kinds = [kind for kind in args.kinds.split(",") if kind]
    unknown = [kind for kind in args.kinds if kind not in KINDS]
    if unknown or not args.kinds:
        parser.error(f"unknown kinds {unknown}; choose from {', '.join(KINDS)}")
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
