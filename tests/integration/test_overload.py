"""Overload: twelve times more concurrent clients than the worker has sequences.

A service is judged by its worst minute: past its bounded queue it must answer 429 at once (OpenAI's error
JSON, with `Retry-After`), everyone it admits must get a whole answer in bounded time, `/healthz` and
`/metrics` must stay responsive throughout, and every gauge must return to idle afterwards.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.gauges import highest, parse_metrics, wait_idle
from tests.integration.server import Server, model_config, run_server

N_SEQ = 4
MAX_QUEUED = 8
CLIENTS = 48
LOAD_SECONDS = 6.0
MAX_TOKENS = 256
QUEUED = "llamafleet_worker_queued_requests"
RUNNING = "llamafleet_worker_running_sequences"
WORKER_IN_FLIGHT = "llamafleet_worker_in_flight_requests"


@dataclass
class Outcome:
    status: int  # 0: no HTTP answer
    seconds: float
    problem: str | None = None
    retry_after: str | None = None


@dataclass
class Probe:
    """What the poller saw while the load ran."""

    max_queued: float = 0.0
    max_running: float = 0.0
    max_in_flight: float = 0.0
    latencies: dict[str, list[float]] = field(default_factory=lambda: {"/healthz": [], "/metrics": []})
    failures: list[str] = field(default_factory=list)


def _request(index: int, round_no: int) -> tuple[str, dict[str, Any]]:
    """Alternates chat / completions and streaming / not; every answer is exactly MAX_TOKENS tokens."""
    body: dict[str, Any] = {"max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0}
    body["stream"] = (index + round_no) % 2 == 0
    if index % 4 < 2:
        body["messages"] = [{"role": "user", "content": f"client {index} round {round_no}: hello"}]
        return "/v1/chat/completions", body
    body["prompt"] = f"client {index} round {round_no}: once upon a time"
    return "/v1/completions", body


def _check_stream(lines: list[str]) -> str | None:
    events = [line[len("data: ") :] for line in lines if line.startswith("data: ")]
    if not events or events[-1] != "[DONE]":
        return f"stream did not end with [DONE]: {events[-2:]}"
    chunks = [json.loads(event) for event in events[:-1]]
    errors = [chunk for chunk in chunks if "error" in chunk]
    if errors:
        return f"stream error event: {errors[0]}"
    finishes = [
        c["finish_reason"] for chunk in chunks for c in chunk.get("choices", []) if c["finish_reason"]
    ]
    return None if finishes == ["length"] else f"stream finish reasons {finishes}"


def _check_whole(body: dict[str, Any]) -> str | None:
    choice = body["choices"][0]
    if choice["finish_reason"] != "length" or body["usage"]["completion_tokens"] != MAX_TOKENS:
        return f"incomplete answer: {choice['finish_reason']}, {body['usage']}"
    return None


def _check_429(response: httpx.Response) -> str | None:
    error = response.json().get("error") or {}
    if error.get("type") != "rate_limit_error" or not error.get("message"):
        return f"429 without OpenAI's error JSON: {response.text[:200]}"
    return None


async def _one(http: httpx.AsyncClient, index: int, round_no: int) -> Outcome:
    path, body = _request(index, round_no)
    started = time.monotonic()
    try:
        async with http.stream("POST", path, json=body) as response:
            if response.status_code == 200 and body["stream"]:
                problem = _check_stream([line async for line in response.aiter_lines()])
            else:
                await response.aread()
                if response.status_code == 200:
                    problem = _check_whole(response.json())
                elif response.status_code == 429:
                    problem = _check_429(response)
                else:
                    problem = f"unexpected {response.status_code}: {response.text[:200]}"
            return Outcome(
                response.status_code,
                time.monotonic() - started,
                problem,
                response.headers.get("retry-after"),
            )
    except (httpx.HTTPError, ValueError, KeyError) as error:
        return Outcome(0, time.monotonic() - started, f"{path}: {error!r}")


async def _client(http: httpx.AsyncClient, index: int, until: float) -> list[Outcome]:
    outcomes: list[Outcome] = []
    for round_no in range(1000):  # bounded; the clock ends it long before
        if time.monotonic() >= until:
            break
        outcome = await _one(http, index, round_no)
        outcomes.append(outcome)
        if outcome.status == 429:
            await asyncio.sleep(0.02)  # an impatient client: retry almost at once
    return outcomes


async def _load(server: Server) -> list[Outcome]:
    until = time.monotonic() + LOAD_SECONDS
    limits = httpx.Limits(max_connections=CLIENTS + 8, max_keepalive_connections=CLIENTS + 8)
    headers = {"Authorization": f"Bearer {server.api_key}"}
    async with httpx.AsyncClient(
        base_url=server.base_url, timeout=60, limits=limits, headers=headers
    ) as http:
        per_client = await asyncio.gather(*(_client(http, i, until) for i in range(CLIENTS)))
    return [outcome for outcomes in per_client for outcome in outcomes]


def _poll(server: Server, probe: Probe, stop: threading.Event) -> None:
    """/healthz and /metrics side by side with the load, from another thread (and connection)."""
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        while not stop.is_set():
            for path in ("/healthz", "/metrics"):
                started = time.perf_counter()
                try:
                    response = http.get(path)
                except httpx.HTTPError as error:
                    probe.failures.append(f"{path}: {error!r}")
                    continue
                probe.latencies[path].append(time.perf_counter() - started)
                if response.status_code != 200:
                    probe.failures.append(f"{path}: {response.status_code}")
                elif path == "/metrics":
                    samples = parse_metrics(response.text)
                    probe.max_queued = max(probe.max_queued, highest(samples, QUEUED))
                    probe.max_running = max(probe.max_running, highest(samples, RUNNING))
                    probe.max_in_flight = max(probe.max_in_flight, highest(samples, WORKER_IN_FLIGHT))
            stop.wait(0.05)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def test_overload_is_bounded_and_recovers(tiny_llama_gguf: Path) -> None:
    model = model_config(tiny_llama_gguf, n_seq_max=N_SEQ)
    with run_server(model, server={"max_queued_requests": MAX_QUEUED}) as server:
        probe, stop = Probe(), threading.Event()
        poller = threading.Thread(target=_poll, args=(server, probe, stop), daemon=True)
        poller.start()
        started = time.monotonic()
        try:
            outcomes = asyncio.run(_load(server))
        finally:
            stop.set()
            poller.join(30)
        took = time.monotonic() - started
        idle_problems = wait_idle(server.base_url, N_SEQ)

    admitted = [o.seconds for o in outcomes if o.status == 200]
    rejected = [o for o in outcomes if o.status == 429]
    health, scrape = probe.latencies["/healthz"], probe.latencies["/metrics"]
    print(
        f"\noverload: {CLIENTS} clients x {LOAD_SECONDS:.0f} s ({took:.1f} s) on {N_SEQ} sequences + "
        f"{MAX_QUEUED} queued: {len(outcomes)} requests, {len(admitted)} x 200, {len(rejected)} x 429\n"
        f"  admitted latency p50 {statistics.median(admitted or [0]):.2f} s p99 {_pct(admitted, 0.99):.2f} s"
        f" max {max(admitted, default=0):.2f} s\n"
        f"  /healthz {len(health)} polls max {max(health, default=0) * 1000:.0f} ms p99 "
        f"{_pct(health, 0.99) * 1000:.0f} ms; /metrics max {max(scrape, default=0) * 1000:.0f} ms\n"
        f"  max queued {probe.max_queued:g}, running {probe.max_running:g}, worker in flight "
        f"{probe.max_in_flight:g}"
    )
    problems = [o.problem for o in outcomes if o.problem]
    assert not problems, f"{len(problems)} bad answers, first: {problems[:5]}"
    assert admitted and rejected, "the load must both fill the queue and be served"
    assert probe.max_queued <= MAX_QUEUED and probe.max_running <= N_SEQ
    assert probe.max_in_flight <= N_SEQ + MAX_QUEUED
    assert max(admitted) < 30, "an admitted request took too long"
    assert not probe.failures, probe.failures[:5]
    assert len(health) > 10, "the poller hardly ran"
    # The bar is 100 ms; a loose bound here so a busy CI machine does not flake.
    assert max(health) < 2 and max(scrape) < 2
    assert not idle_problems, idle_problems
    # Last, as it lands separately: every 429 says when to come back.
    missing = [o for o in rejected if not (o.retry_after or "").isdigit()]
    assert not missing, f"{len(missing)} of {len(rejected)} 429s without a Retry-After header"
