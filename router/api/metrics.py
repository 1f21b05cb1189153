"""Prometheus metrics: the router's own request histograms plus each worker's latest heartbeat stats.

Worker stats are exported by a custom collector at scrape time from what the dispatcher last heard, so
`/metrics` shows running/queued sequences and KV cells without the worker serving HTTP itself. Requests
are labelled by the route template they matched (`/v1/chat/completions`), every other path by
`unmatched`, so random paths cannot add series without bound.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from router.client.dispatch import Dispatcher

UNMATCHED = "unmatched"

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48)

# Worker stat name -> (metric name, help, is_counter)
_WORKER_STATS = {
    "running_sequences": (
        "llamafleet_worker_running_sequences",
        "Sequences decoding or prefilling",
        False,
    ),
    "running_requests": ("llamafleet_worker_running_requests", "Requests holding sequences", False),
    "queued_requests": (
        "llamafleet_worker_queued_requests",
        "Requests waiting for a sequence",
        False,
    ),
    "kv_cells_used": ("llamafleet_worker_kv_cells_used", "KV cells holding live tokens", False),
    "kv_cells_reserved": (
        "llamafleet_worker_kv_cells_reserved",
        "KV cells reserved by admission",
        False,
    ),
    "kv_cells_total": ("llamafleet_worker_kv_cells_total", "KV cells of the context", False),
    "seq_ids_free": ("llamafleet_worker_seq_ids_free", "Free llama.cpp sequence ids", False),
    "prompt_tokens_total": ("llamafleet_worker_prompt_tokens", "Prompt tokens admitted", True),
    "generated_tokens_total": ("llamafleet_worker_generated_tokens", "Tokens sampled", True),
    "adapters_loaded": ("llamafleet_worker_lora_adapters_loaded", "LoRA adapters loaded", False),
    "adapter_switches_total": (
        "llamafleet_worker_lora_adapter_switches",
        "Engine steps that ran another LoRA adapter set than the step before",
        True,
    ),
    "steps_total": ("llamafleet_worker_steps", "Engine steps (llama_decode calls)", True),
    "decode_failures_total": (
        "llamafleet_worker_decode_failures",
        "Failed llama_decode calls",
        True,
    ),
    "requests_failed_total": (
        "llamafleet_worker_requests_failed",
        "Requests failed in the worker",
        True,
    ),
    "seq_ids_cached": ("llamafleet_worker_seq_ids_cached", "Sequence ids kept as prefix cache", False),
    "kv_cells_cached": ("llamafleet_worker_kv_cells_cached", "KV cells kept as prefix cache", False),
    "prefix_cache_lookups_total": ("llamafleet_prefix_cache_lookups", "Prefix cache lookups", True),
    "prefix_cache_hits_total": ("llamafleet_prefix_cache_hits", "Prefix cache hits (memory)", True),
    "prefix_cache_reused_tokens_total": (
        "llamafleet_prefix_cache_reused_tokens",
        "Prompt tokens served from the in-memory prefix cache",
        True,
    ),
    "prefix_cache_evictions_total": ("llamafleet_prefix_cache_evictions", "Cached sequences evicted", True),
    "checkpoint_restores_total": (
        "llamafleet_checkpoint_restores",
        "Recurrent-state checkpoints restored from memory",
        True,
    ),
    "checkpoint_bytes": ("llamafleet_checkpoint_bytes", "Bytes of recurrent-state checkpoints", False),
    "disk_cache_lookups_total": ("llamafleet_disk_cache_lookups", "Disk cache lookups", True),
    "disk_cache_restores_total": ("llamafleet_disk_cache_restores", "Prefixes restored from disk", True),
    "disk_cache_restored_tokens_total": (
        "llamafleet_disk_cache_restored_tokens",
        "Prompt tokens served from the disk cache",
        True,
    ),
    "disk_cache_saves_total": ("llamafleet_disk_cache_saves", "Prefixes written to disk", True),
    "disk_cache_save_failures_total": (
        "llamafleet_disk_cache_save_failures",
        "Disk cache saves that failed (disk full, read-only, I/O error)",
        True,
    ),
    "disk_cache_evictions_total": ("llamafleet_disk_cache_evictions", "Disk entries removed by LRU", True),
    "disk_cache_corrupt_removed_total": (
        "llamafleet_disk_cache_invalid_removed",
        "Corrupt or foreign disk entries removed",
        True,
    ),
    "disk_cache_bytes": ("llamafleet_disk_cache_bytes", "Bytes in the disk cache folder", False),
}


class _WorkerCollector(Collector):
    """Every pool's workers in one set of families (one collector: a family may be registered only once)."""

    def __init__(self) -> None:
        self._pools: list[tuple[str, Dispatcher]] = []

    def add(self, dispatcher: Dispatcher, label: str) -> None:
        self._pools.append((label, dispatcher))

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        up = GaugeMetricFamily("llamafleet_worker_up", "1 while the worker is ready", labels=["worker"])
        in_flight = GaugeMetricFamily(
            "llamafleet_worker_in_flight_requests",
            "Requests the router has sent",
            labels=["worker"],
        )
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
        for key, (name, help_text, is_counter) in _WORKER_STATS.items():
            families[key] = (
                CounterMetricFamily(name, help_text, labels=["worker"])
                if is_counter
                else GaugeMetricFamily(name, help_text, labels=["worker"])
            )
        build = GaugeMetricFamily(
            "llamafleet_worker_build_info",
            "1 per ready worker: its llama.cpp backend and devices",
            labels=["worker", "backend", "devices"],
        )
        offloaded = GaugeMetricFamily(
            "llamafleet_worker_offloaded_layers", "Model layers on a GPU", labels=["worker"]
        )
        layers = GaugeMetricFamily(
            "llamafleet_worker_layers", "Model layers (n_layer + output)", labels=["worker"]
        )
        for prefix, dispatcher in self._pools:
            for worker in dispatcher.workers.values():
                label = [f"{prefix}{worker.index}"]
                info = worker.info
                if worker.up and info is not None:
                    build.add_metric([*label, info.backend, "; ".join(info.devices)], 1.0)
                    offloaded.add_metric(label, float(info.offloaded_layers))
                    layers.add_metric(label, float(info.n_layer + 1))
                up.add_metric(label, 1.0 if worker.up else 0.0)
                in_flight.add_metric(label, float(len(worker.in_flight)))
                for key, family in families.items():
                    family.add_metric(label, float(getattr(worker.stats, key)))
        yield up
        yield in_flight
        yield build
        yield offloaded
        yield layers
        yield from families.values()
        yield from _speculation_families(self._pools)
        yield from _adapter_families(self._pools)


def _speculation_families(
    pools: list[tuple[str, Dispatcher]],
) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
    """Speculative decoding: drafted / accepted tokens by provider, by draft position, and steps."""
    drafted = CounterMetricFamily(
        "llamafleet_spec_drafted_tokens", "Draft tokens verified", labels=["worker", "provider"]
    )
    accepted = CounterMetricFamily(
        "llamafleet_spec_accepted_tokens", "Draft tokens accepted", labels=["worker", "provider"]
    )
    drafted_at = CounterMetricFamily(
        "llamafleet_spec_drafted_by_position",
        "Draft tokens verified at each draft position (1: the first)",
        labels=["worker", "position"],
    )
    accepted_at = CounterMetricFamily(
        "llamafleet_spec_accepted_by_position",
        "Draft tokens accepted at each draft position (1: the first)",
        labels=["worker", "position"],
    )
    steps = CounterMetricFamily(
        "llamafleet_spec_steps", "Engine steps in which some sequence speculated", labels=["worker"]
    )
    for prefix, dispatcher in pools:
        for worker in dispatcher.workers.values():
            stats, label = worker.stats, f"{prefix}{worker.index}"
            for provider, count in stats.spec_drafted_tokens_total.items():
                drafted.add_metric([label, provider], float(count))
                taken = stats.spec_accepted_tokens_total.get(provider, 0)
                accepted.add_metric([label, provider], float(taken))
            for position, count in enumerate(stats.spec_drafted_by_position, start=1):
                drafted_at.add_metric([label, str(position)], float(count))
                taken = stats.spec_accepted_by_position[position - 1]
                accepted_at.add_metric([label, str(position)], float(taken))
            steps.add_metric([label], float(stats.spec_steps_total))
    yield from (drafted, accepted, drafted_at, accepted_at, steps)
    yield from _step_cost_families(pools)


def _step_cost_families(pools: list[tuple[str, Dispatcher]]) -> Iterator[GaugeMetricFamily]:
    """The decode step costs speculation chooses draft lengths from, as each worker last measured them."""
    by_rows = GaugeMetricFamily(
        "llamafleet_spec_step_cost_seconds",
        "Seconds of a decode step by its output rows, as the worker measured them (speculation's cost curve)",
        labels=["worker", "rows"],
    )
    overhead = GaugeMetricFamily(
        "llamafleet_spec_step_overhead_seconds",
        "Seconds an engine step spends outside llama_decode (speculation's cost curve)",
        labels=["worker"],
    )
    for prefix, dispatcher in pools:
        for worker in dispatcher.workers.values():
            stats, label = worker.stats, f"{prefix}{worker.index}"
            for rows, seconds in enumerate(stats.spec_step_seconds, start=1):
                by_rows.add_metric([label, str(rows)], seconds)
            if stats.spec_step_seconds:
                overhead.add_metric([label], stats.spec_step_overhead_seconds)
    yield from (by_rows, overhead)


def _adapter_families(pools: list[tuple[str, Dispatcher]]) -> Iterator[CounterMetricFamily]:
    """Requests and generated tokens per LoRA adapter name (`adapter=""`: the base model)."""
    requests = CounterMetricFamily(
        "llamafleet_worker_lora_requests", "Requests admitted, by LoRA adapter", labels=["worker", "adapter"]
    )
    tokens = CounterMetricFamily(
        "llamafleet_worker_lora_generated_tokens",
        "Tokens sampled, by LoRA adapter",
        labels=["worker", "adapter"],
    )
    for prefix, dispatcher in pools:
        for worker in dispatcher.workers.values():
            label = f"{prefix}{worker.index}"
            for name, count in worker.stats.adapter_requests_total.items():
                requests.add_metric([label, name], float(count))
            for name, count in worker.stats.adapter_tokens_total.items():
                tokens.add_metric([label, name], float(count))
    yield from (requests, tokens)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._workers: _WorkerCollector | None = None
        self.requests = Counter(
            "llamafleet_requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "llamafleet_time_to_first_token_seconds",
            "Time to first token",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            "llamafleet_inter_token_latency_seconds",
            "Time between tokens of a stream",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "llamafleet_request_duration_seconds",
            "Whole request time",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.rejected = Counter(
            "llamafleet_requests_rejected",
            "Requests refused before dispatch",
            ["reason"],
            registry=self.registry,
        )
        self.budget_closed = Counter(
            "llamafleet_structured_budget_closed",
            "Grammar-constrained choices steered onto a complete document by their token budget",
            ["endpoint"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "llamafleet_router_in_flight_requests",
            "Requests being served by the router",
            registry=self.registry,
        )

        # Which of `server.router_processes` answered this scrape (each router process has its own metrics).
        self.router = Gauge(
            "llamafleet_router_process",
            "1, labelled with this router process's index (server.router_processes)",
            ["router"],
            registry=self.registry,
        )

    def attach(self, dispatcher: Dispatcher, label: str = "") -> None:
        """Adds a pool's workers to /metrics, labelled `worker="<label><index>"`."""
        if self._workers is None:
            self._workers = _WorkerCollector()
            self.registry.register(self._workers)
        self._workers.add(dispatcher, label)
        self.router.labels(str(dispatcher.router_index)).set(1)


def route_label(request: Request) -> str:
    """The route template a request matched (routing records it in the scope), else `unmatched`."""
    route = request.scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    for candidate in request.app.router.routes:  # servers whose routing does not record the route
        match, _ = candidate.matches(request.scope)
        if match != Match.NONE:
            return str(getattr(candidate, "path", UNMATCHED))
    return UNMATCHED


# Status recorded for a request that ended without any response (its client went away).
CLIENT_CLOSED = "499"


class RequestMetrics:
    """Pure ASGI middleware counting HTTP requests by route template and status, with their latency.

    Not a BaseHTTPMiddleware: that one raises "No response returned" (and logs a traceback) whenever a
    client disconnects before its answer, which cancels the handler by design here."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status: str | None = None

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, record_status)
        except BaseException:
            status = status or "500"
            raise
        finally:
            self.metrics.in_flight.dec()
            endpoint = route_label(Request(scope))
            self.metrics.requests.labels(endpoint, status or CLIENT_CLOSED).inc()
            if endpoint.startswith("/v1/"):
                self.metrics.e2e.labels(endpoint).observe(time.monotonic() - started)
